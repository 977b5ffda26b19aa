"""DoRA (weight-decomposed LoRA): the :class:`DoRA` variant, its weight norm, and its autograd node.

DoRA (Liu et al., 2024) writes the adapted weight as a magnitude times a direction::

    W' = m * (W + s B A) / ||W + s B A||        (norms and m per output row, shape (out,))

and, like PEFT, treats the norm as a constant in backward (it is detached). With ``f = m / norm``
and PEFT's formula, the layer computes ``base(x) + (f - 1) * W x + f * s * B A x``.

The norm is computed without forming the ``(out, in)`` matrix ``W + s B A``::

    ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s <B_o, (W A^T)_o> + s^2 <B_o, (B A A^T)_o>

that is one skinny product ``W A^T`` (which reads ``W`` once) and ``r``-sized work. ``||W_o||^2``
of the frozen base weight is kept between calls while the weight is unchanged, and without grad
mode the whole norm is kept while ``W``, ``A`` and ``B`` are unchanged (:class:`NormCache`), so
inference after training does no weight-sized work per call. With ``B = 0`` the two extra terms are
exact zeros, and the magnitude is initialised with this same function: a fresh adapter has
``f = 1`` exactly and computes what the original layer does, bit for bit.

:func:`dora_linear` is the forward and backward of an adapted ``nn.Linear`` as one node: the base
output (``addmm`` with the bias, as ``F.linear`` computes it), the adapter accumulated into it, and
one more pass ``out += (f - 1) * (out - bias)``; backward scales the output gradient by ``f`` once,
reads the saved ``W x + s B A x`` once for the magnitude's gradient, and otherwise runs LoRA's
products. No weight-sized tensor is created in backward.

:class:`DoRA` is the variant (see :mod:`lightning_lora.adapters.variants`) that puts this into the
linear kinds: a ``magnitude`` parameter per output row, its forward, merge and unmerge, its rules
(no adapter bias, no quantized base) and its PEFT fields (``use_dora``, ``lora_magnitude_vector``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.adapters.base import LoRABase, base_bias, base_weight, cast, compute_dtype, fused_dtype, in_dtype
from lightning_lora.adapters.linear import LoRA
from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.adapters.variants import Variant, register_variant
from lightning_lora.quantize import quantized_format


def sum_of_squares(weight: torch.Tensor, rows_first: bool) -> torch.Tensor:
    """``||W_o||^2`` per output row, in float32 (``rows_first``: weight ``(out, in)``, else ``(in, out)``)."""
    w = weight.detach().float()
    return w.square().sum(1 if rows_first else 0)


def weight_norm(
    weight: torch.Tensor,
    a_weight: torch.Tensor,
    b_weight: torch.Tensor,
    scaling: float,
    rows_first: bool,
    squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||W + scaling * B @ A||`` per output row, in float32, detached.

    Args:
        weight: the base weight, ``(out, in)`` when ``rows_first``, else ``(in, out)`` (``Conv1D``).
        a_weight, b_weight: ``(r, in)`` and ``(out, r)``.
        scaling: the factor of ``B @ A``.
        rows_first: the layout of ``weight``.
        squares: :func:`sum_of_squares` of ``weight`` if already known.
    """
    with torch.no_grad():
        w = weight if rows_first else weight.t()  # (out, in), a view
        a, b = a_weight.float(), b_weight.float()
        if squares is None:
            squares = sum_of_squares(weight, rows_first)
        wa = torch.mm(w, a_weight.to(w.dtype).t()).float()  # (out, r)
        baa = torch.mm(b, torch.mm(a, a.t()))  # (out, r)
        cross = torch.linalg.vecdot(b, wa, dim=1)  # (out,)
        update = torch.linalg.vecdot(b, baa, dim=1)
        squared = squares + (2 * scaling) * cross + (scaling * scaling) * update
        return squared.clamp_min(0).sqrt()


class NormCache:
    """The last ``||W_o||^2`` and weight norm of one layer, kept while their inputs are unchanged.

    An entry is valid while the very tensors it was computed from (held by weak reference) have
    the same storage and version counter: any in-place change (an optimizer step, ``copy_``,
    ``load_state_dict``, merging) bumps the version. Changes made through ``.data``, which
    bypasses version counting, are not seen. Nothing is kept while ``torch.compile`` traces, nor for
    inference tensors (made under ``torch.inference_mode()``), which have no version counter.
    """

    def __init__(self) -> None:
        self._squares: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._norm: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @staticmethod
    def _key(tensors: tuple[torch.Tensor, ...], scaling: float) -> tuple[Any, ...]:
        return (scaling, *((weakref.ref(t), t.data_ptr(), t._version) for t in tensors))

    @staticmethod
    def _valid(entry: tuple[tuple[Any, ...], torch.Tensor], tensors: tuple[torch.Tensor, ...], scaling: float) -> bool:
        key = entry[0]
        return key[0] == scaling and all(
            ref() is t and ptr == t.data_ptr() and version == t._version
            for (ref, ptr, version), t in zip(key[1:], tensors)
        )

    def norm(self, weight: torch.Tensor, a_weight: torch.Tensor, b_weight: torch.Tensor, scaling: float,
             rows_first: bool) -> torch.Tensor:
        """:func:`weight_norm`, reusing what is still valid."""
        tensors = (weight, a_weight, b_weight)
        if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return weight_norm(weight, a_weight, b_weight, scaling, rows_first)
        if not torch.is_grad_enabled() and self._norm is not None and self._valid(self._norm, tensors, scaling):
            return self._norm[1]
        squares = self._squares[1] if self._squares is not None and self._valid(self._squares, (weight,), 0.0) else None
        if squares is None:
            squares = sum_of_squares(weight, rows_first)
            self._squares = (self._key((weight,), 0.0), squares)
        norm = weight_norm(weight, a_weight, b_weight, scaling, rows_first, squares)
        self._norm = (self._key(tensors, scaling), norm)
        return norm

    def clear(self) -> None:
        self._squares = self._norm = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_squares": None, "_norm": None}  # weak references do not pickle; a copy starts empty


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_weight: torch.Tensor,
    b_weight: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output ``(..., out)``; the 2-D input, ``x A^T``, ``W x + s B A x`` and ``f`` for backward."""
    in_features, out_features = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, in_features)  # (N, in)
    hidden = torch.mm(x2, a_weight.t())  # (N, r)
    out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())  # (N, out)
    out.addmm_(hidden, b_weight.t(), alpha=scaling)
    factor = magnitude / norm  # (out,)
    if bias is None:
        directed = out  # W x + s B A x
        out = torch.addcmul(out, out, factor - 1)
    else:
        directed = out - bias
        out.addcmul_(directed, factor - 1)
    return out.view(*x.shape[:-1], out_features), x2, hidden, directed, factor


class _DoRALinearFunction(torch.autograd.Function):
    """``x W^T + b + (f - 1) x W^T + f s (x A^T) B^T`` with ``f = magnitude / norm`` (norm constant)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a_weight: torch.Tensor,
        b_weight: torch.Tensor,
        magnitude: torch.Tensor,
        norm: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        out, x2, hidden, directed, factor = _forward(x, weight, bias, a_weight, b_weight, magnitude, norm, scaling)
        # the base weight only where the input's gradient needs it (it may be an inference tensor)
        kept = weight if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(x2, kept, a_weight, b_weight, hidden, directed, factor, norm)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, a_weight, b_weight, hidden, directed, factor, norm = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scaling = ctx.scaling
        g = grad_out.reshape(-1, b_weight.shape[0])  # (N, out)
        g_directed = g * factor  # the gradient of W x + s B A x
        grad_hidden = torch.mm(g_directed, b_weight).mul_(scaling)  # (N, r)
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(g_directed, weight)
            grad_x.addmm_(grad_hidden, a_weight)
            grad_x = grad_x.view(ctx.x_shape)
        grad_weight = torch.mm(g_directed.t(), x2) if needs[1] else None
        grad_bias = g.sum(0) if needs[2] else None
        grad_a_weight = torch.mm(grad_hidden.t(), x2) if needs[3] else None
        grad_b_weight = torch.mm(hidden.t(), g_directed).mul_(scaling).t() if needs[4] else None
        grad_magnitude = torch.linalg.vecdot(g, directed, dim=0) / norm if needs[5] else None
        return grad_x, grad_weight, grad_bias, grad_a_weight, grad_b_weight, grad_magnitude, None, None


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_weight: torch.Tensor,
    b_weight: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """A DoRA-adapted linear layer: ``F.linear(x, W, b) + (f - 1) * x W^T + f * scaling * (x A^T) B^T``.

    ``f = magnitude / norm``; ``norm`` (:func:`weight_norm`) gets no gradient. All tensors share
    one dtype and device; ``x`` may have any number of leading dimensions.

    Args:
        x: the input, shape ``(..., in_features)``.
        weight, bias: the base layer's parameters, shapes ``(out, in)`` and ``(out,)``.
        a_weight, b_weight: shapes ``(r, in)`` and ``(out, r)``.
        magnitude: shape ``(out,)``.
        norm: ``||W + scaling * B A||`` per output row, shape ``(out,)``.
        scaling: the factor of the low-rank update.

    Example::

        >>> x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        >>> norm = weight_norm(w, a, b, 0.5, rows_first=True)
        >>> m = torch.rand(6)
        >>> expected = x @ (m[:, None] * (w + 0.5 * b @ a) / norm[:, None]).T
        >>> torch.allclose(dora_linear(x, w, None, a, b, m, norm, 0.5), expected, atol=1e-5)
        True
    """
    if torch.is_grad_enabled():
        return _DoRALinearFunction.apply(x, weight, bias, a_weight, b_weight, magnitude, norm, scaling)
    return _forward(x, weight, bias, a_weight, b_weight, magnitude, norm, scaling)[0]


class DoRA(Variant):
    """DoRA on a linear kind (``nn.Linear``, transformers' ``Conv1D``): ``m * (W + s B A) / ||W + s B A||``.

    Adds ``magnitude`` (one value per output row, initialised to the row norms of the weight, so a
    fresh adapter is the identity bit for bit) and computes what PEFT's DoRA computes, the norm a
    constant in backward. Around a plain ``nn.Linear`` without dropout, forward and backward are one
    node (:func:`dora_linear`); the norm is kept while the weights are unchanged (:class:`NormCache`).
    """

    name = "dora"
    kinds = ("linear", "transformers_conv1d")
    peft_config = {"use_dora": True}
    peft_tensors = {"magnitude": "lora_magnitude_vector"}
    allows_bias = False

    def __init__(self, layer: LoRABase) -> None:
        super().__init__(layer)
        assert isinstance(layer, LoRA), "check_layer admits the linear kinds only"
        self.linear = layer
        _, out_features = layer.features(layer.original_module)
        layer.register_parameter("magnitude", nn.Parameter(torch.empty(out_features, **layer.factory)))
        self.norms = NormCache()
        self.merge_factor: torch.Tensor | None = None

    @classmethod
    def check_settings(cls, bias: bool, quantize: str | None) -> None:
        if bias:
            raise ValueError("use_dora=True needs bias=False or 'auto': DoRA's update has no bias (as in PEFT), got bias=True")
        if quantize is not None:
            raise ValueError(
                f"use_dora=True cannot be combined with quantize={quantize!r}: DoRA's weight norm needs the "
                f"base weights in floating point; set use_dora=False or quantize=None"
            )

    @classmethod
    def check_layer(cls, kind: type[LoRABase], original_module: nn.Module) -> None:
        if not issubclass(kind, LoRA):
            raise ValueError(
                f"use_dora=True is supported on nn.Linear and transformers' Conv1D layers only, not on "
                f"{type(original_module).__name__}; leave this layer out of the targets or set use_dora=False"
            )
        stored = quantized_format(base_weight(original_module))
        if stored is not None:
            raise ValueError(
                f"use_dora=True needs a floating-point base weight, got one quantized ({stored}); set "
                f"use_dora=False or adapt the unquantized model"
            )

    @classmethod
    def param_shapes(cls, kind: type[LoRABase], original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        assert issubclass(kind, LoRA), "check_layer admits the linear kinds only"
        return {"magnitude": (kind.features(original_module)[1],)}

    @property
    def magnitude(self) -> nn.Parameter:
        """The layer's ``magnitude`` (read from the layer each time: FSDP and ``to_empty`` replace parameters)."""
        magnitude = self.linear.magnitude
        assert isinstance(magnitude, nn.Parameter), "DoRA layers hold their magnitude as a parameter"
        return magnitude

    def params(self) -> dict[str, nn.Parameter]:
        return {"magnitude": self.magnitude}

    def reset(self) -> None:
        """``magnitude`` set to the weight's row norms (B is zero: the identity).

        The cache is left empty: its weak references would stop the weights being swapped for new
        ones (``model.to`` of a sharded model, right after materialisation resets the layer).
        """
        self.norms.clear()
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm())
        self.norms.clear()

    def weight_norm(self) -> torch.Tensor:
        """``||W + scaling * B @ A||`` per output row (detached), rounded to ``magnitude``'s dtype.

        Computed as :func:`weight_norm` does, and kept while the weights are unchanged. The rounding
        makes a fresh adapter's ``magnitude / norm`` exactly 1.
        """
        layer = self.linear
        norm = self.norms.norm(
            base_weight(layer.original_module), base_weight(layer.matrix_A), base_weight(layer.matrix_B),
            layer.scaling, layer.rows_first,
        )
        return norm.to(self.magnitude.dtype)

    def divisor(self) -> torch.Tensor:
        """:meth:`weight_norm` with its zero rows as ``+inf``: what ``magnitude`` is divided by.

        A row whose ``W + s B A`` is zero (a dead unit, a zero-initialised layer, a row whose norm
        underflows float32) has no direction: its factor ``m / norm`` is 0 instead of ``0 / 0``, so
        the row computes zero as the base does, its gradients are zero (it stays dead), and a merge
        leaves it zero, never NaN.
        """
        norm = self.weight_norm()
        return norm.masked_fill(norm == 0, float("inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA as PEFT computes it: ``base(x) + (f - 1) * W d + f * scaling * B A d``, ``f = m / norm``.

        ``d`` is ``x``, or its dropout while training with dropout (then ``W d`` is one more product).
        Around a plain ``nn.Linear`` without dropout this runs as one autograd node (:func:`dora_linear`).
        """
        layer = self.linear
        norm = self.divisor()  # (out,)
        dropping = isinstance(layer.dropout, nn.Dropout) and layer.dropout.training
        dtype = fused_dtype(layer.original_module, x)
        if dtype is not None and not dropping:
            x = in_dtype(x, dtype)
            linear, a, b = layer.original_module, layer.matrix_A, layer.matrix_B
            return dora_linear(
                x,
                in_dtype(base_weight(linear), dtype),
                in_dtype(base_bias(linear), dtype),
                in_dtype(base_weight(a), dtype),
                in_dtype(base_weight(b), dtype),
                in_dtype(self.magnitude, dtype),
                norm.to(dtype),
                layer.scaling,
            )
        result = layer.original_module(x)
        dtype = compute_dtype(x)
        factor = (self.magnitude / norm).to(result.dtype)  # (out,)
        if dropping:
            x = layer.dropout(x)
            directed = F.linear(x, layer.linear_weight().to(dtype))
        else:
            bias = base_bias(layer.original_module)
            directed = result if bias is None else result - bias
        hidden = F.linear(x, *cast(layer.matrix_A, dtype))  # (..., r)
        update = F.linear(hidden, *cast(layer.matrix_B, dtype))  # (..., out_features)
        return result + (factor - 1) * directed + factor * update * layer.scaling

    def merged(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self.merge_factor = (self.magnitude.detach() / self.divisor()).float()
        return self._rows(self.merge_factor) * (weight + delta)

    def unmerged(self, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        assert self.merge_factor is not None, "a merged DoRA layer keeps its factor"
        factor = self._rows(self.merge_factor)
        # a row of factor 0 was W + delta = 0 (see divisor), so W = -delta there
        return torch.where(factor == 0, -delta, merged / factor.masked_fill(factor == 0, 1) - delta)

    @classmethod
    def check_export(cls, tensors: dict[str, torch.Tensor], module: str) -> None:
        """PEFT divides ``magnitude`` by the row norm: rows of magnitude 0 (rows without direction,
        see :meth:`divisor`) would be ``0 / 0`` there."""
        dead = (tensors["magnitude"] == 0).nonzero().flatten().tolist()
        if dead:
            raise ValueError(
                f"cannot export DoRA module '{module}' to PEFT: its rows {dead[:5]!r} have magnitude 0 and no "
                f"direction (W + s B A is zero there: a dead or zero-initialised unit), where PEFT's DoRA "
                f"computes 0 / 0 = NaN; leave the module out of the targets, or merge_and_unload and export "
                f"the merged model"
            )

    def merge_done(self) -> None:
        self.merge_factor = None

    def _rows(self, factor: torch.Tensor) -> torch.Tensor:
        """A per-output-row ``factor`` (out,) shaped to scale the original weight."""
        return factor[:, None] if self.linear.rows_first else factor[None, :]


register_variant(DoRA)

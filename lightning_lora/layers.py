"""The adapter layers: ``LoRA`` (Linear), ``LoRAConv`` (Conv1d/2d/3d) and ``LoRAEmbedding``.

Each wraps an existing layer and adds a low-rank update::

    forward(x) = original_module(x) + scaling * matrix_B(matrix_A(x))

``matrix_B`` starts at zero (weight and bias), so a freshly wrapped layer computes exactly what the
original did. With ``use_dora`` (Linear and transformers' Conv1D), the layer also trains a
``magnitude`` per output row and computes DoRA (see :mod:`lightning_lora.dora`). ``merge()`` folds
the update into the original weights (computed in float32, then cast) and ``unmerge()`` takes it
out again. Every layer describes itself: :attr:`LoRABase.spec` gives its
settings and :meth:`LoRABase.adapter_params` its own parameters, so no other module needs to know
the attribute names. :func:`build_adapter` is the one place the package constructs adapter layers.
"""

from __future__ import annotations

import math
import sys
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_lora.dora import NormCache, dora_linear
from lightning_lora.fused import lora_linear
from lightning_lora.quantize import quantized_format
from lightning_lora.spec import (
    ADAPTER_DTYPES,
    AdapterSpec,
    dtype_name,
    positive_int,
    positive_number,
    probability,
    scaling,
)

#: Default for ``merge(tolerance=...)``: the largest accepted relative error of the merged update.
MERGE_TOLERANCE = 0.1
#: The adapter kinds that implement DoRA.
DORA_KINDS = ("linear", "transformers_conv1d")


class _ZeroInit(nn.Module):
    """``reset_parameters`` sets weight and bias to zero: a ``matrix_B`` created on the meta device and
    materialised later (``to_empty``, then ``reset_parameters`` on every module with parameters, as
    Lightning's ``ModelParallelStrategy`` and torchtitan do) starts at zero, so the adapter is still
    the identity."""

    def reset_parameters(self) -> None:
        for param in self.parameters(recurse=False):  # weight and bias
            nn.init.zeros_(param)


class ZeroLinear(_ZeroInit, nn.Linear):
    """The ``nn.Linear`` of a ``matrix_B``: zero after ``reset_parameters``."""


class ZeroConv1d(_ZeroInit, nn.Conv1d):
    """The ``nn.Conv1d`` of a ``matrix_B``: zero after ``reset_parameters``."""


class ZeroConv2d(_ZeroInit, nn.Conv2d):
    """The ``nn.Conv2d`` of a ``matrix_B``: zero after ``reset_parameters``."""


class ZeroConv3d(_ZeroInit, nn.Conv3d):
    """The ``nn.Conv3d`` of a ``matrix_B``: zero after ``reset_parameters``."""


_ZERO_CONV: dict[type[nn.Module], type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]] = {nn.Conv1d: ZeroConv1d, nn.Conv2d: ZeroConv2d, nn.Conv3d: ZeroConv3d}


class LoRABase(nn.Module):
    """The base of every adapter layer: settings, initialisation, merge and unmerge.

    Subclasses create ``matrix_A`` and ``matrix_B`` and define the update's computation.
    """

    kind = ""
    original_module: nn.Module
    matrix_A: nn.Module
    matrix_B: nn.Module

    def __init__(
        self,
        original_module: nn.Module,
        bias: bool,
        alpha: float,
        r: int,
        dropout: float,
        use_rslora: bool,
        adapter_dtype: str | torch.dtype | None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if use_dora and self.kind not in DORA_KINDS:
            raise ValueError(
                f"use_dora=True is supported on nn.Linear and transformers' Conv1D layers only, not on "
                f"{type(original_module).__name__}; leave this layer out of the targets or set use_dora=False"
            )
        if use_dora and bias:
            raise ValueError("use_dora=True needs bias=False: DoRA's update has no bias (as in PEFT), got bias=True")
        stored = quantized_format(base_weight(original_module))
        if use_dora and stored is not None:
            raise ValueError(
                f"use_dora=True needs a floating-point base weight, got one quantized ({stored}); set "
                f"use_dora=False or adapt the unquantized model"
            )
        r = positive_int("r", r)
        alpha = positive_number("alpha", alpha)
        dropout = probability("dropout", dropout)
        weight = base_weight(original_module)
        limit = max(weight.shape[0], math.prod(weight.shape[1:]))  # the larger of the layer's two sides
        if r > limit:
            raise ValueError(
                f"r must be at most {limit} for a {type(original_module).__name__} of weight shape "
                f"{tuple(weight.shape)} (a higher rank adds nothing), got r={r}"
            )
        self.original_module = original_module
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = scaling(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True  # False: forward runs the original layer alone (see disable_adapters)
        self._created_bias = False
        self._original_bias: torch.Tensor | None = None
        self._weight_residual: torch.Tensor | None = None
        self._factory: dict[str, Any] = {"device": weight.device, "dtype": _resolve_dtype(adapter_dtype, weight.dtype)}

    def init_weights(self) -> None:
        """Kaiming-uniform ``matrix_A`` (a=sqrt(5)); zero ``matrix_B`` weight and bias."""
        nn.init.kaiming_uniform_(base_weight(self.matrix_A), a=math.sqrt(5))
        nn.init.zeros_(base_weight(self.matrix_B))
        b_bias = base_bias(self.matrix_B)
        if b_bias is not None:
            nn.init.zeros_(b_bias)

    @property
    def has_bias(self) -> bool:
        """Whether the adapter has biases (``matrix_B.bias`` is not None)."""
        return base_bias(self.matrix_B) is not None

    @property
    def spec(self) -> AdapterSpec:
        """This adapter's settings; :func:`build_adapter` rebuilds it from them around the same layer."""
        return AdapterSpec(
            kind=self.kind,
            r=self.r,
            alpha=self.alpha,
            bias=self.has_bias,
            dropout=self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0,
            use_rslora=self.use_rslora,
            adapter_dtype=dtype_name(base_weight(self.matrix_A).dtype),
            use_dora=self.use_dora,
        )

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (what LoRA trains), by name relative to this layer.

        The names are also the layer's ``state_dict`` keys of those tensors (``matrix_A.weight``, ...,
        and ``magnitude`` with DoRA).
        """
        params = {
            f"{part}.{key}": param
            for part, module in (("matrix_A", self.matrix_A), ("matrix_B", self.matrix_B))
            for key, param in module.named_parameters()
        }
        magnitude = getattr(self, "magnitude", None)
        if isinstance(magnitude, nn.Parameter):
            params["magnitude"] = magnitude
        return params

    @property
    def merge_creates_bias(self) -> bool:
        """Whether merging adds a bias the original layer does not have (it changes the architecture)."""
        original_bias = getattr(self.original_module, "bias", None)
        return self.delta_bias() is not None and (original_bias is None or self._created_bias)

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        """The shapes :meth:`adapter_params` will have for ``spec`` around ``original_module``.

        Computed without allocating anything, so a file's tensors can be checked against its claimed
        settings before an adapter is built.
        """
        raise NotImplementedError

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.original_module(x)
        if self.merged or not self.enabled:
            return result
        return result + self.scaling * self._adapter(x)

    # --- merging -----------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A`` in the original weight's layout, in float32."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """The constant the adapter adds to every output (float32), or None without adapter bias."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, tolerance: float = MERGE_TOLERANCE) -> None:
        """Fold the update into ``original_module`` in place; forward then runs the original alone.

        The update is computed in float32 and added to the weight in float32 before one cast to the
        weight's dtype (with DoRA, the merged weight is ``m * (W + delta) / ||W + delta||`` per output
        row). In a low-precision dtype an update much smaller than the weights is rounded
        away: the relative error of the update actually applied is measured, and above ``tolerance``
        the merge is refused and nothing is changed. The rounding is recorded (as small integers),
        so that :meth:`unmerge` restores the original weights bit for bit.

        Raises:
            RuntimeError: if the layer is already merged, its weight is quantized (merging would
                requantize it), or the merged update would be off by more than ``tolerance``
                (relative, in norm) because of the weight's dtype.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        weight = base_weight(self.original_module)
        stored = quantized_format(weight)
        if stored is not None:
            raise RuntimeError(
                f"its base weight is quantized ({stored}): merging into it would requantize the weight, "
                f"losing most of the update and any exact unmerge; merge_and_unload(model) dequantizes "
                f"the base and merges into float weights"
            )
        delta = self.delta_weight()
        target = self._merged(weight.float(), delta)
        merged_weight = target.to(weight.dtype)
        intended = target - weight.float() if self.use_dora else delta
        error = _relative_error(merged_weight.float() - weight.float(), intended)
        if error > tolerance:
            self._merge_done()
            raise RuntimeError(
                f"merging would change the update by {error:.1%} (tolerance {tolerance:.1%}): "
                f"{weight.dtype} weights cannot hold an update this small exactly. Keep the layer "
                f"unmerged, merge a float32 copy of the model, or pass a larger tolerance"
            )
        self._weight_residual = _bit_difference(weight, self._unmerged(merged_weight.float(), delta).to(weight.dtype))
        bias_delta = self.delta_bias()
        weight.copy_(merged_weight)
        if bias_delta is not None:
            bias = base_bias(self.original_module)
            if bias is None:
                bias = nn.Parameter(torch.zeros_like(bias_delta, dtype=weight.dtype), requires_grad=False)
                self.original_module.register_parameter("bias", bias)
                self._created_bias = True
            else:
                self._original_bias = bias.detach().clone()
            bias.copy_((bias.float() + bias_delta).to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``original_module`` again, restoring the weights bit for bit.

        Raises:
            RuntimeError: if the layer is not merged.
        """
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        weight = base_weight(self.original_module)
        restored = self._unmerged(weight.float(), self.delta_weight()).to(weight.dtype)
        assert self._weight_residual is not None, "a merged layer keeps its rounding residual"
        weight.copy_(_add_bits(restored, self._weight_residual))
        self._weight_residual = None
        if self._created_bias:
            self.original_module.register_parameter("bias", None)
            self._created_bias = False
        elif self._original_bias is not None:
            bias = base_bias(self.original_module)
            assert bias is not None, "a merged layer keeps the bias it had"
            bias.copy_(self._original_bias)
            self._original_bias = None
        self.merged = False
        self._merge_done()

    def _merged(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The merged weight in float32, from the float32 original ``weight`` and :meth:`delta_weight`."""
        return weight + delta

    def _unmerged(self, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_merged` (before rounding), from the float32 merged weight."""
        return merged - delta

    def _merge_done(self) -> None:
        """Forget what :meth:`_merged` kept for :meth:`_unmerged`."""

    def extra_repr(self) -> str:
        dora = ", use_dora=True" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}, merged={self.merged}"


class LoRA(LoRABase):
    """LoRA adapter around an ``nn.Linear``.

    Args:
        original_module: the layer to adapt (its ``in_features`` and ``out_features`` are used).
        bias: give ``matrix_A`` and ``matrix_B`` a bias (``matrix_B.bias`` starts at zero).
        alpha: the update is scaled by ``alpha / r``.
        r: rank of the update.
        dropout: dropout on the adapter's input; 0 does no dropout work.
        use_rslora: scale by ``alpha / sqrt(r)`` instead.
        adapter_dtype: dtype of the adapter weights (None: the original weight's dtype). The adapter
            always computes in the input's dtype.
        use_dora: DoRA: also train ``magnitude`` (one value per output row, initialised to the row
            norms of the weight) and compute ``m * (W + s B A) / ||W + s B A||`` as PEFT does
            (the norm gets no gradient). Needs ``bias=False``.

    Raises:
        ValueError: for a non-positive ``r`` or ``alpha``, ``dropout`` outside [0, 1), or
            ``use_dora`` with ``bias``.

    Example::

        >>> layer = nn.Linear(128, 64)
        >>> lora_layer = LoRA(layer, alpha=2, r=8)
        >>> x = torch.randn(16, 128)
        >>> lora_layer(x).shape
        torch.Size([16, 64])
    """

    kind = "linear"
    matrix_A: nn.Linear
    matrix_B: nn.Linear
    rows_first = True  # the original weight is (out, in)

    def __init__(
        self,
        original_module: nn.Linear,
        bias: bool = True,
        alpha: float = 1,
        r: int = 4,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: str | torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__(original_module, bias, alpha, r, dropout, use_rslora, adapter_dtype, use_dora)
        in_features, out_features = self.features(original_module)
        self.matrix_A = nn.Linear(in_features, r, bias=bias, **self._factory)
        self.matrix_B = ZeroLinear(r, out_features, bias=bias, **self._factory)
        if use_dora:
            self.magnitude = nn.Parameter(torch.empty(out_features, **self._factory))
            self._norms = NormCache()
            self._merge_factor: torch.Tensor | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """As :meth:`LoRABase.init_weights`; with DoRA, ``magnitude`` set to the weight's row norms."""
        super().init_weights()
        if self.use_dora:
            self._norms.clear()
            with torch.no_grad():
                self.magnitude.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """DoRA's ``||W + scaling * B @ A||`` per output row (detached), rounded to ``magnitude``'s dtype.

        Computed as :func:`lightning_lora.dora.weight_norm` does, and kept while the weights are
        unchanged. The rounding makes a fresh adapter's ``magnitude / norm`` exactly 1.
        """
        norm = self._norms.norm(
            base_weight(self.original_module), base_weight(self.matrix_A), base_weight(self.matrix_B),
            self.scaling, self.rows_first,
        )
        return norm.to(self.magnitude.dtype)

    @staticmethod
    def features(original_module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the adapted layer, from its weight ``(out, in)``."""
        out_features, in_features = base_weight(original_module).shape
        return in_features, out_features

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        in_features, out_features = cls.features(original_module)
        shapes: dict[str, tuple[int, ...]] = {"matrix_A.weight": (spec.r, in_features), "matrix_B.weight": (out_features, spec.r)}
        if spec.bias:
            shapes.update({"matrix_A.bias": (spec.r,), "matrix_B.bias": (out_features,)})
        if spec.use_dora:
            shapes["magnitude"] = (out_features,)
        return shapes

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        hidden = F.linear(self.dropout(x), *_cast(self.matrix_A, dtype))  # (..., r)
        return F.linear(hidden, *_cast(self.matrix_B, dtype))  # (..., out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``original_module(x) + scaling * matrix_B(matrix_A(dropout(x)))``; when merged, the original alone.

        Around a plain ``nn.Linear`` without hooks, the base layer and the adapter run as one
        autograd node (:func:`lightning_lora.fused.lora_linear`), which saves the elementwise
        passes over the activations that the separate layers need. Other original modules
        (subclasses may compute something else, hooks must run) and inputs the fused node does
        not take (mixed dtypes outside autocast, other devices) use the separate layers.
        """
        if self.merged or not self.enabled:
            return self.original_module(x)
        if self.use_dora:
            return self._dora_forward(x)
        dtype = _fused_dtype(self.original_module, x)
        if dtype is None:
            return super().forward(x)
        x = _in_dtype(x, dtype)
        dropped = self.dropout(x) if isinstance(self.dropout, nn.Dropout) and self.dropout.training else None
        linear, a, b = self.original_module, self.matrix_A, self.matrix_B
        return lora_linear(
            x,
            _in_dtype(base_weight(linear), dtype),
            _in_dtype(base_bias(linear), dtype),
            _in_dtype(base_weight(a), dtype),
            _in_dtype(base_bias(a), dtype),
            _in_dtype(base_weight(b), dtype),
            _in_dtype(base_bias(b), dtype),
            self.scaling,
            dropped,
        )

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA as PEFT computes it: ``base(x) + (f - 1) * W d + f * scaling * B A d``, ``f = m / norm``.

        ``d`` is ``x``, or its dropout while training with dropout (then ``W d`` is one more product).
        Around a plain ``nn.Linear`` without dropout this runs as one autograd node
        (:func:`lightning_lora.dora.dora_linear`).
        """
        norm = self.weight_norm()  # (out,)
        dropping = isinstance(self.dropout, nn.Dropout) and self.dropout.training
        dtype = _fused_dtype(self.original_module, x)
        if dtype is not None and not dropping:
            x = _in_dtype(x, dtype)
            linear, a, b = self.original_module, self.matrix_A, self.matrix_B
            return dora_linear(
                x,
                _in_dtype(base_weight(linear), dtype),
                _in_dtype(base_bias(linear), dtype),
                _in_dtype(base_weight(a), dtype),
                _in_dtype(base_weight(b), dtype),
                _in_dtype(self.magnitude, dtype),
                norm.to(dtype),
                self.scaling,
            )
        result = self.original_module(x)
        dtype = _compute_dtype(x)
        factor = (self.magnitude / norm).to(result.dtype)  # (out,)
        if dropping:
            x = self.dropout(x)
            directed = F.linear(x, self._linear_weight().to(dtype))
        else:
            bias = base_bias(self.original_module)
            directed = result if bias is None else result - bias
        hidden = F.linear(x, *_cast(self.matrix_A, dtype))  # (..., r)
        update = F.linear(hidden, *_cast(self.matrix_B, dtype))  # (..., out_features)
        return result + (factor - 1) * directed + factor * update * self.scaling

    def _linear_weight(self) -> torch.Tensor:
        """The original weight as ``(out, in)``."""
        return base_weight(self.original_module)

    def _factor_rows(self, factor: torch.Tensor) -> torch.Tensor:
        """A per-output-row ``factor`` (out,) shaped to scale the original weight."""
        return factor[:, None] if self.rows_first else factor[None, :]

    def _merged(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if not self.use_dora:
            return super()._merged(weight, delta)
        self._merge_factor = (self.magnitude.detach() / self.weight_norm()).float()
        return self._factor_rows(self._merge_factor) * (weight + delta)

    def _unmerged(self, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if not self.use_dora:
            return super()._unmerged(merged, delta)
        assert self._merge_factor is not None, "a merged DoRA layer keeps its factor"
        return merged / self._factor_rows(self._merge_factor) - delta

    def _merge_done(self) -> None:
        if self.use_dora:
            self._merge_factor = None

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (base_weight(self.matrix_B).float() @ base_weight(self.matrix_A).float())

    def delta_bias(self) -> torch.Tensor | None:
        a_bias, b_bias = base_bias(self.matrix_A), base_bias(self.matrix_B)
        if a_bias is None or b_bias is None:
            return None
        return self.scaling * (base_weight(self.matrix_B).float() @ a_bias.float() + b_bias.float())


LoRALinear = LoRA


class LoRAConv1D(LoRA):
    """LoRA adapter around transformers' ``Conv1D`` (GPT-2's projections).

    ``Conv1D`` is a linear layer whose weight is stored ``(in_features, out_features)``: the adapter
    is exactly :class:`LoRA`'s, and only merging transposes the update. transformers is never
    imported: a ``Conv1D`` can only exist once the user has imported it. Arguments as for :class:`LoRA`.
    """

    kind = "transformers_conv1d"
    rows_first = False  # Conv1D's weight is (in, out)

    @staticmethod
    def features(original_module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)``, from the weight ``(in, out)``."""
        in_features, out_features = base_weight(original_module).shape
        return in_features, out_features

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T  # (in, out), the layout of Conv1D.weight

    def _linear_weight(self) -> torch.Tensor:
        return base_weight(self.original_module).T


def transformers_conv1d() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class if transformers' ``pytorch_utils`` is imported, else None."""
    return _imported_module_class("transformers.pytorch_utils", "Conv1D")


def _imported_module_class(module_name: str, class_name: str) -> type[nn.Module] | None:
    """The ``nn.Module`` subclass ``module_name.class_name`` if that module is imported, else None."""
    found = getattr(sys.modules.get(module_name), class_name, None)
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


class LoRAConv(LoRABase):
    """LoRA adapter around an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.

    ``matrix_A`` is a convolution with the original kernel size, stride, padding, dilation, groups
    and padding mode and ``r`` output channels; ``matrix_B`` is a pointwise (1x1) convolution with the
    same groups. The update is therefore exactly a convolution with the original's geometry, and
    merges into it. Arguments as for :class:`LoRA`.

    Raises:
        ValueError: if ``r`` is not a multiple of the original's ``groups``, or for ``use_dora=True``
            (DoRA is implemented for Linear and Conv1D layers only).
    """

    kind = "conv"
    original_module: nn.Conv1d | nn.Conv2d | nn.Conv3d
    matrix_A: nn.Conv1d | nn.Conv2d | nn.Conv3d
    matrix_B: nn.Conv1d | nn.Conv2d | nn.Conv3d

    def __init__(
        self,
        original_module: nn.Conv1d | nn.Conv2d | nn.Conv3d,
        bias: bool = True,
        alpha: float = 1,
        r: int = 4,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: str | torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__(original_module, bias, alpha, r, dropout, use_rslora, adapter_dtype, use_dora)
        conv = original_module
        if r % conv.groups:
            raise ValueError(
                f"r must be a multiple of the convolution's groups ({conv.groups}) so the update "
                f"merges into it, got r={r}"
            )
        conv_type = _conv_base(conv)  # subclasses of nn.ConvNd get a plain nn.ConvNd adapter
        geometry: dict[str, Any] = {  # the original's, so that the update merges into it exactly
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "padding_mode": conv.padding_mode,
        }
        self.matrix_A = conv_type(conv.in_channels, r, bias=bias, **geometry, **self._factory)
        self.matrix_B = _ZERO_CONV[conv_type](r, conv.out_channels, 1, groups=conv.groups, bias=bias, **self._factory)
        self.init_weights()

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        weight = base_weight(original_module)  # (out, in / groups, *kernel)
        groups = int(getattr(original_module, "groups", 1))
        out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
        shapes: dict[str, tuple[int, ...]] = {
            "matrix_A.weight": (spec.r, weight.shape[1], *kernel),
            "matrix_B.weight": (out_channels, spec.r // groups, *(1,) * len(kernel)),
        }
        if spec.bias:
            shapes.update({"matrix_A.bias": (spec.r,), "matrix_B.bias": (out_channels,)})
        return shapes

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        a, b = self.matrix_A, self.matrix_B
        hidden = a._conv_forward(self.dropout(x), *_cast(a, dtype))  # (N, r, *spatial_out)
        return b._conv_forward(hidden, *_cast(b, dtype))  # (N, out_channels, *spatial_out)

    def _grouped(self) -> tuple[torch.Tensor, int]:
        groups = self.original_module.groups
        out_channels = self.matrix_B.out_channels
        b = base_weight(self.matrix_B).float().reshape(groups, out_channels // groups, self.r // groups)
        return b, groups

    def delta_weight(self) -> torch.Tensor:
        b, groups = self._grouped()
        a = base_weight(self.matrix_A).float()
        delta = torch.bmm(b, a.reshape(groups, self.r // groups, -1))  # (groups, out/g, in/g * k)
        return self.scaling * delta.reshape(base_weight(self.original_module).shape)

    def delta_bias(self) -> torch.Tensor | None:
        a_bias, b_bias = base_bias(self.matrix_A), base_bias(self.matrix_B)
        if a_bias is None or b_bias is None:
            return None
        b, groups = self._grouped()
        a_column = a_bias.float().reshape(groups, self.r // groups, 1)
        return self.scaling * (torch.bmm(b, a_column).reshape(-1) + b_bias.float())


class LoRAEmbedding(LoRABase):
    """LoRA adapter around an ``nn.Embedding``.

    ``matrix_A`` is an ``nn.Embedding(num_embeddings, r)`` (normal init, the padding row zero) and
    ``matrix_B`` an ``nn.Linear(r, embedding_dim)`` starting at zero. With ``bias=True`` only
    ``matrix_B`` has a bias (a lookup has no input bias); it merges into every row of the table.
    Arguments as for :class:`LoRA`; ``use_dora=True`` is refused with a ``ValueError`` (DoRA is
    implemented for Linear and Conv1D layers only).
    """

    kind = "embedding"
    original_module: nn.Embedding
    matrix_A: nn.Embedding
    matrix_B: nn.Linear

    def __init__(
        self,
        original_module: nn.Embedding,
        bias: bool = True,
        alpha: float = 1,
        r: int = 4,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: str | torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__(original_module, bias, alpha, r, dropout, use_rslora, adapter_dtype, use_dora)
        emb = original_module
        self.matrix_A = nn.Embedding(emb.num_embeddings, r, padding_idx=emb.padding_idx, **self._factory)
        self.matrix_B = ZeroLinear(r, emb.embedding_dim, bias=bias, **self._factory)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal ``matrix_A`` (padding row zero); zero ``matrix_B`` weight and bias."""
        nn.init.normal_(base_weight(self.matrix_A))
        if self.matrix_A.padding_idx is not None:
            with torch.no_grad():
                base_weight(self.matrix_A)[self.matrix_A.padding_idx].zero_()
        nn.init.zeros_(base_weight(self.matrix_B))
        b_bias = base_bias(self.matrix_B)
        if b_bias is not None:
            nn.init.zeros_(b_bias)

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        num_embeddings, embedding_dim = base_weight(original_module).shape
        shapes: dict[str, tuple[int, ...]] = {"matrix_A.weight": (num_embeddings, spec.r), "matrix_B.weight": (embedding_dim, spec.r)}
        if spec.bias:
            shapes["matrix_B.bias"] = (embedding_dim,)
        return shapes

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        weight_b, bias_b = _cast(self.matrix_B, base_weight(self.matrix_B).dtype)
        hidden = F.embedding(x, base_weight(self.matrix_A), self.matrix_A.padding_idx)  # (..., r)
        return F.linear(self.dropout(hidden), weight_b, bias_b)  # (..., embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.original_module(x)
        if self.merged or not self.enabled:
            return result
        return result + (self.scaling * self._adapter(x)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        delta = base_weight(self.matrix_A).float() @ base_weight(self.matrix_B).float().T  # (num, dim)
        b_bias = base_bias(self.matrix_B)
        if b_bias is not None:
            delta = delta + b_bias.float()
        return self.scaling * delta

    def delta_bias(self) -> torch.Tensor | None:
        return None  # the adapter's bias is folded into every row of the table instead


#: Adapter class for each supported original layer type (subclasses match too).
ADAPTER_TYPES: dict[type[nn.Module], type[LoRABase]] = {
    nn.Linear: LoRA,
    nn.Conv1d: LoRAConv,
    nn.Conv2d: LoRAConv,
    nn.Conv3d: LoRAConv,
    nn.Embedding: LoRAEmbedding,
}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def adapter_kind(module: nn.Module, name: str) -> str:
    """The adapter kind for ``module`` (named ``name`` in errors).

    Raises:
        TypeError: for a module type that has no adapter (bitsandbytes' ``Linear4bit`` among them).
    """
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise TypeError(
            f"cannot adapt module '{name}' of type {type(module).__name__}: its parameters are not "
            f"initialised yet; run one forward pass (or adapt in configure_model after the model is built)"
        )
    conv1d = transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return LoRAConv1D.kind
    linear4bit = _imported_module_class("bitsandbytes.nn", "Linear4bit")
    if linear4bit is not None and isinstance(module, linear4bit):
        raise TypeError(
            f"cannot adapt module '{name}' of type {type(module).__name__}: bitsandbytes' 4-bit layers pack "
            f"their weight in a layout this package does not read; load the model unquantized and use "
            f"LoRAConfig(quantize='nf4'), which holds the base in 4-bit NF4 through torchao"
        )
    for base, cls in ADAPTER_TYPES.items():
        if isinstance(module, base):
            return cls.kind
    supported = ", ".join([t.__name__ for t in ADAPTER_TYPES] + ["transformers' Conv1D"])
    raise TypeError(
        f"cannot adapt module '{name}' of type {type(module).__name__}: LoRA supports {supported}"
    )


def adapter_class(kind: str) -> type[LoRABase]:
    """The adapter layer class of ``kind`` (``"linear"``, ``"conv"`` or ``"embedding"``)."""
    classes: tuple[type[LoRABase], ...] = (*ADAPTER_TYPES.values(), LoRAConv1D)
    return next(cls for cls in classes if cls.kind == kind)


def build_adapter(module: nn.Module, spec: AdapterSpec, name: str) -> LoRABase:
    """A new adapter layer with settings ``spec`` around ``module`` (named ``name`` in errors).

    Raises:
        TypeError: if ``module`` cannot take an adapter of ``spec.kind``.
        ValueError: if the settings do not fit the module (e.g. a conv's groups).
    """
    kind = adapter_kind(module, name)
    if kind != spec.kind:
        raise TypeError(f"cannot put a {spec.kind!r} adapter on module '{name}' of type {type(module).__name__}")
    cls = adapter_class(kind)
    try:
        return cls(
            module,
            bias=spec.bias,
            alpha=spec.alpha,
            r=spec.r,
            dropout=spec.dropout,
            use_rslora=spec.use_rslora,
            adapter_dtype=spec.adapter_dtype,
            use_dora=spec.use_dora,
        )
    except ValueError as err:
        raise ValueError(f"cannot adapt module '{name}': {err}") from err


def _conv_base(conv: nn.Module) -> type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]:
    return next(t for t in _CONV_TYPES if isinstance(conv, t))


def _resolve_dtype(adapter_dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if adapter_dtype is None:
        return default
    if isinstance(adapter_dtype, torch.dtype):
        return adapter_dtype
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be None or one of {sorted(ADAPTER_DTYPES)}, got {adapter_dtype!r}")
    return ADAPTER_DTYPES[adapter_dtype]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the adapter computes in: autocast's when active, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _fused_dtype(linear: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype :func:`lora_linear` computes ``linear`` in for input ``x``, or None where it must not run.

    It runs where it computes exactly what ``F.linear`` would: an ``nn.Linear`` itself (not a
    subclass) with a plain weight (not a quantized one, which ``F.linear`` dequantizes), no module
    hooks to call, input and weight on one device, and either one shared dtype or, under autocast,
    float32 and the autocast dtype only (the tensors autocast casts).
    """
    if type(linear) is not nn.Linear or _has_hooks(linear):
        return None
    weight = linear.weight
    if quantized_format(weight) is not None:
        return None
    if x.dim() == 0 or x.shape[-1] != linear.in_features or x.device != weight.device:
        return None  # the separate layers raise the usual error, if any
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        cast = (torch.float32, dtype)
        return dtype if x.dtype in cast and weight.dtype in cast else None
    return x.dtype if x.dtype == weight.dtype and x.is_floating_point() else None


@overload
def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def _in_dtype(tensor: None, dtype: torch.dtype) -> None: ...
@overload
def _in_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None: ...
def _in_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` cast to ``dtype`` (a differentiable cast), itself when already there or None."""
    if tensor is None or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) besides ``forward``."""
    hooks = torch.nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _cast(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's weight and bias in ``dtype`` (differentiable casts; no copy when already there)."""
    bias = base_bias(layer)
    return base_weight(layer).to(dtype), None if bias is None else bias.to(dtype)


def base_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, typed: every layer the package adapts or creates has one."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__}.weight is not a tensor"
    return weight


def base_bias(module: nn.Module) -> torch.Tensor | None:
    """``module.bias`` (None where the layer has none), typed."""
    bias = getattr(module, "bias", None)
    assert bias is None or isinstance(bias, torch.Tensor), f"{type(module).__name__}.bias is not a tensor"
    return bias


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_difference(original: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """``original - restored`` in the integer view of their bits, in the narrowest integer dtype."""
    bits = _BITS[original.element_size()]
    difference = original.view(bits).long() - restored.view(bits).long()
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if difference.numel() == 0 or (difference.min() >= info.min and difference.max() <= info.max):
            return difference.to(dtype)
    return difference


def _add_bits(restored: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_bit_difference`: the original tensor, bit for bit."""
    bits = _BITS[restored.element_size()]
    return (restored.view(bits).long() + difference.long()).to(bits).view(restored.dtype)


def _relative_error(applied: torch.Tensor, intended: torch.Tensor) -> float:
    norm = torch.linalg.vector_norm(intended)
    if norm == 0:
        return 0.0
    return float(torch.linalg.vector_norm(applied - intended) / norm)

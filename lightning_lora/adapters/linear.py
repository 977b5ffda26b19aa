"""The ``linear`` kind, :class:`LoRA` (``nn.Linear``), and ``transformers_conv1d``, :class:`LoRAConv1D`.

``LoRA`` is the seed layer ``LoRA(original_module, bias=True, alpha=1, r=4)``: ``matrix_A`` is an
``nn.Linear(in, r)`` and ``matrix_B`` an ``nn.Linear(r, out)`` starting at zero. Around a plain
``nn.Linear`` the base layer and the adapter run as one autograd node
(:func:`lightning_lora.adapters.fused.lora_linear`). transformers' ``Conv1D`` (GPT-2) is a linear layer
whose weight is stored ``(in, out)``: its adapter is ``LoRA``'s, and only merging transposes.
In PEFT's format both are ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r) and, with
``lora_bias``, ``lora_B.bias`` (A's bias folded in: ``B(Ax + a) + b = BAx + (Ba + b)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.adapters import registry
from lightning_lora.adapters.base import (
    LoRABase,
    ZeroLinear,
    base_bias,
    base_weight,
    cast,
    check_dims,
    compute_dtype,
    fused_dtype,
    holding,
    in_dtype,
)
from lightning_lora.adapters.fused import lora_linear
from lightning_lora.adapters.kind import biases_from_peft, peft_bias
from lightning_lora.adapters.spec import AdapterSpec


class LoRA(LoRABase):
    """LoRA adapter around an ``nn.Linear`` (or a registered layer with its weight layout).

    Args:
        original_module: the layer to adapt (its weight ``(out_features, in_features)`` is used).
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
        variant: the name of another registered LoRA variant.

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
    all_linear = True
    served_by_vllm = True
    rows_first = True  # the original weight is (out, in)
    matrix_A: nn.Linear
    matrix_B: nn.Linear

    def create(self, spec: AdapterSpec) -> None:
        in_features, out_features = self.features(self.original_module)
        self.matrix_A = nn.Linear(in_features, spec.r, bias=spec.bias, **self.factory)
        self.matrix_B = ZeroLinear(spec.r, out_features, bias=spec.bias, **self.factory)

    @staticmethod
    def features(original_module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the adapted layer, from its weight ``(out, in)``."""
        out_features, in_features = base_weight(original_module).shape
        return in_features, out_features

    def linear_weight(self) -> torch.Tensor:
        """The original weight as ``(out, in)``."""
        return base_weight(self.original_module)

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        in_features, out_features = cls.features(original_module)
        shapes: dict[str, tuple[int, ...]] = {"matrix_A.weight": (spec.r, in_features), "matrix_B.weight": (out_features, spec.r)}
        if spec.bias:
            shapes.update({"matrix_A.bias": (spec.r,), "matrix_B.bias": (out_features,)})
        return shapes

    def update(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        hidden = F.linear(self.dropout(x), *cast(self.matrix_A, dtype))  # (..., r)
        return F.linear(hidden, *cast(self.matrix_B, dtype))  # (..., out_features)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``original_module(x) + scaling * matrix_B(matrix_A(dropout(x)))``.

        Around a plain ``nn.Linear`` without hooks, the base layer and the adapter run as one
        autograd node (:func:`lightning_lora.adapters.fused.lora_linear`), which saves the elementwise
        passes over the activations that the separate layers need. Other original modules
        (subclasses may compute something else, hooks must run) and inputs the fused node does
        not take (mixed dtypes outside autocast, other devices) use the separate layers.
        """
        dtype = fused_dtype(self.original_module, x)
        if dtype is None:
            return super().lora_forward(x)
        x = in_dtype(x, dtype)
        dropped = self.dropout(x) if isinstance(self.dropout, nn.Dropout) and self.dropout.training else None
        linear, a, b = self.original_module, self.matrix_A, self.matrix_B
        return lora_linear(
            x,
            in_dtype(base_weight(linear), dtype),
            in_dtype(base_bias(linear), dtype),
            in_dtype(base_weight(a), dtype),
            in_dtype(base_bias(a), dtype),
            in_dtype(base_weight(b), dtype),
            in_dtype(base_bias(b), dtype),
            self.scaling,
            dropped,
        )

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (base_weight(self.matrix_B).float() @ base_weight(self.matrix_A).float())

    @classmethod
    def to_peft(
        cls, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, base: nn.Module | None, with_bias: bool, name: str
    ) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": tensors["matrix_A.weight"], "lora_B.weight": tensors["matrix_B.weight"]}
        if with_bias:
            out["lora_B.bias"] = peft_bias(tensors, spec, torch.mv)
        return out

    @classmethod
    def from_peft(cls, tensors: Mapping[str, torch.Tensor], base: nn.Module, name: str, source: str) -> dict[str, torch.Tensor]:
        a = tensors["lora_A.weight"]
        return {"matrix_A.weight": a, "matrix_B.weight": tensors["lora_B.weight"], **biases_from_peft(tensors, a.shape[0], a.dtype)}

    @classmethod
    def rebuild_base(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec
    ) -> nn.Module:
        check_dims(weight, (2,), spec)
        with torch.device("meta"):  # no initialisation of weights that are replaced at once
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        return holding(layer, weight, bias)


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

    def linear_weight(self) -> torch.Tensor:
        return base_weight(self.original_module).T

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T  # (in, out), the layout of Conv1D.weight

    @classmethod
    def rebuild_base(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec
    ) -> nn.Module:
        check_dims(weight, (2,), spec)
        conv1d = importlib.import_module("transformers.pytorch_utils").Conv1D
        with torch.device("meta"):
            layer = conv1d(weight.shape[1], weight.shape[0])  # Conv1D(nf=out_features, nx=in_features), weight (in, out)
        return holding(layer, weight, bias)


registry.add_type(nn.Linear, LoRA)
registry.add_type(("transformers.pytorch_utils", "Conv1D"), LoRAConv1D)

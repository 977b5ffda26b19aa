"""The ``conv`` kind: :class:`LoRAConv`, LoRA around ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

``matrix_A`` is a convolution with the original's kernel size, stride, padding, dilation, groups and
padding mode and ``r`` output channels; ``matrix_B`` is a pointwise (1x1) convolution with the same
groups. The update is therefore exactly a convolution with the original's geometry, and merges into it.

In PEFT's format: ``lora_A.weight`` (r, in, *kernel) sees every input channel, so ours (one block per
group) is written with zeros outside its blocks and read back only when those are zero;
``lora_B.weight`` (out, r / groups, 1, ...). PEFT's conv adapter has no dilation and no padding mode:
such layers are refused both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_lora.adapters import registry
from lightning_lora.adapters.base import LoRABase, ZeroInit, base_bias, base_weight, cast, check_dims, compute_dtype, holding
from lightning_lora.adapters.kind import biases_from_peft, peft_bias
from lightning_lora.adapters.spec import AdapterSpec

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ZeroConv1d(ZeroInit, nn.Conv1d):
    """The ``nn.Conv1d`` of a ``matrix_B``: zero after ``reset_parameters``."""


class ZeroConv2d(ZeroInit, nn.Conv2d):
    """The ``nn.Conv2d`` of a ``matrix_B``: zero after ``reset_parameters``."""


class ZeroConv3d(ZeroInit, nn.Conv3d):
    """The ``nn.Conv3d`` of a ``matrix_B``: zero after ``reset_parameters``."""


_ZERO_CONV: dict[type[nn.Module], type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]] = {
    nn.Conv1d: ZeroConv1d,
    nn.Conv2d: ZeroConv2d,
    nn.Conv3d: ZeroConv3d,
}


class LoRAConv(LoRABase):
    """LoRA adapter around an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.

    Arguments as for :class:`~lightning_lora.LoRA`.

    Raises:
        ValueError: if ``r`` is not a multiple of the original's ``groups``, or for ``use_dora=True``
            (DoRA is implemented for Linear and Conv1D layers only).
    """

    kind = "conv"
    original_module: nn.Conv1d | nn.Conv2d | nn.Conv3d
    matrix_A: nn.Conv1d | nn.Conv2d | nn.Conv3d
    matrix_B: nn.Conv1d | nn.Conv2d | nn.Conv3d

    def create(self, spec: AdapterSpec) -> None:
        conv = self.original_module
        if spec.r % conv.groups:
            raise ValueError(
                f"r must be a multiple of the convolution's groups ({conv.groups}) so the update "
                f"merges into it, got r={spec.r}"
            )
        conv_type = next(t for t in _CONV_TYPES if isinstance(conv, t))  # subclasses get a plain nn.ConvNd adapter
        geometry: dict[str, Any] = {  # the original's, so that the update merges into it exactly
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "padding_mode": conv.padding_mode,
        }
        self.matrix_A = conv_type(conv.in_channels, spec.r, bias=spec.bias, **geometry, **self.factory)
        self.matrix_B = _ZERO_CONV[conv_type](spec.r, conv.out_channels, 1, groups=conv.groups, bias=spec.bias, **self.factory)

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

    def update(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        a, b = self.matrix_A, self.matrix_B
        hidden = a._conv_forward(self.dropout(x), *cast(a, dtype))  # (N, r, *spatial_out)
        return b._conv_forward(hidden, *cast(b, dtype))  # (N, out_channels, *spatial_out)

    def delta_weight(self) -> torch.Tensor:
        groups = self.original_module.groups
        b = _grouped_b(base_weight(self.matrix_B).float(), groups)
        a = base_weight(self.matrix_A).float()
        delta = torch.bmm(b, a.reshape(groups, self.r // groups, -1))  # (groups, out/g, in/g * k)
        return self.scaling * delta.reshape(base_weight(self.original_module).shape)

    def delta_bias(self) -> torch.Tensor | None:
        a_bias, b_bias = base_bias(self.matrix_A), base_bias(self.matrix_B)
        if a_bias is None or b_bias is None:
            return None
        return self.scaling * (_fold_bias(base_weight(self.matrix_B).float(), a_bias.float()) + b_bias.float())

    @classmethod
    def to_peft(
        cls, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, base: nn.Module | None, with_bias: bool, name: str
    ) -> dict[str, torch.Tensor]:
        if base is not None:
            _check_peft_geometry(base, f"module '{name}'", "which PEFT would compute differently")
        a, b = tensors["matrix_A.weight"], tensors["matrix_B.weight"]
        out = {"lora_A.weight": _dense_a(a, groups=a.shape[0] // b.shape[1]), "lora_B.weight": b}
        if with_bias:
            out["lora_B.bias"] = peft_bias(tensors, spec, _fold_bias)
        return out

    @classmethod
    def from_peft(cls, tensors: Mapping[str, torch.Tensor], base: nn.Module, name: str, source: str) -> dict[str, torch.Tensor]:
        _check_peft_geometry(base, f"conv '{name}' of {source}", "so it cannot be imported exactly")
        a = tensors["lora_A.weight"]
        grouped = _grouped_a(a, int(getattr(base, "groups", 1)), name, source)
        return {"matrix_A.weight": grouped, "matrix_B.weight": tensors["lora_B.weight"], **biases_from_peft(tensors, a.shape[0], a.dtype)}

    @classmethod
    def rebuild_base(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec
    ) -> nn.Module:
        check_dims(weight, (3, 4, 5), spec)
        b = tensors.get("matrix_B.weight")
        per_group = int(b.shape[1]) if b is not None and b.dim() == weight.dim() else spec.r
        if per_group <= 0 or spec.r % per_group:
            raise ValueError(
                f"matrix_B.weight must have r / groups input channels (r={spec.r}), got shape "
                f"{tuple(b.shape) if b is not None else None}"
            )
        groups = spec.r // per_group
        conv_type: Callable[..., nn.Module] = _CONV_TYPES[weight.dim() - 3]
        with torch.device("meta"):  # no initialisation of weights that are replaced at once
            layer = conv_type(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), groups=groups, bias=bias is not None)
        return holding(layer, weight, bias)


def _grouped_b(b: torch.Tensor, groups: int) -> torch.Tensor:
    """B (out, r / groups, 1...) as (groups, out / groups, r / groups): each output group reads its own ranks."""
    return b.reshape(groups, b.shape[0] // groups, b.shape[1])


def _fold_bias(b: torch.Tensor, a_bias: torch.Tensor) -> torch.Tensor:
    """``B a`` of a grouped pointwise B (out, r / groups, 1...) and A's bias (r,)."""
    groups = a_bias.shape[0] // b.shape[1]
    return torch.bmm(_grouped_b(b, groups), a_bias.reshape(groups, b.shape[1], 1)).reshape(-1)


def _check_peft_geometry(conv: nn.Module, what: str, consequence: str) -> None:
    dilation = tuple(getattr(conv, "dilation", (1,)))
    padding_mode = getattr(conv, "padding_mode", "zeros")
    if any(d != 1 for d in dilation) or padding_mode != "zeros":
        raise ValueError(
            f"PEFT's conv adapter has no dilation and no padding mode: {what} has dilation {dilation} and "
            f"padding_mode {padding_mode!r}, {consequence}"
        )


def _dense_a(a: torch.Tensor, groups: int) -> torch.Tensor:
    """Our grouped ``matrix_A`` (r, in / groups, *k) as PEFT's dense ``lora_A`` (r, in, *k)."""
    if groups == 1:
        return a
    r, in_per_group = a.shape[0], a.shape[1]
    per_group = r // groups
    dense = a.new_zeros((r, in_per_group * groups, *a.shape[2:]))
    for group in range(groups):
        rows = slice(group * per_group, (group + 1) * per_group)
        dense[rows, group * in_per_group : (group + 1) * in_per_group] = a[rows]
    return dense


def _grouped_a(a: torch.Tensor, groups: int, name: str, source: str) -> torch.Tensor:
    """PEFT's dense ``lora_A`` (r, in, *k) as our grouped one (r, in / groups, *k), if it is block-diagonal."""
    if groups == 1:
        return a
    r, in_channels = a.shape[0], a.shape[1]
    per_group, in_per_group = r // groups, in_channels // groups
    grouped = a.new_empty((r, in_per_group, *a.shape[2:]))
    for group in range(groups):
        rows = slice(group * per_group, (group + 1) * per_group)
        block = slice(group * in_per_group, (group + 1) * in_per_group)
        outside = a[rows].clone()
        outside[:, block] = 0
        if outside.any():
            raise ValueError(f"{source}: the adapter of grouped conv '{name}' mixes groups, which this package's conv adapter cannot hold")
        grouped[rows] = a[rows, block]
    return grouped


for _conv_type in _CONV_TYPES:
    registry.add_type(_conv_type, LoRAConv)

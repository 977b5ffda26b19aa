"""Merging an adapter layer's update into its base weights, and taking it out again bit for bit.

:func:`merge_into_base` computes the merged weight in float32 (``W + delta``, or the variant's
merge) and casts it once to the weight's dtype. In a low-precision dtype an update much smaller than
the weights is rounded away: the relative error of the update actually applied is measured and,
above the tolerance, the merge is refused with nothing changed. The rounding that unmerging in
float32 cannot undo is kept as small integers (the difference of the bit patterns), so that
:func:`unmerge_from_base` restores the original weights exactly. An adapter bias merges into the
base's bias (one is created where the base has none, and removed again on unmerge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_lora.quantize import quantized_format

if TYPE_CHECKING:
    from lightning_lora.adapters.base import LoRABase

#: Default for ``merge(tolerance=...)``: the largest accepted relative error of the merged update.
MERGE_TOLERANCE = 0.1
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class MergeRecord:
    """What a merged layer keeps to unmerge exactly.

    Attributes:
        weight_residual: the original weight's bits minus those unmerging in float32 gives back.
        original_bias: the base's bias before the merge (None where it had none or is unchanged).
        created_bias: whether the merge created the base's bias.
    """

    weight_residual: torch.Tensor
    original_bias: torch.Tensor | None
    created_bias: bool


@torch.no_grad()
def merge_into_base(layer: LoRABase, tolerance: float) -> MergeRecord:
    """Fold ``layer``'s update into ``layer.original_module`` in place (see :meth:`LoRABase.merge`).

    Raises:
        RuntimeError: for a quantized base weight, or a merge off by more than ``tolerance``.
    """
    weight = _weight(layer.original_module)
    stored = quantized_format(weight)
    if stored is not None:
        raise RuntimeError(
            f"its base weight is quantized ({stored}): merging into it would requantize the weight, "
            f"losing most of the update and any exact unmerge; merge_and_unload(model) dequantizes "
            f"the base and merges into float weights"
        )
    variant = layer.variant
    delta = layer.delta_weight()
    target = weight.float() + delta if variant is None else variant.merged(weight.float(), delta)
    merged_weight = target.to(weight.dtype)
    if not torch.isfinite(merged_weight).all():
        if variant is not None:
            variant.merge_done()
        rows = (~torch.isfinite(merged_weight)).nonzero()[:3].tolist()
        raise RuntimeError(
            f"merging would write non-finite values (at {rows}) into the {weight.dtype} weight: the update "
            f"or the weight holds inf or NaN, or overflows the dtype; nothing was changed"
        )
    intended = delta if variant is None else target - weight.float()
    error = _relative_error(merged_weight.float() - weight.float(), intended)
    if error > tolerance:
        if variant is not None:
            variant.merge_done()
        raise RuntimeError(
            f"merging would change the update by {error:.1%} (tolerance {tolerance:.1%}): "
            f"{weight.dtype} weights cannot hold an update this small exactly. Keep the layer "
            f"unmerged, merge a float32 copy of the model, or pass a larger tolerance"
        )
    residual = _bit_difference(weight, _unmerged(layer, merged_weight.float(), delta).to(weight.dtype))
    bias_delta = layer.delta_bias()
    if bias_delta is not None and variant is not None:
        bias_delta = variant.merged_bias(bias_delta)
    weight.copy_(merged_weight)
    record = MergeRecord(residual, None, False)
    if bias_delta is not None:
        bias = getattr(layer.original_module, "bias", None)
        if bias is None:
            bias = nn.Parameter(torch.zeros_like(bias_delta, dtype=weight.dtype), requires_grad=False)
            layer.original_module.register_parameter("bias", bias)
            record.created_bias = True
        else:
            record.original_bias = bias.detach().clone()
        bias.copy_((bias.float() + bias_delta).to(bias.dtype))
    return record


@torch.no_grad()
def unmerge_from_base(layer: LoRABase, record: MergeRecord) -> None:
    """Take ``layer``'s update out of its base again, restoring the weights bit for bit."""
    weight = _weight(layer.original_module)
    restored = _unmerged(layer, weight.float(), layer.delta_weight()).to(weight.dtype)
    weight.copy_(_add_bits(restored, record.weight_residual))
    if record.created_bias:
        layer.original_module.register_parameter("bias", None)
    elif record.original_bias is not None:
        bias = getattr(layer.original_module, "bias")
        bias.copy_(record.original_bias)
    if layer.variant is not None:
        layer.variant.merge_done()


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__}.weight is not a tensor"
    return weight


def _unmerged(layer: LoRABase, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The float32 original weight (before rounding), from the float32 merged weight."""
    return merged - delta if layer.variant is None else layer.variant.unmerged(merged, delta)


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

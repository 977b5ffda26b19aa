"""Quantized base weights (QLoRA): a frozen weight held in 4-bit NF4, recognised, taken apart, restored.

``LoRAConfig(quantize="nf4")`` holds the frozen linear base weights in NormalFloat4 with double
quantization, as QLoRA does, through torchao's ``NF4Tensor`` (the ``qlora`` extra: ``pip install
"lightning-lora[qlora]"``). An ``nn.Linear`` whose weight is an ``NF4Tensor`` still computes
``F.linear``: torchao decodes a transient copy of the weight for the product in the forward and
again in the backward, so the base stays 4-bit for the whole run while the adapters train in their
own dtype. Which layers are quantized is decided in :mod:`lightning_lora.plan` and carried out in
:mod:`lightning_lora.surgery`; this module owns the tensors. torchao is imported only to quantize:
a quantized tensor can only exist once the user has imported torchao, so recognising one needs no
import.
"""

from __future__ import annotations

from typing import Any

import torch

#: Accepted values of ``LoRAConfig.quantize`` (None: the base weights keep their dtype).
METHODS = ("nf4",)
#: Values per NF4 block, each block with its own scale (QLoRA's block size).
BLOCK_SIZE = 64
#: Block scales per second-level block of the double quantization (QLoRA's 256; a weight whose
#: number of blocks 256 does not divide takes the largest divisor below it).
SCALER_BLOCK_SIZE = 256


def check_method(name: str, value: Any) -> str | None:
    """``value`` if it is None or one of :data:`METHODS`, else a ``ValueError`` naming ``name``."""
    if value is None or (isinstance(value, str) and value in METHODS):
        return value
    raise ValueError(f"{name} must be None or one of {list(METHODS)}, got {value!r}")


def quantized_format(tensor: torch.Tensor) -> str | None:
    """``"nf4"`` for a tensor held in NF4 (an ``NF4Tensor``, as parameter or not), else None."""
    # by its class, not by looking torchao up in sys.modules: torch.compile would guard on the number
    # of imported modules, and compile again after any import
    kind = type(tensor)  # a Parameter of an NF4Tensor keeps its class
    return "nf4" if kind.__name__ == "NF4Tensor" and kind.__module__.startswith("torchao.") else None


def fits(weight: torch.Tensor) -> bool:
    """Whether ``weight`` splits into whole NF4 blocks of :data:`BLOCK_SIZE` values."""
    return weight.dim() == 2 and weight.numel() > 0 and weight.numel() % BLOCK_SIZE == 0


def quantize_weight(weight: torch.Tensor, method: str) -> torch.Tensor:
    """A quantized copy of ``weight`` (2-d, :func:`fits`), which keeps its dtype for computing.

    Raises:
        ModuleNotFoundError: if torchao is not installed, naming the extra to install.
    """
    assert method in METHODS and fits(weight), "the plan quantizes only weights that fit"
    try:
        from torchao.quantization import to_nf4
    except ImportError as err:
        raise ModuleNotFoundError(
            f"quantize={method!r} needs torchao >= 0.18 (its NF4Tensor); install it with "
            f"pip install 'lightning-lora[qlora]'"
        ) from err
    blocks = weight.numel() // BLOCK_SIZE
    scaler_block_size = max(size for size in range(1, SCALER_BLOCK_SIZE + 1) if blocks % size == 0)
    _clone_exactly()
    return to_nf4(weight.detach().contiguous(), BLOCK_SIZE, scaler_block_size)


def _clone_exactly() -> None:
    """Make ``clone`` of torchao's ``NF4Tensor`` (and so ``copy.deepcopy`` of a model holding one, as
    EMA and weight-averaging callbacks make) copy its stored codes and scales as they are.

    torchao's own clone quantizes the decoded values again with its default block sizes: not bit
    for bit, and an assertion error for weights whose number of blocks 256 does not divide.
    """
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:  # another torchao layout: its own clone stays
        return
    nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.clone.default] = _exact_clone


def _exact_clone(func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    tensor: Any = args[0][0]
    names, context = tensor.__tensor_flatten__()
    parts = {name: getattr(tensor, name).clone() for name in names}
    return type(tensor).__tensor_unflatten__(parts, context, tensor.size(), tensor.stride())


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the values a quantized ``tensor`` computes with, in the dtype it reports."""
    return tensor.to(tensor.dtype)  # NF4Tensor.to(dtype) dequantizes; a plain tensor is returned as it is


def stored_parts(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a quantized ``tensor`` is stored as (4-bit codes, scales), by name; {} for a plain one."""
    if quantized_format(tensor) is None:
        return {}
    wrapper: Any = tensor  # a tensor subclass: its parts are listed by the subclass protocol
    names, _ = wrapper.__tensor_flatten__()
    return {name: getattr(tensor, name) for name in sorted(names)}

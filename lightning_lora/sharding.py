"""Sharded tensors (FSDP2's ``DTensor`` parameters): tell them apart, gather them, sample them.

A model sharded with ``torch.distributed.fsdp.fully_shard`` holds each parameter as a ``DTensor``:
every rank keeps a slice (a shard) and the full tensor exists only when gathered. The functions here
are the only place that knows this. Each one that takes a ``DTensor`` is a collective: every rank of
its device mesh must call it, in the same order; on plain tensors they do no communication.

- :func:`is_sharded`: whether a model has sharded parameters (adapters must not be added then: they
  would be plain parameters that FSDP never synchronises).
- :func:`full_tensor`: the whole tensor, gathered (adapters are small); :func:`copy_into` the reverse;
  :func:`shard_like`: a whole tensor every rank holds, cut into this rank's shard (no communication).
- :func:`broadcast_from_rank0`: rank 0's values of plain tensors on every rank (adapters initialised
  before ``fully_shard``, which keeps each rank's values: under HSDP replicas would train apart).
- :func:`sample_flat`: the values at given positions of the flattened whole tensor, read from each
  rank's own shard and summed over the mesh, so a fingerprint needs no gather of the base weights
  and is the same for any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeGuard

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (a sharded or replicated tensor of a device mesh)."""
    return isinstance(tensor, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (``fully_shard`` or tensor parallelism ran)."""
    return any(is_dtensor(param) for param in module.parameters())


def shard_like(value: Any, target: torch.Tensor) -> Any:
    """``value``, a whole tensor, as a shard like ``target`` where that is a ``DTensor`` (this rank's part
    of it); anything else as it is. Every rank must hold the same whole tensor: no communication."""
    if not (is_dtensor(target) and isinstance(value, torch.Tensor) and not is_dtensor(value)):
        return value
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def broadcast_from_rank0(tensors: Iterable[torch.Tensor], device: torch.device) -> None:
    """Copy rank 0's values into ``tensors`` on every rank, in place (a collective of the default group).

    ``fully_shard`` takes each rank's values as they are: under a mesh with a replicate dimension (HSDP)
    replicas initialised from different random states would keep them and train apart. Plain tensors
    only (``DTensor`` and meta tensors are skipped); they travel through ``device`` (NCCL needs CUDA).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if torch.distributed.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            if is_dtensor(tensor) or tensor.is_meta:
                continue
            buffer = tensor.detach().to(device)
            torch.distributed.broadcast(buffer, src=0)
            tensor.copy_(buffer)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or for a ``DTensor`` the whole tensor gathered onto every rank (a collective)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` of a whole ``value``; a sharded ``target`` takes its own slice (a collective)."""
    if is_dtensor(target):
        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
    target.copy_(value)


def sample_flat(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The values of ``tensor.reshape(-1)[index]``, in float64, for plain and sharded tensors alike.

    For a ``DTensor`` each rank reads the positions that fall in its own shard; sums over the mesh
    (of the values and of how many ranks hold each one, as replicas hold the same value) give every
    rank the whole sample. Values of float32 or lower precision are exact in float64, so the result
    does not depend on the number of ranks.
    """
    if not is_dtensor(tensor):
        return tensor.detach().reshape(-1)[index.to(tensor.device)].to(torch.float64)
    local = tensor.to_local().detach()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    index = index.to(local.device)
    inside = torch.ones_like(index, dtype=torch.bool)
    local_index = torch.zeros_like(index)
    remainder, stride = index, 1
    for size, start, length in reversed(list(zip(tensor.shape, offset, shape))):  # last dimension first
        position = remainder % size - start  # the coordinate along this dimension, within the shard
        remainder = remainder // size
        inside &= (position >= 0) & (position < length)
        local_index += position.clamp(0, max(length - 1, 0)) * stride
        stride *= length
    summed = torch.zeros(2, index.numel(), dtype=torch.float64, device=local.device)  # values, holders
    summed[1] = inside.to(torch.float64)
    if local.numel():
        summed[0, inside] = local.reshape(-1)[local_index[inside]].to(torch.float64)
    mesh = tensor.device_mesh
    for dim in range(mesh.ndim):  # one sum per mesh dimension, of both rows at once
        torch.distributed.all_reduce(summed, group=mesh.get_group(dim))
    return summed[0] / summed[1]

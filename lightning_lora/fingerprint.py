"""A cheap, deterministic identifier of a model's frozen base weights.

It hashes every base parameter's name, shape and dtype and a fixed sample of its values (the same
evenly spaced positions every time), so its cost does not grow with tensor size beyond the sample.
It tells apart different checkpoints of one architecture; weights that differ only outside the
sampled positions are not told apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from lightning_lora.surgery import base_named_parameters, merged_modules

#: Values sampled from each tensor.
SAMPLES_PER_TENSOR = 256


def base_fingerprint(model: nn.Module, trainable: Iterable[str] | None = None) -> str:
    """Hex digest of the base weights of ``model``, the same before and after adaptation.

    Args:
        model: the model, adapted or not.
        trainable: names of fully trainable modules to leave out (default: the model's own).

    Raises:
        RuntimeError: if an adapter is merged (the weights then hold the update too).
    """
    merged = merged_modules(model)
    if merged:
        raise RuntimeError(f"cannot fingerprint base weights while modules {merged[:5]!r} are merged; unmerge first")
    return fingerprint_tensors(base_named_parameters(model, trainable))


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hex digest of named tensors: each name, shape, dtype and a fixed sample of its values."""
    digest = hashlib.sha256()
    samples = []
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).round().long()
        samples.append(flat[index].to(torch.float64))
    if samples:
        device = samples[0].device
        values = torch.cat([s.to(device) for s in samples]).cpu()  # one small transfer
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()

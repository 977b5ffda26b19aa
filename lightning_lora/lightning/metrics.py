"""What ``LoRACallback`` logs: the adapters' gradient norm and their scaling, on logging steps only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning.pytorch as pl
import torch

from lightning_lora.adapters.base import LoRABase
from lightning_lora.sharding import full_tensor


def log_adapters(pl_module: pl.LightningModule, adapters: Mapping[str, LoRABase], grad_norm: bool, per_layer: bool) -> None:
    """Log ``lora/grad_norm`` (with ``grad_norm``; ``lora/grad_norm/<module>`` too with ``per_layer``) and
    ``lora/scaling`` (one value, or ``lora/scaling/<module>`` where adapters differ) through ``pl_module.log``.

    Sharded gradients give the norm over all shards (every rank takes part).
    """
    if grad_norm:
        norms = {name: _grad_norm(layer.adapter_params().values()) for name, layer in adapters.items()}
        present = [norm for norm in norms.values() if norm is not None]
        if present:
            pl_module.log("lora/grad_norm", torch.nn.utils.get_total_norm(present), on_step=True, on_epoch=False)
        if per_layer:
            for name, norm in norms.items():
                if norm is not None:
                    pl_module.log(f"lora/grad_norm/{name}", norm, on_step=True, on_epoch=False)
    scalings = {name: layer.scaling for name, layer in adapters.items()}
    if len(set(scalings.values())) == 1:
        pl_module.log("lora/scaling", next(iter(scalings.values())), on_step=True, on_epoch=False)
    else:
        for name, value in scalings.items():
            pl_module.log(f"lora/scaling/{name}", value, on_step=True, on_epoch=False)


def _grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The 2-norm over the gradients of ``params``, or None if none has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return full_tensor(torch.nn.utils.get_total_norm(grads))

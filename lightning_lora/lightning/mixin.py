"""``LoRAMixin``: LoRA abilities declared on the LightningModule itself.

Example::

    class Classifier(LoRAMixin, L.LightningModule):
        lora_targets = ["attn.qkv", "mlp.fc1"]  # sensible targets for this architecture

        def __init__(self):
            super().__init__()
            self.backbone = load_pretrained_backbone()
            self.apply_lora(r=8, alpha=16)  # or leave it to LoRACallback

        def configure_optimizers(self):
            return torch.optim.AdamW(self.lora_parameters(), lr=1e-3)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.formats import adapter_file, peft
from lightning_lora.lightning.checkpoint import LoRACheckpointIO, restore_checkpoint, slim_checkpoint
from lightning_lora.lightning.wiring import wire_checkpoints
from lightning_lora.surgery import apply, merge, state

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule as _Module
else:
    _Module = object



class LoRAMixin(_Module):
    """Mix into a ``LightningModule`` (before it in the bases) for LoRA methods and safe checkpoints.

    Class attributes:
        lora_targets: target patterns for this architecture, used when a config's ``targets`` is
            None (by :meth:`apply_lora` and by ``LoRACallback(targets=None)``).
        lora_save_base_weights: keep frozen base weights in checkpoints the model saves without a
            ``LoRACallback`` (with the callback, its ``save_base_weights`` decides).

    Checkpoints: on save the frozen base weights are left out and recorded, unless the Trainer's
    checkpoint IO is a ``LoRACheckpointIO`` (installed by ``LoRACallback``), which then does it; on
    load (``load_from_checkpoint`` or resume) a checkpoint without base weights is filled from the
    model's own weights after they are shown to match the fingerprint of the weights trained on.
    Keys may be missing only for frozen base weights: anything else still fails strict loading.
    Under ``ModelParallelStrategy`` (FSDP2), which reads and writes checkpoints itself, :meth:`setup`
    wraps the strategy's save and load as ``LoRACallback`` does (slim, verified checkpoints with
    companion adapter files): a ``setup`` of your own must call ``super().setup(stage)``, else each
    checkpoint keeps the base weights, with one warning that says how much they weigh.
    """

    lora_targets: ClassVar[list[str] | None] = None
    lora_save_base_weights: ClassVar[bool] = False
    _lora_full_warned: bool = False

    def apply_lora(self, config: LoRAConfig | None = None, **kwargs: Any) -> list[str]:
        """Adapt this model in place; ``kwargs`` are ``LoRAConfig`` fields (``targets`` defaults to
        ``lora_targets``). Returns the adapted module names."""
        if config is not None and kwargs:
            raise ValueError(f"pass either config or LoRAConfig fields, not both (got {sorted(kwargs)!r})")
        return apply.apply_lora(self, config or LoRAConfig(**kwargs))

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        """Adapter parameters and those of ``trainable`` modules: what the optimizer should hold."""
        return state.lora_parameters(self)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter (and ``trainable`` module) tensors under clean names."""
        return state.lora_state_dict(self)

    def save_adapter(self, path: str | os.PathLike) -> str:
        """Write the adapter file (see :func:`lightning_lora.save_adapter`)."""
        return adapter_file.save_adapter(self, path)

    def load_adapter(self, path: str | os.PathLike, check_base: bool = True, root: str | None = None) -> list[str]:
        """Load an adapter file (see :func:`lightning_lora.load_adapter`) or a PEFT adapter folder (see
        :func:`lightning_lora.import_peft`, which has no base fingerprint to check) into this model.

        Its module names are found under the model itself or the transformers model (or child) it holds,
        whatever the attribute; ``root`` names that submodule where they fit under more than one.
        """
        if peft.is_peft_folder(path):
            return peft.import_peft(self, path, root=root)
        return adapter_file.load_adapter(self, path, check_base=check_base, root=root)

    def merge_lora(self) -> None:
        """Merge every adapter into its original weights."""
        merge.merge_lora(self)

    def unmerge_lora(self) -> None:
        """Take every merged adapter's update out of the original weights again."""
        merge.unmerge_lora(self)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """``LightningModule.load_from_checkpoint`` with ``weights_only=True`` unless the caller passes
        ``weights_only=False`` for a trusted file: nothing but tensors and plain values is unpickled."""
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True if weights_only is None else weights_only,
            **kwargs,
        )

    def setup(self, stage: str) -> None:
        """Under ``ModelParallelStrategy`` without ``LoRACallback``: wrap the strategy's checkpoint save and
        load (before ``configure_model`` and any restore), so that checkpoints are slim there too."""
        super().setup(stage)
        if self._strategy_is(ModelParallelStrategy) and not self._checkpoint_io_slims():
            wire_checkpoints(self.trainer, self, None, self.lora_save_base_weights)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._checkpoint_io_slims():
            return
        if not self._strategy_is(ModelParallelStrategy):
            slim_checkpoint(checkpoint, self, keep_base_weights=self.lora_save_base_weights)
        elif not self.lora_save_base_weights and not self._lora_full_warned and state.lora_modules(self):
            self._lora_full_warned = True
            frozen = sum(p.numel() * p.element_size() for p in self.parameters() if not p.requires_grad)
            rank_zero_warn(
                f"LoRAMixin: checkpoints under ModelParallelStrategy keep the frozen base weights "
                f"({frozen / 2**30:.3f} GiB per checkpoint, summed over all shards) because {type(self).__name__}.setup "
                f"does not call super().setup(stage), which makes them slim; call it, or add LoRACallback"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_checkpoint(checkpoint, self)

    def _checkpoint_io_slims(self) -> bool:
        """Whether the attached Trainer writes through a ``LoRACheckpointIO``, which slims instead."""
        return self._strategy_is(object) and isinstance(self.trainer.strategy.checkpoint_io, LoRACheckpointIO)

    def _strategy_is(self, kind: type) -> bool:
        """Whether the model is attached to a Trainer whose strategy is a ``kind``. A
        ``ModelParallelStrategy`` loads checkpoints itself, so only ``LoRACallback`` slims them there."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            return False
        return isinstance(getattr(trainer, "strategy", None), kind)

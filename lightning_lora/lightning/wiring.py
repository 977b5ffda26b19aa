"""How ``LoRACallback`` plugs its checkpoints into a Trainer: the strategy's IO, sharded saves, checkpoint links.

Every checkpoint Lightning writes goes through the strategy's ``CheckpointIO``, which
:func:`wire_checkpoints` wraps in a :class:`~lightning_lora.lightning.checkpoint.LoRACheckpointIO`
(slim checkpoints with companion adapter files). ``ModelParallelStrategy`` saves and loads without it,
so its own ``save_checkpoint``/``load_checkpoint`` are wrapped too
(:class:`~lightning_lora.lightning.model_parallel.ShardedCheckpoints`), for the Trainer's lifetime.
:func:`link_companions` gives the checkpoint links of ``ModelCheckpoint(save_last="link")`` their
companion links.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_lora.lightning.checkpoint import LoRACheckpointIO, link_companion
from lightning_lora.lightning.model_parallel import ShardedCheckpoints


def owns_checkpoints(trainer: pl.Trainer, owner: object) -> bool:
    """Whether the Trainer's checkpoint IO is not a ``LoRACheckpointIO`` of another callback than ``owner``."""
    checkpoint_io = trainer.strategy.checkpoint_io
    return not isinstance(checkpoint_io, LoRACheckpointIO) or checkpoint_io.owner is owner


def wire_checkpoints(
    trainer: pl.Trainer,
    owner: object,
    sharded: ShardedCheckpoints | None,
    save_base_weights: bool = False,
    export_peft: str | None = None,
) -> ShardedCheckpoints | None:
    """Wrap the strategy's checkpoint IO (once) and, under ``ModelParallelStrategy``, its save and load.

    Args:
        owner: what wires them (a ``LoRACallback``, or a ``LoRAMixin`` model without one).
        sharded: the sharded checkpointing ``owner`` wired before, if any.
        save_base_weights, export_peft: the :class:`LoRACheckpointIO` settings.

    Returns:
        The sharded checkpointing of the strategy (``sharded`` itself if it is for this strategy),
        or None for other strategies.
    """
    strategy = trainer.strategy
    checkpoint_io = strategy.checkpoint_io
    if not isinstance(checkpoint_io, LoRACheckpointIO):
        checkpoint_io = strategy.checkpoint_io = LoRACheckpointIO(
            checkpoint_io,
            lambda: trainer.lightning_module,
            save_base_weights,
            owner=owner,
            linked=lambda: checkpoint_links(trainer),
            export=export_peft,
        )
    if not isinstance(strategy, ModelParallelStrategy):
        return None
    if sharded is None or sharded.strategy is not strategy:
        sharded = ShardedCheckpoints(strategy, checkpoint_io)  # for the Trainer's lifetime
        sharded.attach()
    return sharded


def checkpoint_links(trainer: pl.Trainer) -> list[str]:
    """The ``last`` checkpoints that ``ModelCheckpoint(save_last="link")`` callbacks keep as links."""
    return [
        callback.last_model_path
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.save_last == "link" and callback.last_model_path
    ]


def link_companions(trainer: pl.Trainer) -> None:
    """On global rank 0: a companion link beside each checkpoint link (see :func:`checkpoint_links`)."""
    if trainer.is_global_zero:
        for link in checkpoint_links(trainer):
            link_companion(link)

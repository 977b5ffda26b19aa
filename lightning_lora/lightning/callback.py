"""``LoRACallback``: LoRA fine-tuning of any LightningModule as one Trainer callback.

The callback delegates each of its responsibilities to one module of this package:

- settings (:mod:`~lightning_lora.lightning.settings`): its arguments, validated in the constructor,
  and the Trainers it refuses, checked in ``setup``;
- model adaptation (:mod:`~lightning_lora.lightning.adaptation`): in ``setup`` it arranges for the
  model to be adapted around ``configure_model``, which is still before checkpoint restore, strategy
  wrapping (DDP sees only adapter parameters) and ``configure_optimizers``; at the start of each stage
  the model must have adapters (never silent full fine-tuning), and at fit start the optimizers must
  hold them;
- checkpoint wiring (:mod:`~lightning_lora.lightning.wiring`): slim checkpoints with companion adapter
  files, through the strategy's IO;
- logging (:mod:`~lightning_lora.lightning.metrics`): ``lora/grad_norm`` and ``lora/scaling`` on
  logging steps only (after AMP unscaling, once per accumulation window);
- exact resume (:mod:`~lightning_lora.lightning.random_state`): its checkpoint state holds every
  rank's random states, restored when a checkpoint is loaded;
- spawn launchers (:mod:`~lightning_lora.lightning.spawn`): ``ddp_spawn``, ``ddp_fork`` and
  ``ddp_notebook`` adapt copies of the model in the processes they start; the launching process gets
  the trained adapters back.

``on_fit_end`` merges the adapters when ``merge_on_end``; ``on_exception`` takes out adapters added by
a run that failed before it started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.config import LoRAConfig, reconcile
from lightning_lora.lightning.adaptation import Adaptation, check_optimizers, read_stored
from lightning_lora.lightning.metrics import log_adapters
from lightning_lora.lightning.model_parallel import ShardedCheckpoints
from lightning_lora.lightning.random_state import restore_states, saved_states
from lightning_lora.lightning.spawn import hook_launcher
from lightning_lora.lightning.settings import callback_settings, check_export, check_trainer
from lightning_lora.lightning.wiring import link_companions, owns_checkpoints, wire_checkpoints
from lightning_lora.surgery.merge import merge_lora


class LoRACallback(Callback):
    """Adapt, freeze, log and checkpoint a LightningModule for LoRA fine-tuning.

    Args:
        r: rank of each update ``B @ A``.
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        bias: adapter biases: False (PEFT's default), True, or "auto" (only on layers that have a bias).
        targets: module name patterns to adapt (exact, dotted suffix, glob, ``re:...`` or
            ``all-linear``); None takes the LightningModule's ``lora_targets``, else ``all-linear``.
        exclude: patterns removed from the targets.
        dropout: dropout probability on the adapter input (0: no dropout work).
        rank_pattern: module pattern -> rank, for those modules.
        alpha_pattern: module pattern -> alpha, for those modules.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (DoRA): each adapted Linear or Conv1D layer also trains a
            magnitude per output row; its update has no bias (``bias`` False or "auto").
        trainable: patterns of modules trained fully (a new head); None: the new task head of a
            transformers model (``*ForSequenceClassification``'s ``classifier`` or ``score``, ...), as
            PEFT's ``task_type`` does; ``[]`` for none.
        adapter_dtype: dtype of the adapter weights ("float32", "bfloat16", ...); None: the base's.
        quantize: "nf4" holds the frozen linear base weights in 4-bit NF4 while training (QLoRA;
            needs torchao: ``pip install "lightning-lora[qlora]"``); None keeps their dtype.
        adapter_path: start from this adapter file, or PEFT adapter folder: its stored settings are
            used, and settings given explicitly (different from the defaults) that contradict them are
            an error. It is read in ``setup``; its module names are found under the LightningModule
            itself or the transformers model (or child) it holds, whatever the attribute.
        adapter_root: the submodule under which ``adapter_path``'s module names are, where they fit
            under more than one (e.g. ``"model"``).
        save_base_weights: keep the frozen base weights in Lightning checkpoints (default: leave them
            out, so checkpoints hold adapters, optimizer and trainer state only).
        log_grad_norm: log ``lora/grad_norm``, the 2-norm over all adapter gradients.
        log_per_layer: also log ``lora/grad_norm/<module>`` per adapted module.
        merge_on_end: merge the adapters into the weights when ``fit`` ends (for export); not with
            ``quantize`` (use ``merge_and_unload`` after fit for a float model).
        export_peft: also write each checkpoint's adapters in Hugging Face PEFT's format to a
            ``<checkpoint>.peft/`` folder beside it: "peft", or "vllm" for what vLLM serves (what it
            cannot serve is refused as soon as the model is adapted, before training).
        config: a complete :class:`~lightning_lora.LoRAConfig` instead of the separate settings.

    Raises:
        ValueError, TypeError: for a bad argument (the message names it).

    Example::

        trainer = Trainer(callbacks=[LoRACallback(r=8, alpha=16, targets=["attn.qkv", "mlp.fc1"])])
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        bias: bool | str = False,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        dropout: float = 0.0,
        rank_pattern: Mapping[str, int] = {},  # noqa: B006  (read, never changed: LoRAConfig copies it)
        alpha_pattern: Mapping[str, float] = {},  # noqa: B006
        use_rslora: bool = False,
        use_dora: bool = False,
        trainable: Sequence[str] | None = None,
        adapter_dtype: str | None = None,
        quantize: str | None = None,
        adapter_path: str | os.PathLike | None = None,
        adapter_root: str | None = None,
        save_base_weights: bool = False,
        log_grad_norm: bool = True,
        log_per_layer: bool = False,
        merge_on_end: bool = False,
        export_peft: str | None = None,
        config: LoRAConfig | None = None,
    ) -> None:
        settings = callback_settings(
            {
                "r": r,
                "alpha": alpha,
                "bias": bias,
                "targets": targets,
                "exclude": exclude,
                "dropout": dropout,
                "rank_pattern": rank_pattern,
                "alpha_pattern": alpha_pattern,
                "use_rslora": use_rslora,
                "use_dora": use_dora,
                "trainable": trainable,
                "adapter_dtype": adapter_dtype,
                "quantize": quantize,
            },
            config,
            adapter_path=adapter_path,
            adapter_root=adapter_root,
            save_base_weights=save_base_weights,
            log_grad_norm=log_grad_norm,
            log_per_layer=log_per_layer,
            merge_on_end=merge_on_end,
            export_peft=export_peft,
        )
        self.settings = settings
        self.config = settings.config
        self.adapter_path = settings.adapter_path
        self.adapter_root = settings.adapter_root
        self.save_base_weights = settings.save_base_weights
        self.log_grad_norm = settings.log_grad_norm
        self.log_per_layer = settings.log_per_layer
        self.merge_on_end = settings.merge_on_end
        self.export_peft = settings.export_peft
        self._adaptation = Adaptation()
        self._sharded: ShardedCheckpoints | None = None  # checkpointing of the last ModelParallelStrategy
        self._trainer: pl.Trainer | None = None  # of the last setup: where a checkpoint's state is taken
        hook_launcher(LoRACallback)  # the spawn launchers: the trained adapters back into the launching process

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_trainer(trainer, pl_module, self.settings, lambda: owns_checkpoints(trainer, self))
        self._trainer = trainer
        loader = None
        if self.adapter_path is not None:
            stored, loader = read_stored(self.adapter_path, self.adapter_root)
            self.config = reconcile(
                stored, self.settings.explicit, f"adapter_path {self.adapter_path!r}", self.adapter_root
            )
        self._sharded = wire_checkpoints(trainer, self, self._sharded, self.save_base_weights, self.export_peft)
        export = self.export_peft
        self._adaptation.arm(
            trainer, pl_module, self.config, loader, stage, check=lambda adapters, trainable: check_export(export, adapters, trainable)
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """Every rank's random states (every rank runs this when a checkpoint is written), so that a
        resume draws the same dropout masks and data order as an uninterrupted run."""
        trainer = self._trainer
        end_of_epoch = trainer is None or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return {"random_states": saved_states(end_of_epoch)}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's random states (before the data loader draws), or warn why they are not."""
        if trainer.state.fn == "fit":
            state = checkpoint.get("callbacks", {}).get(self.state_key, {})
            restore_states(state.get("random_states"), trainer.world_size, str(trainer.ckpt_path))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adaptation.check(trainer, pl_module, "fit", self.config.adapter_dtype)
        check_optimizers(trainer, pl_module, list(self._adaptation.parameters()))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adaptation.check(trainer, pl_module, "validate", self.config.adapter_dtype)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adaptation.check(trainer, pl_module, "test", self.config.adapter_dtype)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adaptation.check(trainer, pl_module, "predict", self.config.adapter_dtype)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._adaptation.undo(pl_module)
        link_companions(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._adaptation.disarm()
        link_companions(trainer)

    # ModelCheckpoint runs after every other callback in a hook, so checkpoint links it made are
    # given their companion links in the next hook.

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        link_companions(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        link_companions(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        link_companions(trainer)
        if self.merge_on_end:
            merge_lora(pl_module)
            rank_zero_info("LoRA: merged the adapters into the model weights")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning's own monitors (LearningRateMonitor, ThroughputMonitor) ask the same; it has no
        # public equivalent. Nothing is computed and nothing synchronises on other steps.
        if trainer._logger_connector.should_update_logs:
            log_adapters(pl_module, self._adaptation.adapters, self.log_grad_norm, self.log_per_layer)

"""``LoRACallback``: LoRA fine-tuning of any LightningModule as one Trainer callback.

What it does, in hook order:

- ``setup`` (every stage): arranges for the model to be adapted right after ``configure_model``
  (so layers created there are adapted too), which is still before checkpoint restore, strategy
  wrapping (DDP sees only adapter parameters) and ``configure_optimizers``; it also wraps the
  strategy's ``CheckpointIO`` (see :mod:`lightning_lora.checkpoint`).
- ``on_fit_start``: checks that the optimizers hold every adapter parameter, warns once if they
  also hold frozen ones.
- ``on_before_optimizer_step``: on logging steps only, logs ``lora/grad_norm`` (after AMP
  unscaling, once per accumulation window) and ``lora/scaling``.
- ``on_fit_end``: merges the adapters when ``merge_on_end``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_lora.adapter_file import load_adapter, read_adapter
from lightning_lora.checkpoint import LoRACheckpointIO
from lightning_lora.config import LoRAConfig
from lightning_lora.surgery import apply_lora, lora_modules, lora_parameters, lora_summary, merge_lora, unmerge_lora

_CONFIG_FIELDS = (
    "r",
    "alpha",
    "bias",
    "targets",
    "exclude",
    "dropout",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "trainable",
    "adapter_dtype",
)


class LoRACallback(Callback):
    """Adapt, freeze, log and checkpoint a LightningModule for LoRA fine-tuning.

    Args:
        r, alpha, bias, targets, exclude, dropout, rank_pattern, alpha_pattern, use_rslora,
            trainable, adapter_dtype: as in :class:`~lightning_lora.LoRAConfig`. ``targets=None``
            takes the LightningModule's ``lora_targets`` if it declares them, else ``["all-linear"]``.
        adapter_path: start from this adapter file (its stored settings are used; arguments that
            contradict them are an error).
        save_base_weights: keep the frozen base weights in Lightning checkpoints (default: leave them
            out, so checkpoints hold adapters, optimizer and trainer state only).
        log_grad_norm: log ``lora/grad_norm``, the 2-norm over all adapter gradients.
        log_per_layer: also log ``lora/grad_norm/<module>`` per adapted module.
        merge_on_end: merge the adapters into the weights when ``fit`` ends (for export).
        config: a complete :class:`~lightning_lora.LoRAConfig` instead of the separate arguments.

    Raises:
        ValueError, TypeError: for a bad argument (the message names it).

    Example::

        trainer = Trainer(callbacks=[LoRACallback(r=8, alpha=16, targets=["attn.qkv", "mlp.fc1"])])
    """

    def __init__(
        self,
        r: int = 4,
        alpha: float = 1.0,
        bias: bool = True,
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        dropout: float = 0.0,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
        use_rslora: bool = False,
        trainable: Sequence[str] = (),
        adapter_dtype: str | None = None,
        adapter_path: str | os.PathLike | None = None,
        save_base_weights: bool = False,
        log_grad_norm: bool = True,
        log_per_layer: bool = False,
        merge_on_end: bool = False,
        config: LoRAConfig | None = None,
    ) -> None:
        arguments = locals()
        given = {name: _plain(arguments[name]) for name in _CONFIG_FIELDS}
        defaults = {name: _plain(_SIGNATURE.parameters[name].default) for name in _CONFIG_FIELDS}
        for name in ("save_base_weights", "log_grad_norm", "log_per_layer", "merge_on_end"):
            value = arguments[name]
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        if adapter_path is not None and not isinstance(adapter_path, (str, os.PathLike)):
            raise TypeError(f"adapter_path must be a path or None, got {adapter_path!r} ({type(adapter_path).__name__})")
        changed = [name for name in _CONFIG_FIELDS if not _same(given[name], defaults[name])]
        if config is not None:
            if not isinstance(config, LoRAConfig):
                raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
            if changed:
                raise ValueError(f"pass either config or the separate arguments, not both (also got {changed!r})")
        if adapter_path is not None:
            stored = read_adapter(adapter_path).config
            contradicting = [
                f"{name}={given[name]!r} (file: {getattr(stored, name)!r})"
                for name in changed
                if not _same(given[name], getattr(stored, name))
            ]
            if config is not None:
                contradicting += [
                    f"{name}={getattr(config, name)!r} (file: {getattr(stored, name)!r})"
                    for name in _CONFIG_FIELDS
                    if getattr(config, name) != getattr(stored, name)
                ]
            if contradicting:
                raise ValueError(f"adapter_path {str(adapter_path)!r} was trained with other settings: {', '.join(contradicting)}")
            config = stored
        self._targets_from_model = config is None and given["targets"] is None
        if config is None:
            config = LoRAConfig(
                **{
                    **given,
                    "targets": given["targets"] or ["all-linear"],
                    "rank_pattern": given["rank_pattern"] or {},
                    "alpha_pattern": given["alpha_pattern"] or {},
                }
            )
        self.config = config
        self.adapter_path = None if adapter_path is None else str(adapter_path)
        self.save_base_weights = save_base_weights
        self.log_grad_norm = log_grad_norm
        self.log_per_layer = log_per_layer
        self.merge_on_end = merge_on_end
        self._adapted: set[int] = set()

    # --- setup ---------------------------------------------------------------------------------

    def config_for(self, pl_module: pl.LightningModule) -> LoRAConfig:
        """The config used for ``pl_module``: the model's ``lora_targets`` fill in ``targets=None``."""
        declared = getattr(pl_module, "lora_targets", None)
        if self._targets_from_model and declared:
            return LoRAConfig(**{**self.config.to_dict(), "targets": list(declared)})
        return self.config

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy_name = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy_name or "FSDP" in strategy_name or "ModelParallel" in strategy_name:
            raise MisconfigurationException(
                f"LoRACallback supports single-device and DDP strategies, got {strategy_name}; "
                f"use strategy='ddp' (adapters are small, so the model usually fits once per device)"
            )
        if not isinstance(trainer.strategy.checkpoint_io, LoRACheckpointIO):
            trainer.strategy.checkpoint_io = LoRACheckpointIO(
                trainer.strategy.checkpoint_io, lambda: trainer.lightning_module, self.save_base_weights
            )
        if stage == "fit" and any(layer.merged for layer in lora_modules(pl_module).values()):
            unmerge_lora(pl_module)
            rank_zero_info("LoRA: adapters were merged; unmerged them to train")
        if getattr(vars(pl_module).get("configure_model"), "lora_wrapper", False):
            del pl_module.configure_model  # left by a run that stopped before configure_model
        configure_model = pl_module.configure_model

        def configure_model_then_adapt() -> None:
            del pl_module.configure_model
            configure_model()
            self._adapt(pl_module)

        configure_model_then_adapt.lora_wrapper = True
        pl_module.configure_model = configure_model_then_adapt

    def _adapt(self, pl_module: pl.LightningModule) -> None:
        first_time = id(pl_module) not in self._adapted
        if first_time and self.adapter_path is not None and not lora_modules(pl_module):
            load_adapter(pl_module, self.adapter_path)
        else:
            apply_lora(pl_module, self.config_for(pl_module))
        if first_time:
            self._adapted.add(id(pl_module))
            rank_zero_info(str(lora_summary(pl_module)))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        held = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
        if not trainer.optimizers:
            return
        adapters = list(lora_parameters(pl_module))
        missing = [p for p in adapters if id(p) not in held]
        if missing:
            raise MisconfigurationException(
                f"the optimizer does not hold {len(missing)} of the {len(adapters)} LoRA parameters, so they "
                f"would never train; build it over self.lora_parameters() (or lightning_lora.lora_parameters"
                f"(self)) in configure_optimizers"
            )
        frozen = sum(1 for p in pl_module.parameters() if id(p) in held and not p.requires_grad)
        if frozen:
            rank_zero_warn(
                f"the optimizer holds {frozen} frozen parameters; they get no gradient and are skipped, but "
                f"build it over self.lora_parameters() to save its memory"
            )

    # --- logging -------------------------------------------------------------------------------

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not trainer._logger_connector.should_update_logs:
            return  # no norm computed and no host-device sync on steps that do not log
        adapters = lora_modules(pl_module)
        if self.log_grad_norm:
            per_layer = {name: _grad_norm(layer) for name, layer in adapters.items()}
            norms = [norm for norm in per_layer.values() if norm is not None]
            if norms:
                total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
                pl_module.log("lora/grad_norm", total, on_step=True, on_epoch=False)
            if self.log_per_layer:
                for name, norm in per_layer.items():
                    if norm is not None:
                        pl_module.log(f"lora/grad_norm/{name}", norm, on_step=True, on_epoch=False)
        scalings = {name: layer.scaling for name, layer in adapters.items()}
        if len(set(scalings.values())) == 1:
            pl_module.log("lora/scaling", next(iter(scalings.values())), on_step=True, on_epoch=False)
        else:
            for name, value in scalings.items():
                pl_module.log(f"lora/scaling/{name}", value, on_step=True, on_epoch=False)

    # --- end -----------------------------------------------------------------------------------

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.merge_on_end:
            merge_lora(pl_module)
            rank_zero_info("LoRA: merged the adapters into the model weights")


_SIGNATURE = inspect.signature(LoRACallback.__init__)


def _grad_norm(layer: torch.nn.Module) -> torch.Tensor | None:
    grads = [p.grad for part in (layer.matrix_A, layer.matrix_B) for p in part.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _plain(value: Any) -> Any:
    """Hydra's ListConfig / DictConfig (and tuples) as plain lists and dicts."""
    if value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [_plain(item) for item in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """Equality that tells True from 1 (a flag passed as 1 is not the default True)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b

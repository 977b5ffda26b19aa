"""``LoRACallback``: LoRA fine-tuning of any LightningModule as one Trainer callback.

What it does, in hook order:

- ``setup`` (every stage): checks the strategy, resolves its settings (those stored with
  ``adapter_path``, checked against the arguments given explicitly), wraps the strategy's
  ``CheckpointIO`` (see :mod:`lightning_lora.checkpoint`; under ``ModelParallelStrategy``, which
  bypasses it, the strategy's own save and load, see :mod:`lightning_lora.model_parallel`) and
  arranges for the model to be adapted around ``configure_model``: before it where the targets
  exist already (so adapters are in place before a ``fully_shard`` there), and after it for layers
  it created. That is still before checkpoint restore, strategy wrapping (DDP sees only adapter
  parameters) and ``configure_optimizers``. Lightning has no hook there, so the model's
  ``configure_model`` is wrapped on the instance for that one call (and, for adapters with their
  own ``adapter_dtype``, the precision plugin's ``convert_module``, so that "*-true" precisions
  leave them in that dtype); each wrapper removes itself when it runs, and ``on_exception`` and
  ``teardown`` remove them on every other way out of a run.
- ``on_fit_start`` / ``on_validation_start`` / ``on_test_start`` / ``on_predict_start``: the
  model must have adapters by now (else an error, never silent full fine-tuning); at fit start the
  optimizers must hold every adapter parameter (a warning if they also hold frozen ones).
- ``on_before_optimizer_step``: on logging steps only, logs ``lora/grad_norm`` (after AMP
  unscaling, once per accumulation window) and ``lora/scaling``.
- ``on_train_batch_start`` / ``on_train_epoch_start`` / ``on_fit_end`` / ``teardown``: give the
  checkpoint links of ``ModelCheckpoint(save_last="link")`` their companion links.
- ``on_fit_end``: merges the adapters when ``merge_on_end``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_lora.adapter_file import install_adapter, read_adapter
from lightning_lora.checkpoint import LoRACheckpointIO, link_companion
from lightning_lora.config import LoRAConfig, explicit_settings, reconcile
from lightning_lora.model_parallel import ShardedCheckpoints
from lightning_lora.peft_format import TARGETS
from lightning_lora.plan import plan_adapters
from lightning_lora.sharding import full_tensor, is_dtensor, is_sharded
from lightning_lora.spec import boolean, dtype_name
from lightning_lora.surgery import (
    Installation,
    install,
    lora_modules,
    lora_parameters,
    lora_summary,
    lora_tensors,
    merge_lora,
    merged_modules,
    quantize_base,
    unmerge_lora,
)

#: Sharded strategies the callback refuses: ``ModelParallelStrategy`` (FSDP2) is the sharded path.
UNSUPPORTED_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy)
#: The arguments that are not ``LoRAConfig`` fields.
CALLBACK_ARGUMENTS = ("adapter_path", "save_base_weights", "log_grad_norm", "log_per_layer", "merge_on_end", "export_peft")


class LoRACallback(Callback):
    """Adapt, freeze, log and checkpoint a LightningModule for LoRA fine-tuning.

    Args:
        r: rank of each update ``B @ A``.
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        bias: adapter biases: True, False, or "auto" (only on layers that have a bias).
        targets: module name patterns to adapt (exact, dotted suffix, glob, ``re:...`` or
            ``all-linear``); None takes the LightningModule's ``lora_targets``, else ``all-linear``.
        exclude: patterns removed from the targets.
        dropout: dropout probability on the adapter input (0: no dropout work).
        rank_pattern: module pattern -> rank, for those modules.
        alpha_pattern: module pattern -> alpha, for those modules.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        use_dora: weight-decomposed LoRA (DoRA): each adapted Linear or Conv1D layer also trains a
            magnitude per output row; its update has no bias (``bias`` False or "auto").
        trainable: patterns of modules trained fully (a new head).
        adapter_dtype: dtype of the adapter weights ("float32", "bfloat16", ...); None: the base's.
        quantize: "nf4" holds the frozen linear base weights in 4-bit NF4 while training (QLoRA;
            needs torchao: ``pip install "lightning-lora[qlora]"``); None keeps their dtype.
        adapter_path: start from this adapter file: its stored settings are used, and settings
            given explicitly (different from the defaults) that contradict them are an error. The
            file is read in ``setup``.
        save_base_weights: keep the frozen base weights in Lightning checkpoints (default: leave them
            out, so checkpoints hold adapters, optimizer and trainer state only).
        log_grad_norm: log ``lora/grad_norm``, the 2-norm over all adapter gradients.
        log_per_layer: also log ``lora/grad_norm/<module>`` per adapted module.
        merge_on_end: merge the adapters into the weights when ``fit`` ends (for export); not with
            ``quantize`` (use ``merge_and_unload`` after fit for a float model).
        export_peft: also write each checkpoint's adapters in Hugging Face PEFT's format to a
            ``<checkpoint>.peft/`` folder beside it: "peft", or "vllm" for what vLLM serves.
        config: a complete :class:`~lightning_lora.LoRAConfig` instead of the separate settings.

    Raises:
        ValueError, TypeError: for a bad argument (the message names it).

    Example::

        trainer = Trainer(callbacks=[LoRACallback(r=8, alpha=16, targets=["attn.qkv", "mlp.fc1"])])
    """

    def __init__(
        self,
        r: int = 4,
        alpha: float = 1.0,
        bias: bool | str = "auto",
        targets: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        dropout: float = 0.0,
        rank_pattern: Mapping[str, int] = {},  # noqa: B006  (read, never changed: LoRAConfig copies it)
        alpha_pattern: Mapping[str, float] = {},  # noqa: B006
        use_rslora: bool = False,
        use_dora: bool = False,
        trainable: Sequence[str] = (),
        adapter_dtype: str | None = None,
        quantize: str | None = None,
        adapter_path: str | os.PathLike | None = None,
        save_base_weights: bool = False,
        log_grad_norm: bool = True,
        log_per_layer: bool = False,
        merge_on_end: bool = False,
        export_peft: str | None = None,
        config: LoRAConfig | None = None,
    ) -> None:
        settings: dict[str, Any] = {
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
        }
        explicit = explicit_settings(settings)
        if config is not None:
            if not isinstance(config, LoRAConfig):
                raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
            if explicit:
                raise ValueError(f"pass either config or the separate arguments, not both (also got {sorted(explicit)!r})")
            explicit = explicit_settings(config.to_dict())
        if adapter_path is not None and not isinstance(adapter_path, (str, os.PathLike)):
            raise TypeError(f"adapter_path must be a path or None, got {adapter_path!r} ({type(adapter_path).__name__})")
        self.config = LoRAConfig(**settings) if config is None else config
        self.adapter_path = None if adapter_path is None else str(adapter_path)
        self.save_base_weights = boolean("save_base_weights", save_base_weights)
        self.log_grad_norm = boolean("log_grad_norm", log_grad_norm)
        self.log_per_layer = boolean("log_per_layer", log_per_layer)
        self.merge_on_end = boolean("merge_on_end", merge_on_end)
        if self.merge_on_end and self.config.quantize is not None:
            raise ValueError(
                f"merge_on_end=True cannot merge into a quantized base (quantize={self.config.quantize!r}): "
                f"merging would requantize it; call lightning_lora.merge_and_unload(model) after fit for a float model"
            )
        if export_peft not in (None, *TARGETS):
            raise ValueError(f"export_peft must be None, 'peft' or 'vllm', got {export_peft!r}")
        self.export_peft = export_peft
        self._explicit = explicit
        self._adapted: set[int] = set()
        self._armed: list[tuple[object, str, Callable[..., Any]]] = []  # instance wrappers in place
        self._checked = False
        self._installations: list[Installation] = []  # adapters added by this run, until it starts
        self._sharded: ShardedCheckpoints | None = None  # checkpointing of the last ModelParallelStrategy

    # --- setup ---------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"LoRACallback supports single-device, DDP and ModelParallelStrategy (FSDP2) strategies, got "
                f"{type(trainer.strategy).__name__}; to shard the model use "
                f"ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1) and call fully_shard in "
                f"configure_model, or use strategy='ddp' if the model fits once per device"
            )
        if isinstance(trainer.strategy, ModelParallelStrategy) and self.export_peft is not None:
            raise MisconfigurationException(
                f"export_peft={self.export_peft!r} is not available with ModelParallelStrategy; convert a "
                f"checkpoint's companion adapter file afterwards: lightning-lora export-peft ADAPTER OUT_DIR"
            )
        checkpoint_io = trainer.strategy.checkpoint_io
        if isinstance(checkpoint_io, LoRACheckpointIO) and checkpoint_io.owner is not self:
            raise MisconfigurationException(
                "the Trainer has more than one LoRACallback; pass one (its config can list every target)"
            )
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and not lora_modules(pl_module):
            raise MisconfigurationException(
                f"strategy {type(trainer.strategy).__name__} launches processes that train copies of the model "
                f"(ddp_spawn, ddp_fork, ddp_notebook), so the model in the launching process would end without "
                f"the trained adapters; adapt it before "
                f"fit (lightning_lora.apply_lora(model, callback.config)) or use strategy='ddp'"
            )
        if self.adapter_path is not None:
            stored = read_adapter(self.adapter_path).config
            self.config = reconcile(stored, self._explicit, f"adapter_path {self.adapter_path!r}")
        if not isinstance(checkpoint_io, LoRACheckpointIO):
            checkpoint_io = trainer.strategy.checkpoint_io = LoRACheckpointIO(
                checkpoint_io,
                lambda: trainer.lightning_module,
                self.save_base_weights,
                owner=self,
                linked=lambda: _checkpoint_links(trainer),
                export=self.export_peft,
            )
        strategy = trainer.strategy
        if isinstance(strategy, ModelParallelStrategy) and (self._sharded is None or self._sharded.strategy is not strategy):
            self._sharded = ShardedCheckpoints(strategy, checkpoint_io)  # for the Trainer's lifetime
            self._sharded.attach()
        if stage == "fit" and merged_modules(pl_module):
            unmerge_lora(pl_module)
            rank_zero_info("LoRA: adapters were merged; unmerged them to train")
        self._checked = False
        self._arm(trainer, pl_module)

    def _arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap, on the instances, ``pl_module.configure_model`` (the original, then :meth:`_adapt`)
        and, for adapters with their own dtype, the precision plugin's ``convert_module``."""
        self._disarm()
        configure_model: Callable[[], None] = pl_module.configure_model

        def configure_model_then_adapt() -> None:
            # Under ModelParallelStrategy, adapt first where the targets exist already: configure_model
            # shards the model (fully_shard), and adapters added after that would never be
            # synchronised. Then (or only) after it, for layers configure_model created (refused if
            # it sharded them).
            self._disarm(configure_model_then_adapt)
            if isinstance(trainer.strategy, ModelParallelStrategy) and self._plannable(pl_module):
                self._adapt(pl_module)
            configure_model()
            self._adapt(pl_module)

        self._wrap(pl_module, "configure_model", configure_model_then_adapt)
        if self.config.adapter_dtype is not None:
            plugin = trainer.strategy.precision_plugin
            convert: Callable[[torch.nn.Module], torch.nn.Module] = plugin.convert_module

            def convert_keeping_adapter_dtype(module: torch.nn.Module) -> torch.nn.Module:
                # "*-true" precisions cast the whole model; adapters asked for in another dtype
                # (float32 masters of a bfloat16 model) get their own tensors back, untouched
                self._disarm(convert_keeping_adapter_dtype)
                kept = [(p, p.data) for layer in lora_modules(module).values() for p in layer.adapter_params().values()]
                converted = convert(module)
                for param, data in kept:
                    if param.dtype != data.dtype:
                        param.data = data.to(param.device)
                return converted

            self._wrap(plugin, "convert_module", convert_keeping_adapter_dtype)

    def _wrap(self, owner: object, name: str, wrapper: Callable[..., Any]) -> None:
        vars(owner)[name] = wrapper
        self._armed.append((owner, name, wrapper))

    def _disarm(self, only: Callable[..., Any] | None = None) -> None:
        """Remove the instance wrappers of :meth:`_arm` (or only ``only``) still in place, and nothing else."""
        for owner, name, wrapper in list(self._armed):
            if only is None or wrapper is only:
                if vars(owner).get(name) is wrapper:
                    del vars(owner)[name]
                self._armed.remove((owner, name, wrapper))

    def _plannable(self, pl_module: pl.LightningModule) -> bool:
        """Whether the targets can be planned on the model as it is (before ``configure_model``)."""
        try:
            plan_adapters(pl_module, self.config)
        except ValueError:  # e.g. its layers are created in configure_model; planned again after it
            return False
        return True

    def _adapt(self, pl_module: pl.LightningModule) -> None:
        first_time = id(pl_module) not in self._adapted
        if first_time and self.adapter_path is not None and not lora_modules(pl_module):
            if self.config.quantize is not None:  # the file's base was quantized: so must this one be
                quantize_base(pl_module, self.config.quantize, plan_adapters(pl_module, self.config).trainable)
            self._installations.append(install_adapter(pl_module, self.adapter_path))
        else:
            self._installations.append(install(pl_module, plan_adapters(pl_module, self.config)))
        if first_time:
            self._adapted.add(id(pl_module))
            rank_zero_info(str(lora_summary(pl_module)))

    def _check_adapted(self, pl_module: pl.LightningModule, stage: str) -> None:
        if self._checked:
            return
        self._disarm()
        self._installations = []  # the run has started: its adapters are kept whatever happens
        if not lora_modules(pl_module):
            raise MisconfigurationException(
                f"LoRACallback: the model reached {stage} without LoRA adapters (its configure_model was not "
                f"called through the Trainer after setup), so it would {'train every weight' if stage == 'fit' else 'run unadapted'}; "
                f"let the Trainer call configure_model, or adapt the model yourself with lightning_lora.apply_lora"
            )
        wanted = self.config.adapter_dtype
        adapters = [p for layer in lora_modules(pl_module).values() for p in layer.adapter_params().values()]
        cast = {dtype_name(p.dtype) for p in adapters} - {wanted}
        if wanted is not None and cast:
            raise MisconfigurationException(
                f"the adapters were asked for in adapter_dtype={wanted!r} but are {sorted(cast)} now: the "
                f"strategy cast them with the whole model (a '*-true' precision under ModelParallelStrategy); "
                f"keep precision='32-true' and give fully_shard a MixedPrecisionPolicy(param_dtype=torch.bfloat16)"
            )
        if is_sharded(pl_module):
            tensors = lora_tensors(pl_module).items()
            plain = [name for name, p in tensors if isinstance(p, torch.nn.Parameter) and not is_dtensor(p)]
            if plain:
                raise MisconfigurationException(
                    f"LoRA parameters {plain[:5]!r} are plain tensors in a sharded model, so FSDP would not "
                    f"synchronise them and every rank would train its own; call fully_shard on the root "
                    f"module too (after the blocks) in configure_model"
                )
        self._checked = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_adapted(pl_module, "fit")
        if not trainer.optimizers:
            return
        held = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
        adapters = list(lora_parameters(pl_module))
        missing = [p for p in adapters if id(p) not in held]
        if missing and _built_by_lightning_cli(pl_module):
            if trainer.lr_scheduler_configs or len(trainer.optimizers) > 1:
                raise MisconfigurationException(
                    "LightningCLI's --optimizer built the optimizer before LoRACallback added the adapters, and "
                    "with a learning-rate scheduler they cannot be added afterwards; adapt the model in its "
                    "__init__ (LoRAMixin.apply_lora) or define configure_optimizers over self.lora_parameters()"
                )
            trainer.optimizers[0].add_param_group({"params": missing})
            rank_zero_info(
                f"LoRA: LightningCLI's --optimizer was built before the adapters existed; added their "
                f"{len(missing)} parameters to it, with its settings"
            )
            missing = []
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

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_adapted(pl_module, "validate")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_adapted(pl_module, "test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_adapted(pl_module, "predict")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._disarm()
        if self._installations:  # failed before the run started (restore, strategy setup)
            for installation in reversed(self._installations):
                installation.undo()
            self._installations = []
            self._adapted.discard(id(pl_module))
        _link_companions(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._disarm()
        _link_companions(trainer)

    # ModelCheckpoint runs after every other callback in a hook, so checkpoint links it made are
    # given their companion links in the next hook.

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        _link_companions(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _link_companions(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _link_companions(trainer)
        if self.merge_on_end:
            merge_lora(pl_module)
            rank_zero_info("LoRA: merged the adapters into the model weights")

    # --- logging -------------------------------------------------------------------------------

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning's own monitors (LearningRateMonitor, ThroughputMonitor) ask the same; it has no
        # public equivalent. Nothing is computed and nothing synchronises on other steps.
        if not trainer._logger_connector.should_update_logs:
            return
        adapters = lora_modules(pl_module)
        if self.log_grad_norm:
            per_layer = {name: _grad_norm(layer.adapter_params().values()) for name, layer in adapters.items()}
            norms = [norm for norm in per_layer.values() if norm is not None]
            if norms:
                pl_module.log("lora/grad_norm", torch.nn.utils.get_total_norm(norms), on_step=True, on_epoch=False)
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



def _built_by_lightning_cli(pl_module: pl.LightningModule) -> bool:
    """Whether LightningCLI's ``--optimizer`` replaced ``configure_optimizers`` (it builds the optimizer
    over the model's parameters when the CLI starts, before any adapter exists)."""
    cli = sys.modules.get("lightning.pytorch.cli")
    method = getattr(pl_module.configure_optimizers, "__func__", None)
    return cli is not None and isinstance(method, functools.partial) and method.func is cli.LightningCLI.configure_optimizers


def _checkpoint_links(trainer: pl.Trainer) -> list[str]:
    """The ``last`` checkpoints that ``ModelCheckpoint(save_last="link")`` callbacks keep as links."""
    return [
        callback.last_model_path
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.save_last == "link" and callback.last_model_path
    ]


def _link_companions(trainer: pl.Trainer) -> None:
    if trainer.is_global_zero:
        for link in _checkpoint_links(trainer):
            link_companion(link)


def _grad_norm(params: Any) -> torch.Tensor | None:
    """The 2-norm over the gradients of ``params``, or None if none has a gradient. Sharded gradients
    give the norm over all shards (every rank takes part)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return full_tensor(torch.nn.utils.get_total_norm(grads))

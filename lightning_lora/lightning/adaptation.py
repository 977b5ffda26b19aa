"""Adapting a LightningModule for one run of ``LoRACallback``: when, how often, and the checks before it starts.

Lightning has no hook between ``configure_model`` and checkpoint restore, so :class:`Adaptation`
wraps, on the instances and for that one call, the model's ``configure_model`` (adapt after it, and
under ``ModelParallelStrategy`` also before it where the targets exist already, so adapters are in
place before a ``fully_shard`` there) and, for adapters with their own ``adapter_dtype``, the
precision plugin's ``convert_module`` (so that "*-true" precisions leave them in that dtype). Each
wrapper removes itself when it runs; :meth:`Adaptation.disarm` removes any still in place.

The model is planned once per setup: a second plan follows ``configure_model`` only if it created
modules. The installation is kept: the checks at the start of a stage, the optimizer check and the
logging read the adapters from it instead of walking the model again. Adapters added by a run that
fails before it starts are taken out again (:meth:`Adaptation.undo`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_lora.adapters.base import LoRABase
from lightning_lora.adapters.spec import dtype_name
from lightning_lora.config import LoRAConfig
from lightning_lora.formats.adapter_file import install_file, read_adapter
from lightning_lora.formats.peft import install_peft, is_peft_folder, read_peft
from lightning_lora.naming import sites
from lightning_lora.sharding import broadcast_from_rank0, is_dtensor
from lightning_lora.surgery.apply import Installation, install, quantize_base
from lightning_lora.surgery.plan import AdapterPlan, plan_adapters
from lightning_lora.surgery.state import adapted, tensors_of


class Adaptation:
    """How ``LoRACallback`` adapts its LightningModule: armed in ``setup``, carried out in ``configure_model``.

    Attributes:
        adapters: the model's adapters (clean name -> layer) once adapted, for logging and checks.
        trainable: its fully trainable modules.
    """

    def __init__(self) -> None:
        self.adapters: dict[str, LoRABase] = {}
        self.trainable: dict[str, torch.nn.Module] = {}
        self._armed: list[tuple[object, str, Callable[..., Any]]] = []  # instance wrappers in place
        self._installations: list[Installation] = []  # adapters added by this run, until it starts
        self._summarised: set[int] = set()
        self._checked = False
        self._check: Callable[[dict[str, LoRABase], dict[str, torch.nn.Module]], None] | None = None

    def arm(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        config: LoRAConfig,
        adapter: Loader | None,
        stage: str,
        check: Callable[[dict[str, LoRABase], dict[str, torch.nn.Module]], None] | None = None,
    ) -> None:
        """Wrap ``pl_module.configure_model`` (and the precision plugin's ``convert_module``) for this run.

        Args:
            adapter: installs an adapter already read, to start from (first time only; see :func:`read_stored`).
            check: called with the adapters and fully trained modules each time the model is adapted.
        """
        self.disarm()
        self._checked = False
        self._check = check
        configure_model: Callable[[], None] = pl_module.configure_model
        sharding = isinstance(trainer.strategy, ModelParallelStrategy)

        def configure_model_then_adapt() -> None:
            # Under ModelParallelStrategy, adapt first where the targets exist already: configure_model
            # shards the model (fully_shard), and adapters added after that would never be
            # synchronised. Then (or only) after it, where it created the layers (refused if it
            # sharded them).
            self.disarm(configure_model_then_adapt)
            plan = _plan_or_none(pl_module, config) if sharding else None
            if plan is not None:
                self._adapt(pl_module, config, adapter, plan)
                # fully_shard keeps each rank's values: replicas (HSDP) must start from the same adapters
                broadcast_from_rank0(self._adapter_parameters(), trainer.strategy.root_device)
            configure_model()
            if plan is None:
                self._adapt(pl_module, config, adapter, None)
            elif _overrides_configure_model(pl_module) and set(sites(pl_module)) != set(plan.sites or {}):
                self._adapt(pl_module, config, None, None)  # configure_model created modules: plan them too
            merged = [layer for layer in self.adapters.values() if layer.merged]
            if stage == "fit" and merged:
                for layer in merged:
                    layer.unmerge()
                rank_zero_info("LoRA: adapters were merged; unmerged them to train")

        self._wrap(pl_module, "configure_model", configure_model_then_adapt)
        if config.adapter_dtype is not None:
            plugin = trainer.strategy.precision_plugin
            convert: Callable[[torch.nn.Module], torch.nn.Module] = plugin.convert_module

            def convert_keeping_adapter_dtype(module: torch.nn.Module) -> torch.nn.Module:
                # "*-true" precisions cast the whole model; adapters asked for in another dtype
                # (float32 masters of a bfloat16 model) get their own tensors back, untouched
                self.disarm(convert_keeping_adapter_dtype)
                kept = [(p, p.data) for p in self._adapter_parameters()]
                converted = convert(module)
                for param, data in kept:
                    if param.dtype != data.dtype:
                        param.data = data.to(param.device)
                return converted

            self._wrap(plugin, "convert_module", convert_keeping_adapter_dtype)

    def disarm(self, only: Callable[..., Any] | None = None) -> None:
        """Remove the instance wrappers of :meth:`arm` (or only ``only``) still in place, and nothing else."""
        for owner, name, wrapper in list(self._armed):
            if only is None or wrapper is only:
                if vars(owner).get(name) is wrapper:
                    del vars(owner)[name]
                self._armed.remove((owner, name, wrapper))

    def undo(self, pl_module: pl.LightningModule) -> None:
        """Take out the adapters this run added, if it failed before it started (restore, strategy setup)."""
        self.disarm()
        for installation in reversed(self._installations):
            installation.undo()
        if self._installations:
            self._summarised.discard(id(pl_module))
            self.adapters, self.trainable = {}, {}
        self._installations = []

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, adapter_dtype: str | None) -> None:
        """At the start of ``stage``: the model must have adapters (never silently unadapted), in the
        dtype asked for, and sharded with the model. Once per run.

        Raises:
            MisconfigurationException: saying what went wrong and the fix.
        """
        if self._checked:
            return
        self.disarm()
        self._installations = []  # the run has started: its adapters are kept whatever happens
        if not self.adapters:  # configure_model did not run through the Trainer: find them
            self.adapters, self.trainable = adapted(pl_module)
        if not self.adapters:
            raise MisconfigurationException(
                f"LoRACallback: the model reached {stage} without LoRA adapters (its configure_model was not "
                f"called through the Trainer after setup), so it would {'train every weight' if stage == 'fit' else 'run unadapted'}; "
                f"let the Trainer call configure_model, or adapt the model yourself with lightning_lora.apply_lora"
            )
        cast = {dtype_name(p.dtype) for p in self._adapter_parameters()} - {adapter_dtype}
        if adapter_dtype is not None and cast:
            raise MisconfigurationException(
                f"the adapters were asked for in adapter_dtype={adapter_dtype!r} but are {sorted(cast)} now: the "
                f"strategy cast them with the whole model (a '*-true' precision under ModelParallelStrategy); "
                f"keep precision='32-true' and give fully_shard a MixedPrecisionPolicy(param_dtype=torch.bfloat16)"
            )
        if isinstance(trainer.strategy, ModelParallelStrategy):
            tensors = tensors_of(self.adapters, self.trainable).items()
            plain = [name for name, p in tensors if isinstance(p, torch.nn.Parameter) and not is_dtensor(p)]
            if plain and any(is_dtensor(p) for p in pl_module.parameters()):
                raise MisconfigurationException(
                    f"LoRA parameters {plain[:5]!r} are plain tensors in a sharded model, so FSDP would not "
                    f"synchronise them and every rank would train its own; call fully_shard on the root "
                    f"module too (after the blocks) in configure_model"
                )
        self._checked = True

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """What LoRA training updates: the adapters' parameters, then those of the trainable modules."""
        yield from self._adapter_parameters()
        for module in self.trainable.values():
            yield from module.parameters()

    def _adapter_parameters(self) -> Iterator[torch.nn.Parameter]:
        for layer in self.adapters.values():
            yield from layer.adapter_params().values()

    def _wrap(self, owner: object, name: str, wrapper: Callable[..., Any]) -> None:
        vars(owner)[name] = wrapper
        self._armed.append((owner, name, wrapper))

    def _adapt(
        self,
        pl_module: pl.LightningModule,
        config: LoRAConfig,
        adapter: Loader | None,
        plan: AdapterPlan | None,
    ) -> None:
        """Install ``plan`` (planned now if None), or the first time, from ``adapter`` if the model has none."""
        if adapter is not None and id(pl_module) not in self._summarised and not adapted(pl_module)[0]:
            if config.quantize is not None:  # the file's base was quantized: so must this one be
                trainable = (plan or plan_adapters(pl_module, config)).trainable
                quantize_base(pl_module, config.quantize, trainable)
            self._record(pl_module, adapter(pl_module))
        else:
            self._record(pl_module, install(pl_module, plan or plan_adapters(pl_module, config)))

    def _record(self, pl_module: pl.LightningModule, installation: Installation) -> None:
        self._installations.append(installation)
        self.adapters, self.trainable = installation.adapters, installation.trainable
        if self._check is not None:
            self._check(self.adapters, self.trainable)
        if id(pl_module) not in self._summarised:
            self._summarised.add(id(pl_module))
            rank_zero_info(str(installation.summary))


#: Installs a stored adapter into a LightningModule (see :func:`read_stored`).
Loader = Callable[[torch.nn.Module], Installation]


def read_stored(path: str, root: str | None) -> tuple[LoRAConfig, Loader]:
    """Read an adapter file or PEFT adapter folder to start from: its settings, and what installs it.

    Its module names are found under ``root``, or where they fit (the LightningModule itself, the
    transformers model or child it holds: see :func:`~lightning_lora.formats.adapter_file.locate_root`).
    """
    if is_peft_folder(path):
        peft = read_peft(path)
        return peft.settings(), lambda module: install_peft(module, peft, root)
    stored = read_adapter(path)
    return stored.config, lambda module: install_file(module, stored, path, root=root)


def check_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule, parameters: list[torch.nn.Parameter]) -> None:
    """At fit start: the optimizers must hold every LoRA parameter; a warning if they hold frozen ones.

    LightningCLI's ``--optimizer`` builds the optimizer before any adapter exists: the adapters are
    then added to it (with its settings), unless a scheduler makes that impossible.

    Raises:
        MisconfigurationException: naming how many parameters are missing and how to build the optimizer.
    """
    if not trainer.optimizers:
        return
    held = [p for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]]
    held_ids = {id(p) for p in held}
    missing = [p for p in parameters if id(p) not in held_ids]
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
            f"the optimizer does not hold {len(missing)} of the {len(parameters)} LoRA parameters, so they "
            f"would never train; build it over self.lora_parameters() (or lightning_lora.lora_parameters"
            f"(self)) in configure_optimizers"
        )
    frozen = len({id(p) for p in held if not p.requires_grad})
    if frozen:
        rank_zero_warn(
            f"the optimizer holds {frozen} frozen parameters; they get no gradient and are skipped, but "
            f"build it over self.lora_parameters() to save its memory"
        )


def _plan_or_none(pl_module: pl.LightningModule, config: LoRAConfig) -> AdapterPlan | None:
    """The plan of the model as it is (before ``configure_model``), or None where the targets do not exist yet."""
    try:
        return plan_adapters(pl_module, config)
    except ValueError:  # e.g. its layers are created in configure_model; planned after it
        return None


def _overrides_configure_model(pl_module: pl.LightningModule) -> bool:
    return type(pl_module).configure_model is not pl.LightningModule.configure_model


def _built_by_lightning_cli(pl_module: pl.LightningModule) -> bool:
    """Whether LightningCLI's ``--optimizer`` replaced ``configure_optimizers`` (it builds the optimizer
    over the model's parameters when the CLI starts, before any adapter exists)."""
    cli = sys.modules.get("lightning.pytorch.cli")
    method = getattr(pl_module.configure_optimizers, "__func__", None)
    return cli is not None and isinstance(method, functools.partial) and method.func is cli.LightningCLI.configure_optimizers

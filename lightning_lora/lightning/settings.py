"""``LoRACallback``'s settings: its arguments validated, and the Trainers it refuses.

The callback's arguments are the fields of :class:`~lightning_lora.LoRAConfig` plus
:data:`CALLBACK_ARGUMENTS`; :func:`callback_settings` checks them all when the callback is built (no
file is read then) and :func:`check_trainer` checks the Trainer in ``setup``, each with one error
that names the setting and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_lora.adapters.base import LoRABase
from lightning_lora.adapters.spec import boolean
from lightning_lora.config import LoRAConfig, explicit_settings
from lightning_lora.formats.peft import TARGETS
from lightning_lora.formats.vllm import check_vllm
from lightning_lora.lightning.spawn import check_spawn, is_spawned

#: Sharded strategies the callback refuses: ``ModelParallelStrategy`` (FSDP2) is the sharded path.
UNSUPPORTED_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy)
#: The arguments that are not ``LoRAConfig`` fields.
CALLBACK_ARGUMENTS = (
    "adapter_path",
    "adapter_root",
    "save_base_weights",
    "log_grad_norm",
    "log_per_layer",
    "merge_on_end",
    "export_peft",
)


@dataclass(frozen=True)
class CallbackSettings:
    """The validated arguments of a ``LoRACallback`` (see its docstring for each).

    Attributes:
        config: the LoRA settings (replaced in ``setup`` by those stored with ``adapter_path``).
        explicit: the LoRA settings given explicitly (other than the defaults), which a stored
            adapter must not contradict.
    """

    config: LoRAConfig
    explicit: dict[str, Any]
    adapter_path: str | None
    adapter_root: str | None
    save_base_weights: bool
    log_grad_norm: bool
    log_per_layer: bool
    merge_on_end: bool
    export_peft: str | None


def callback_settings(fields: dict[str, Any], config: LoRAConfig | None, **arguments: Any) -> CallbackSettings:
    """Validate a callback's arguments: ``fields`` (the ``LoRAConfig`` fields), ``config`` and the others.

    Raises:
        TypeError, ValueError: for a bad argument, naming it.
    """
    explicit = explicit_settings(fields)
    if config is not None:
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
        if explicit:
            raise ValueError(f"pass either config or the separate arguments, not both (also got {sorted(explicit)!r})")
        explicit = explicit_settings(config.to_dict())
    adapter_path = arguments["adapter_path"]
    if adapter_path is not None and not isinstance(adapter_path, (str, os.PathLike)):
        raise TypeError(f"adapter_path must be a path or None, got {adapter_path!r} ({type(adapter_path).__name__})")
    adapter_root = arguments["adapter_root"]
    if adapter_root is not None and not isinstance(adapter_root, str):
        raise TypeError(f"adapter_root must be a module name (e.g. 'model') or None, got {adapter_root!r} ({type(adapter_root).__name__})")
    if adapter_root is not None and adapter_path is None:
        raise ValueError(f"adapter_root={adapter_root!r} names where adapter_path's modules are, but adapter_path is None")
    config = LoRAConfig(**fields) if config is None else config
    merge_on_end = boolean("merge_on_end", arguments["merge_on_end"])
    if merge_on_end and config.quantize is not None:
        raise ValueError(
            f"merge_on_end=True cannot merge into a quantized base (quantize={config.quantize!r}): "
            f"merging would requantize it; call lightning_lora.merge_and_unload(model) after fit for a float model"
        )
    export_peft = arguments["export_peft"]
    if export_peft not in (None, *TARGETS):
        raise ValueError(f"export_peft must be None, 'peft' or 'vllm', got {export_peft!r}")
    if export_peft == "vllm" and (config.use_dora or config.bias is True):
        setting = "use_dora=True" if config.use_dora else "bias=True"
        raise ValueError(
            f"export_peft='vllm' cannot serve adapters made with {setting}: vLLM serves no "
            f"{'DoRA adapters' if config.use_dora else 'LoRA biases'}; use export_peft='peft', or leave {setting} out"
        )
    return CallbackSettings(
        config=config,
        explicit=explicit,
        adapter_path=None if adapter_path is None else str(adapter_path),
        adapter_root=adapter_root,
        save_base_weights=boolean("save_base_weights", arguments["save_base_weights"]),
        log_grad_norm=boolean("log_grad_norm", arguments["log_grad_norm"]),
        log_per_layer=boolean("log_per_layer", arguments["log_per_layer"]),
        merge_on_end=merge_on_end,
        export_peft=export_peft,
    )


def check_trainer(
    trainer: pl.Trainer, pl_module: pl.LightningModule, settings: CallbackSettings, owned: Callable[[], bool]
) -> None:
    """Refuse the Trainers the callback cannot serve; ``owned()``: no other ``LoRACallback`` is attached.

    Raises:
        MisconfigurationException: saying what to use instead.
    """
    strategy = trainer.strategy
    if isinstance(strategy, UNSUPPORTED_STRATEGIES):
        raise MisconfigurationException(
            f"LoRACallback supports single-device, DDP and ModelParallelStrategy (FSDP2) strategies, got "
            f"{type(strategy).__name__}; to shard the model use "
            f"ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1) and call fully_shard in "
            f"configure_model, or use strategy='ddp' if the model fits once per device"
        )
    if isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)
        tensor_parallel = strategy.num_processes if tensor_parallel == "auto" else tensor_parallel
        if tensor_parallel != 1:
            raise MisconfigurationException(
                f"LoRACallback does not support tensor parallelism (ModelParallelStrategy with "
                f"tensor_parallel_size={tensor_parallel}): its adapters are not sharded to match a Colwise/Rowwise "
                f"base. Supported layouts: data parallel (strategy='ddp'), FSDP2 "
                f"(ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)) and HSDP (fully_shard over "
                f"a 2-D replicate x shard mesh, tensor_parallel_size=1)"
            )
    if isinstance(strategy, ModelParallelStrategy) and settings.export_peft is not None:
        raise MisconfigurationException(
            f"export_peft={settings.export_peft!r} is not available with ModelParallelStrategy; convert a "
            f"checkpoint's companion adapter file afterwards: lightning-lora export-peft ADAPTER OUT_DIR"
        )
    if not owned():
        raise MisconfigurationException(
            "the Trainer has more than one LoRACallback; pass one (its config can list every target)"
        )
    callbacks = getattr(trainer, "callbacks", [])  # set by the Trainer at init; untyped
    averaging = [type(c).__name__ for c in callbacks if isinstance(c, (WeightAveraging, StochasticWeightAveraging))]
    if averaging and settings.config.quantize is not None:
        raise MisconfigurationException(
            f"quantize={settings.config.quantize!r} cannot be combined with {averaging[0]}: torch's AveragedModel "
            f"averages every parameter, the frozen 4-bit base weights too, and those support no arithmetic; "
            f"train without it, or with quantize=None"
        )
    if is_spawned(strategy):
        check_spawn(pl_module, settings.config, settings.merge_on_end, settings.adapter_path, type(strategy).__name__)


def check_export(export_peft: str | None, adapters: Mapping[str, LoRABase], trainable: Mapping[str, nn.Module]) -> None:
    """Right after the model is adapted: refuse adapters that the export asked for cannot hold, before training.

    Raises:
        MisconfigurationException: naming the modules and the fix.
    """
    if export_peft != "vllm":
        return
    try:
        check_vllm(
            {name: adapter.spec for name, adapter in adapters.items()},
            {name: list(module.state_dict()) for name, module in trainable.items()},
            [name for name, adapter in adapters.items() if adapter.spec.bias],
        )
    except ValueError as err:
        raise MisconfigurationException(f"export_peft='vllm' would fail at the first checkpoint: {err}") from err

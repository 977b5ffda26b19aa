"""What an adapted model holds: its adapters, trainable modules, LoRA tensors and base weights.

Adapters are found by type (:class:`~lightning_lora.adapters.LoRABase`), never by name, and fully
trainable modules by a mark they carry (:data:`TRAINABLE_MARK`), so both are found from any module
that holds them: an adapter file saved from a LightningModule's ``self.model`` keeps its trained head.
An adapted model remembers, on itself, the config it was adapted with (:data:`CONFIG_ATTR`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora.adapters.base import LoRABase
from lightning_lora.config import LoRAConfig
from lightning_lora.naming import is_inside, sites, walk
from lightning_lora.sharding import full_tensor

#: Attribute that marks a module an adaptation keeps fully trainable (a task head).
TRAINABLE_MARK = "_lora_trainable"
#: Attribute under which an adapted model keeps the config it was adapted with.
CONFIG_ATTR = "_lora_config"
#: Attribute under which each adapter keeps the modules trained fully with it (name in the model it was
#: adapted in -> module), so that saving from a submodule can tell when one of them lies outside it.
PEERS_ATTR = "_lora_trained_with"


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config of the last adaptation of ``model``, or None if it was never adapted."""
    return getattr(model, CONFIG_ATTR, None)


def lora_modules(model: nn.Module) -> dict[str, LoRABase]:
    """Clean name -> adapter layer, for every adapter in ``model`` (selected by type)."""
    return {name: site.module for name, site in sites(model).items() if isinstance(site.module, LoRABase)}


def merged_modules(model: nn.Module) -> list[str]:
    """The clean names of the adapters in ``model`` that are merged into their original weights."""
    return [name for name, adapter in lora_modules(model).items() if adapter.merged]


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Clean name -> module, for the modules an adapted ``model`` keeps fully trainable."""
    return adapted(model)[1]


def is_trainable(module: nn.Module) -> bool:
    """Whether an adaptation keeps ``module`` fully trainable."""
    return bool(vars(module).get(TRAINABLE_MARK, False))


def mark_trainable(module: nn.Module, trainable: bool) -> None:
    """Mark (or unmark) ``module`` as kept fully trainable, in place."""
    if trainable:
        object.__setattr__(module, TRAINABLE_MARK, True)
    else:
        vars(module).pop(TRAINABLE_MARK, None)


def trained_with(adapter: LoRABase) -> dict[str, nn.Module]:
    """The modules trained fully together with ``adapter`` (name in the model it was adapted in -> module)."""
    return dict(vars(adapter).get(PEERS_ATTR, {}))


def set_trained_with(adapter: LoRABase, peers: Mapping[str, nn.Module] | None) -> None:
    """Record (or, with None, forget) the modules trained fully together with ``adapter``."""
    if peers is None:
        vars(adapter).pop(PEERS_ATTR, None)
    else:
        object.__setattr__(adapter, PEERS_ATTR, dict(peers))


def adapted(model: nn.Module) -> tuple[dict[str, LoRABase], dict[str, nn.Module]]:
    """:func:`lora_modules` and :func:`trainable_modules` of ``model``, from one walk."""
    found = sites(model)
    adapters = {name: site.module for name, site in found.items() if isinstance(site.module, LoRABase)}
    trainable = {name: site.module for name, site in found.items() if is_trainable(site.module)}
    return adapters, trainable


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """What LoRA training updates: adapter parameters, then those of ``trainable`` modules."""
    for adapter in lora_modules(model).values():
        yield from adapter.adapter_params().values()
    for module in trainable_modules(model).values():
        yield from module.parameters()


def lora_tensors(model: nn.Module, include_trainable: bool = True) -> dict[str, torch.Tensor]:
    """Key -> the live parameter or buffer behind each entry of :func:`lora_state_dict`."""
    adapters, trainable = adapted(model)
    return tensors_of(adapters, trainable if include_trainable else {})


def tensors_of(adapters: dict[str, LoRABase], trainable: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """:func:`lora_tensors` of the given adapters and trainable modules (clean name -> module)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        for key, param in adapter.adapter_params().items():
            tensors[f"{name}.{key}"] = param
    for name, module in trainable.items():
        named: dict[str, torch.Tensor] = dict(module.named_parameters())
        named.update(dict(module.named_buffers()))
        for key in module.state_dict():
            tensors[f"{name}.{key}"] = named[key]
    return tensors


def lora_state_dict(model: nn.Module, include_trainable: bool = True) -> dict[str, torch.Tensor]:
    """Adapter tensors (and, by default, the ``trainable`` modules' tensors) under clean names.

    Keys are ``<module>.matrix_A.weight`` and so on, free of ``module.``, ``_orig_mod.`` and FSDP
    prefixes; tensors are selected by module type, never by name. Base weights are never included.
    Tensors of a sharded model are gathered whole (every rank must call this then).
    """
    return {key: full_tensor(tensor.detach()) for key, tensor in lora_tensors(model, include_trainable).items()}


def base_named_parameters(
    model: nn.Module, trainable: Iterable[str] | None = None
) -> Iterator[tuple[str, nn.Parameter]]:
    """The frozen base weights under the names they had before adaptation.

    Adapter parameters and those of ``trainable`` modules (default: the model's own) are left out;
    ``<m>.original_module.weight`` is named ``<m>.weight``, so a model gives the same names before
    and after :func:`~lightning_lora.apply_lora`.
    """
    left_out = tuple(trainable_modules(model) if trainable is None else trainable)
    seen: set[int] = set()
    for site in walk(model, base_view=True):
        if is_inside(site.name, left_out) or isinstance(site.module, LoRABase):  # an adapter's own: DoRA's magnitude
            continue
        for key, param in site.module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{site.name}.{key}" if site.name else key), param


@dataclass(frozen=True)
class LoRASummary:
    """Adapted modules, fully trained modules and parameter counts of a model.

    Attributes:
        task_heads: the fully trained modules that are a transformers model's new task head, trained
            because no ``trainable`` was given, each with the model's class name.
    """

    modules: list[str]
    trainable: int
    total: int
    trained_fully: list[str] = field(default_factory=list)
    task_heads: Mapping[str, str] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        text = (
            f"LoRA: {len(self.modules)} adapted modules, trainable params {self.trainable:,} "
            f"of {self.total:,} ({self.percent:.2f}%)"
        )
        if self.trained_fully:
            text += f"; trained fully: {', '.join(self.trained_fully)}"
        if self.task_heads:
            models = sorted(set(self.task_heads.values()))
            text += f" (the new task head of {', '.join(models)}, as PEFT's task_type; trainable=[] freezes it)"
        return text


def lora_summary(model: nn.Module) -> LoRASummary:
    """Adapted module names, trainable and total parameter counts (each tensor counted once)."""
    return summary_of(list(lora_modules(model)), list(model.parameters()), list(trainable_modules(model)))


def summary_of(
    modules: list[str],
    params: list[nn.Parameter],
    trained_fully: Iterable[str] = (),
    task_heads: Mapping[str, str] | None = None,
) -> LoRASummary:
    """The :class:`LoRASummary` of adapted ``modules``, fully trained modules and a model's parameters
    (each listed once)."""
    return LoRASummary(
        modules=modules,
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        trained_fully=list(trained_fully),
        task_heads=dict(task_heads or {}),
    )

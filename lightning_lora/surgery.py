"""Model surgery: wrap the targeted modules in adapters, freeze the rest, merge, unload.

Functions here change the model in place and say so. Each either succeeds or leaves the model
exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.layers import MERGE_TOLERANCE, LoRALayer, adapter_class, adapter_from_spec
from lightning_lora.targets import ALL_LINEAR, select, walk

# Attribute names under which a model keeps its LoRA bookkeeping (plain Python attributes).
_CONFIG_ATTR = "_lora_config"
_TRAINABLE_ATTR = "_lora_trainable"


@dataclass(frozen=True)
class _Site:
    """Where a module lives: its clean name, the module, and how its parent holds it."""

    name: str
    module: nn.Module
    parent: nn.Module | None
    attribute: str


def _sites(model: nn.Module) -> dict[str, _Site]:
    """Clean name -> site for every module outside adapters (an adapter itself included)."""
    sites: dict[str, _Site] = {}
    adapters: list[str] = []
    for name, module, parent, attribute in walk(model):
        if any(name.startswith(prefix + ".") for prefix in adapters):
            continue
        if isinstance(module, LoRALayer):
            adapters.append(name)
        sites[name] = _Site(name, module, parent, attribute)  # the innermost of stacked wrappers wins
    sites.pop("", None)
    return sites


def _is_attention_out_proj(site: _Site) -> bool:
    return isinstance(site.parent, nn.MultiheadAttention) and site.attribute == "out_proj"


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> list[str]:
    """Wrap every module matched by ``config.targets`` in an adapter, in place, and freeze the rest.

    All parameters are frozen except the adapters' and those of ``config.trainable`` modules.
    Already adapted modules are skipped when their settings agree with ``config``.

    Args:
        model: the model to adapt (modified in place).
        config: what to adapt and how (default: ``LoRAConfig()``).

    Returns:
        The clean names of the adapted modules, in model order.

    Raises:
        TypeError: if ``config`` is not a ``LoRAConfig``, or a target is of an unsupported type.
        ValueError: if a pattern matches nothing (with the closest names), or an adapted module was
            adapted with other settings. On any error the model is left exactly as it was.
    """
    if config is None:
        config = LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    sites = _sites(model)
    names = list(sites)
    trainable = select("trainable", config.trainable, names)
    inside_trainable = {n for n in names if any(n == t or n.startswith(t + ".") for t in trainable)}
    linear = [
        n
        for n, site in sites.items()
        if n not in inside_trainable
        and not _is_attention_out_proj(site)
        and (isinstance(site.module, nn.Linear) or getattr(site.module, "kind", "") == "linear")
    ]
    chosen = select("targets", config.targets, names, linear)
    excluded = set(select("exclude", config.exclude, names))
    targets = [n for n in chosen if n not in excluded]
    if not targets:
        raise ValueError(f"exclude {config.exclude!r} removed every module matched by targets {config.targets!r}")
    overlap = [n for n in targets if n in inside_trainable]
    if overlap:
        raise ValueError(f"modules {overlap!r} are matched by both targets and trainable; choose one")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name)
        select(field_name, patterns, targets)

    new: dict[str, LoRALayer] = {}
    for name in targets:
        site = sites[name]
        if _is_attention_out_proj(site):
            raise TypeError(
                f"cannot adapt module '{name}': nn.MultiheadAttention reads out_proj's weight directly, "
                f"so an adapter there would have no effect"
            )
        spec = {
            "r": config.rank_for(name),
            "alpha": config.alpha_for(name),
            "bias": config.bias,
            "dropout": config.dropout,
            "use_rslora": config.use_rslora,
        }
        if isinstance(site.module, LoRALayer):
            existing = site.module.lora_spec()
            wanted = {**spec, "adapter_dtype": config.adapter_dtype or existing["adapter_dtype"]}
            differs = {k: (existing[k], v) for k, v in wanted.items() if existing[k] != v}
            if differs:
                detail = ", ".join(f"{k}={old!r} (now {new_!r})" for k, (old, new_) in differs.items())
                raise ValueError(f"module '{name}' is already adapted with other settings: {detail}")
            continue
        cls = adapter_class(site.module, name)
        try:
            new[name] = cls(site.module, **spec, adapter_dtype=config.adapter_dtype)
        except ValueError as err:
            raise ValueError(f"cannot adapt module '{name}': {err}") from err
    _check_untied({name: new.get(name, sites[name].module) for name in targets})
    known = getattr(model, _TRAINABLE_ATTR, [])
    _install(model, new, config, known + [t for t in trainable if t not in known])
    return targets


def _check_untied(adapters: dict[str, LoRALayer]) -> None:
    owners: dict[int, str] = {}
    for name, module in adapters.items():
        weight = module.original_module.weight
        if id(weight) in owners:
            raise ValueError(
                f"modules '{owners[id(weight)]}' and '{name}' share one weight (tied weights); "
                f"adapt only one of them"
            )
        owners[id(weight)] = name


def _freeze(model: nn.Module) -> None:
    model.requires_grad_(False)
    for adapter in lora_modules(model).values():
        adapter.matrix_A.requires_grad_(True)
        adapter.matrix_B.requires_grad_(True)
    for module in _trainable_modules(model).values():
        module.requires_grad_(True)


def _trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    wanted = getattr(model, _TRAINABLE_ATTR, [])
    if not wanted:
        return {}
    sites = _sites(model)
    return {name: sites[name].module for name in wanted if name in sites}


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config of the last :func:`apply_lora` on ``model``, or None if it was never adapted."""
    return getattr(model, _CONFIG_ATTR, None)


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """Clean name -> adapter layer, for every adapter in ``model`` (selected by type)."""
    return {name: site.module for name, site in _sites(model).items() if isinstance(site.module, LoRALayer)}


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """What LoRA training updates: adapter parameters, then those of ``trainable`` modules."""
    for adapter in lora_modules(model).values():
        yield from adapter.matrix_A.parameters()
        yield from adapter.matrix_B.parameters()
    for module in _trainable_modules(model).values():
        yield from module.parameters()


def lora_state_dict(model: nn.Module, include_trainable: bool = True) -> dict[str, torch.Tensor]:
    """Adapter tensors (and, by default, the ``trainable`` modules' tensors) under clean names.

    Keys are ``<module>.matrix_A.weight`` and so on, free of ``module.``, ``_orig_mod.`` and FSDP
    prefixes; tensors are selected by module type, never by name. Base weights are never included.
    """
    state: dict[str, torch.Tensor] = {}
    for name, adapter in lora_modules(model).items():
        for part in ("matrix_A", "matrix_B"):
            for key, tensor in getattr(adapter, part).state_dict().items():
                state[f"{name}.{part}.{key}"] = tensor
    if include_trainable:
        for name, module in _trainable_modules(model).items():
            for key, tensor in module.state_dict().items():
                state[f"{name}.{key}"] = tensor
    return state


def base_named_parameters(
    model: nn.Module, trainable: Iterable[str] | None = None
) -> Iterator[tuple[str, nn.Parameter]]:
    """The frozen base weights under the names they had before adaptation.

    Adapter parameters and those of ``trainable`` modules (default: the model's own) are left out;
    ``<m>.original_module.weight`` is named ``<m>.weight``, so a model gives the same names before
    and after :func:`apply_lora`.
    """
    trainable = tuple(_trainable_modules(model) if trainable is None else trainable)
    seen: set[int] = set()
    for name, module, _, _ in walk(model, base_view=True):
        if any(name == t or name.startswith(t + ".") for t in trainable):
            continue
        for key, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{name}.{key}" if name else key), param


def merge_lora(model: nn.Module, tolerance: float = MERGE_TOLERANCE) -> None:
    """Merge every adapter into its original weights, in place (see :meth:`LoRA.merge`).

    Raises:
        RuntimeError: if an adapter is already merged or would merge with more than ``tolerance``
            error; ``ValueError`` if an adapted weight is tied to another module. The model is left
            unmerged on error.
    """
    adapters = lora_modules(model)
    _check_not_shared(model, adapters)
    done: list[LoRALayer] = []
    try:
        for name, adapter in adapters.items():
            try:
                adapter.merge(tolerance)
            except RuntimeError as err:
                raise RuntimeError(f"cannot merge module '{name}': {err}") from err
            done.append(adapter)
    except RuntimeError:
        for adapter in done:
            adapter.unmerge()
        raise


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter's update out of its original weights again, in place.

    Raises:
        RuntimeError: if an adapter is not merged (nothing is changed then).
    """
    adapters = lora_modules(model)
    unmerged = [name for name, adapter in adapters.items() if not adapter.merged]
    if unmerged:
        raise RuntimeError(f"cannot unmerge: modules {unmerged[:5]!r} are not merged")
    for adapter in adapters.values():
        adapter.unmerge()


def merge_and_unload(model: nn.Module, tolerance: float = MERGE_TOLERANCE) -> nn.Module:
    """Merge every adapter and put each original module back in its place, in place.

    The result has the module classes and ``state_dict`` keys of the model before
    :func:`apply_lora` and loads into that architecture with ``strict=True``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if an adapter's bias would need a bias the original layer does not have (it
            could not be stored in the original architecture); use ``bias=False`` for such layers.
        RuntimeError: as :func:`merge_lora`. The model is unchanged on error.
    """
    sites = _sites(model)
    adapters = {name: site.module for name, site in sites.items() if isinstance(site.module, LoRALayer)}
    needs_bias = [
        name
        for name, adapter in adapters.items()
        if adapter.delta_bias() is not None and (adapter.original_module.bias is None or adapter._created_bias)
    ]
    if needs_bias:
        raise ValueError(
            f"cannot unload modules {needs_bias[:5]!r}: their adapters have a bias but the original "
            f"layers have none, so the merged model would not fit the original architecture; adapt "
            f"them with bias=False, or keep the adapters and call merge_lora()"
        )
    if any(not adapter.merged for adapter in adapters.values()):
        if any(adapter.merged for adapter in adapters.values()):
            raise RuntimeError("some adapters are merged and some are not; unmerge_lora() first")
        merge_lora(model, tolerance)
    for name, adapter in adapters.items():
        site = sites[name]
        setattr(site.parent, site.attribute, adapter.original_module)
    for attr in (_CONFIG_ATTR, _TRAINABLE_ATTR):
        if attr in vars(model):
            object.__delattr__(model, attr)
    return model


def _check_not_shared(model: nn.Module, adapters: dict[str, LoRALayer]) -> None:
    """Refuse to merge a weight that another module also uses (tied embeddings and heads)."""
    users: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    for name, adapter in adapters.items():
        holders = users.get(id(adapter.original_module.weight), [])
        if len(holders) > 1:
            raise ValueError(
                f"cannot merge module '{name}': its weight is shared with {holders!r} (tied weights), "
                f"so merging would change the other module too"
            )


@dataclass(frozen=True)
class LoRASummary:
    """Adapted modules and parameter counts of a model."""

    modules: list[str]
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"LoRA: {len(self.modules)} adapted modules, trainable params {self.trainable:,} "
            f"of {self.total:,} ({self.percent:.2f}%)"
        )


def lora_summary(model: nn.Module) -> LoRASummary:
    """Adapted module names, trainable and total parameter counts (each tensor counted once)."""
    params = list(model.parameters())
    return LoRASummary(
        modules=list(lora_modules(model)),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def _apply_specs(model: nn.Module, specs: dict[str, dict[str, Any]]) -> dict[str, LoRALayer]:
    """Build (without installing) adapters for ``specs`` (clean name -> ``lora_spec()``).

    Raises:
        ValueError: if a named module does not exist. TypeError: if it cannot be adapted.
    """
    sites = _sites(model)
    missing = [name for name in specs if name not in sites]
    if missing:
        raise ValueError(f"the model has no modules named {missing[:5]!r}")
    built = {}
    for name, spec in specs.items():
        adapter_class(sites[name].module, name)
        built[name] = adapter_from_spec(sites[name].module, spec)
    return built


def _install(
    model: nn.Module, adapters: dict[str, LoRALayer], config: LoRAConfig, trainable: list[str]
) -> Callable[[], None]:
    """Put built adapters in place and freeze; returns a function that undoes exactly that."""
    sites = _sites(model)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    previous = {attr: vars(model).get(attr) for attr in (_CONFIG_ATTR, _TRAINABLE_ATTR)}
    for name, adapter in adapters.items():
        site = sites[name]
        setattr(site.parent, site.attribute, adapter)
    object.__setattr__(model, _CONFIG_ATTR, config)
    object.__setattr__(model, _TRAINABLE_ATTR, list(trainable))
    _freeze(model)

    def undo() -> None:
        for name in adapters:
            site = sites[name]
            setattr(site.parent, site.attribute, site.module)
        for param in model.parameters():
            param.requires_grad_(requires_grad[id(param)])
        for attr, value in previous.items():
            if value is None:
                vars(model).pop(attr, None)
            else:
                object.__setattr__(model, attr, value)

    return undo

"""Installing adapters: the one step that changes a model's structure.

:func:`install` carries out an :class:`~lightning_lora.surgery.AdapterPlan` transactionally (every
adapter is built before any is put in place) and returns an :class:`Installation` that can be undone.
It walks the model once, to freeze it; the plan says where each module sits. :func:`apply_lora` is
"plan, then install" (two walks of the model in all); adapter files and checkpoints install the specs
they store. :func:`quantize_base` holds the frozen linear weights in 4 bits (QLoRA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from lightning_lora.adapters.base import AdapterContainer, LoRABase, base_layer, base_weight, build_adapter
from lightning_lora.adapters.registry import parameter_kinds
from lightning_lora.config import LoRAConfig
from lightning_lora.naming import Site, sites
from lightning_lora.quantize import METHODS, quantize_weight, quantized_format
from lightning_lora.sharding import is_dtensor
from lightning_lora.surgery.plan import AdapterPlan, plan_adapters, quantizable, survey, target_base
from lightning_lora.surgery.switches import blocks_open, check_no_block
from lightning_lora.surgery.state import (
    CONFIG_ATTR,
    PEERS_ATTR,
    LoRASummary,
    is_trainable,
    lora_modules,
    mark_trainable,
    set_trained_with,
    summary_of,
    trainable_modules,
)


@dataclass
class Installation:
    """The result of :func:`install`: what was adapted, and how to take it back.

    Attributes:
        names: every module of the plan, in model order (adapted before or by this installation).
        created: the adapters this installation put in place.
        adapters: every adapter of the plan (``names`` -> layer), those adapted before included.
        trainable: the plan's fully trainable modules (clean name -> module).
        summary: the adapted modules and the parameter counts after the installation.
    """

    names: list[str]
    created: dict[str, LoRABase]
    adapters: dict[str, LoRABase]
    trainable: dict[str, nn.Module]
    summary: LoRASummary
    _restore: Callable[[], None] = field(repr=False)

    def undo(self) -> None:
        """Restore the model exactly as it was before :func:`install` (modules, flags, bookkeeping)."""
        self._restore()


def install(model: nn.Module, plan: AdapterPlan) -> Installation:
    """Put the adapters of ``plan`` into ``model``, in place, and freeze everything else.

    Modules already adapted with the planned spec are left as they are. All parameters are frozen
    except the adapters' and those of the plan's trainable modules. New adapters take the train or
    eval mode of the module they wrap. The base weights of the plan's ``quantize`` layers are
    replaced by quantized ones (those already quantized are left as they are).

    Returns:
        An :class:`Installation`; its ``undo()`` restores the model exactly (the original weights
        are kept until the installation is dropped).

    Raises:
        ValueError: if a module is adapted with other settings, a spec does not fit its module, or
            new adapters would go into a model already sharded (``fully_shard``).
        TypeError: if a module cannot take its adapter. ModuleNotFoundError: if quantizing needs
            torchao and it is not installed. On any error the model is unchanged.
    """
    if blocks_open():  # new adapters would run inside a block that promises the base model
        check_no_block(lora_modules(model), "add adapters")
    found = _current_sites(model, plan)
    created: dict[str, LoRABase] = {}
    for name, spec in plan.specs.items():
        site = found[name]
        if isinstance(site.module, LoRABase):
            differences = site.module.spec.differences(spec)
            if differences:
                raise ValueError(f"module '{name}' is already adapted with other settings: {differences!r}")
            continue
        kind = parameter_kinds(site.module).get(site.parameter) if site.parameter else None
        created[name] = build_adapter(target_base(site), spec, name, kind)
        created[name].train(site.module.training)
    params = list(model.parameters())  # the one walk of the model
    if created and any(is_dtensor(param) for param in params):
        raise ValueError(
            f"cannot add adapters to modules {list(created)[:5]!r} of a sharded model: they would be plain "
            f"parameters that FSDP never synchronises, so every rank would train its own; add the adapters "
            f"before fully_shard (call apply_lora(model, config) first in configure_model)"
        )
    quantized = _quantized_weights(found, plan.quantize, plan.config.quantize)

    requires_grad = [(param, param.requires_grad) for param in params]
    previous_config = vars(model).get(CONFIG_ATTR)
    trainable = {name: found[name].module for name in plan.trainable if name in found}
    marked = [module for module in trainable.values() if not is_trainable(module)]

    def undo() -> None:
        for layer, (original, _) in quantized.items():
            layer.weight = original
        for name in reversed(list(created)):
            site = found[name]
            if site.parameter and name not in contained:
                holders[id(site.module)].detach(site.parameter)  # from a container that was there before
            elif not site.parameter:
                site.replace(site.module)
        for site, _ in reversed(contained.values()):
            site.replace(site.module)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        for module in marked:
            mark_trainable(module, False)
        for adapter, peers in previous_peers:
            set_trained_with(adapter, peers)
        if previous_config is None:
            vars(model).pop(CONFIG_ATTR, None)
        else:
            object.__setattr__(model, CONFIG_ATTR, previous_config)

    holders, contained = _place(found, created)
    for layer, (_, weight) in quantized.items():
        layer.weight = weight
    object.__setattr__(model, CONFIG_ATTR, plan.config)
    for module in marked:
        mark_trainable(module, True)
    adapters = {name: created.get(name) or _adapter(found[name]) for name in plan.specs}
    previous_peers = [(adapter, vars(adapter).get(PEERS_ATTR)) for name, adapter in adapters.items() if name not in created]
    for adapter in adapters.values():
        set_trained_with(adapter, trainable)
    _freeze(params, adapters, trainable)
    replaced = {id(original) for original, _ in quantized.values()}
    now = [param for param in params if id(param) not in replaced] + [weight for _, weight in quantized.values()]
    now += [param for adapter in created.values() for param in adapter.adapter_params().values()]
    return Installation(
        names=list(plan.specs),
        created=created,
        adapters=adapters,
        trainable=trainable,
        summary=summary_of(list(plan.specs), now, trainable, plan.task_heads),
        _restore=undo,
    )


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> list[str]:
    """Wrap every module matched by ``config.targets`` in an adapter, in place, and freeze the rest.

    All parameters are frozen except the adapters' and those of ``config.trainable`` modules (by
    default the new task head of a transformers model, as PEFT's ``task_type``). Already adapted
    modules are skipped when their settings agree with ``config``.

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
    plan = plan_adapters(model, LoRAConfig() if config is None else config)
    return install(model, plan).names


def quantize_base(model: nn.Module, method: str = "nf4", trainable: Iterable[str] | None = None) -> list[str]:
    """Hold the frozen linear base weights of ``model`` in 4-bit ``method``, in place (QLoRA).

    :func:`apply_lora` with ``LoRAConfig(quantize="nf4")`` does this itself; call it on a fresh model
    before loading an adapter file or checkpoint trained on a quantized base, which is refused by an
    unquantized one. The layers are those of :func:`lightning_lora.surgery.plan.quantizable`; weights
    already quantized are left as they are, and the new ones do not require grad.

    Args:
        model: the model, adapted or not (modified in place).
        method: ``"nf4"``.
        trainable: modules to leave in their dtype (default: the model's fully trainable modules).

    Returns:
        The names of the quantized layers, in model order.

    Raises:
        ValueError: for an unknown ``method``. ModuleNotFoundError: if torchao is not installed.
            The model is unchanged on error.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    left_out = list(trainable_modules(model)) if trainable is None else list(trainable)
    names = quantizable(model, left_out)
    for layer, (_, weight) in _quantized_weights(sites(model), names, method).items():
        layer.weight = weight
    return names


def _place(
    found: Mapping[str, Site], created: Mapping[str, LoRABase]
) -> tuple[dict[int, AdapterContainer], dict[str, tuple[Site, AdapterContainer]]]:
    """Put the new adapters in place: a module's adapter where the module was, a parameter's adapter into
    the container of its module (one is put where the module was if it has none yet).

    Returns:
        ``id`` of each module whose parameters are adapted -> its container, and the first adapter's
        name -> (the module's site, the container) for each container put in place here.
    """
    holders: dict[int, AdapterContainer] = {}
    contained: dict[str, tuple[Site, AdapterContainer]] = {}
    for name, adapter in created.items():
        site = found[name]
        if not site.parameter:
            site.replace(adapter)
            continue
        holder = holders.get(id(site.module))
        if holder is None:
            if isinstance(site.parent, AdapterContainer) and site.attribute == "original_module":
                holder = site.parent
            else:
                container = type(adapter).container(site.module)
                assert isinstance(container, AdapterContainer), "a kind that adapts parameters has an AdapterContainer"
                container.train(site.module.training)
                site.replace(container)
                contained[name] = (site, container)
                holder = container
            holders[id(site.module)] = holder
        holder.attach(site.parameter, adapter)
    return holders, contained


def _current_sites(model: nn.Module, plan: AdapterPlan) -> Mapping[str, Site]:
    """The plan's sites while each planned module still sits there, else the model's sites now."""
    planned = plan.sites
    wanted = [*plan.specs, *plan.trainable, *plan.quantize]
    if planned is not None and all(
        name in planned and getattr(planned[name].parent, planned[name].attribute, None) is planned[name].module
        for name in wanted
    ):
        return planned
    found = survey(model).targets
    missing = [name for name in plan.specs if name not in found]
    if missing:
        raise ValueError(f"the plan does not fit the model: it has no modules named {missing[:5]!r}")
    return found


def _adapter(site: Site) -> LoRABase:
    assert isinstance(site.module, LoRABase), "a planned module is adapted once installed"
    return site.module


def _freeze(params: list[nn.Parameter], adapters: Mapping[str, LoRABase], trainable: Mapping[str, nn.Module]) -> None:
    for param in params:
        param.requires_grad_(False)
    for adapter in adapters.values():
        for param in adapter.adapter_params().values():
            param.requires_grad_(True)
    for module in trainable.values():
        module.requires_grad_(True)


def _quantized_weights(
    found: Mapping[str, Site], names: Iterable[str], method: str | None
) -> dict[nn.Module, tuple[nn.Parameter, nn.Parameter]]:
    """Layer -> (its weight, a frozen quantized copy), for the layers ``names`` not yet quantized."""
    weights: dict[nn.Module, tuple[nn.Parameter, nn.Parameter]] = {}
    for name in names:
        assert method is not None, "a plan quantizes layers only when its config names a method"
        layer = base_layer(found[name].module)
        weight = base_weight(layer)
        if quantized_format(weight) is None and isinstance(weight, nn.Parameter):
            weights[layer] = (weight, nn.Parameter(quantize_weight(weight, method), requires_grad=False))
    return weights

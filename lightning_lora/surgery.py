"""Model surgery: install planned adapters, freeze the rest, merge, unload, and read adapters back.

:func:`install` is the one step that changes a model's structure: it carries out an
:class:`~lightning_lora.plan.AdapterPlan` transactionally (every adapter is built before any is put in
place) and returns an :class:`Installation` that can be undone. :func:`apply_lora` is "plan, then
install"; adapter files and checkpoints install the specs they store. The other functions find
adapters by type (:func:`lora_modules`) and read or change their state. Functions that change the
model in place say so, and either succeed or leave the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.layers import MERGE_TOLERANCE, LoRABase, base_weight, build_adapter
from lightning_lora.naming import Site, is_inside, sites, walk
from lightning_lora.plan import CONFIG_ATTR, TRAINABLE_ATTR, AdapterPlan, plan_adapters, quantizable
from lightning_lora.quantize import METHODS, dequantize, quantize_weight, quantized_format
from lightning_lora.sharding import full_tensor, is_sharded


@dataclass
class Installation:
    """The result of :func:`install`: what was adapted, and how to take it back.

    Attributes:
        names: every module of the plan, in model order (adapted before or by this installation).
        created: the adapters this installation put in place.
    """

    names: list[str]
    created: dict[str, LoRABase]
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
    found = sites(model)
    created: dict[str, LoRABase] = {}
    for name, spec in plan.specs.items():
        module = found[name].module
        if isinstance(module, LoRABase):
            differences = module.spec.differences(spec)
            if differences:
                raise ValueError(f"module '{name}' is already adapted with other settings: {differences!r}")
            continue
        created[name] = build_adapter(module, spec, name)
        created[name].train(module.training)
    if created and is_sharded(model):
        raise ValueError(
            f"cannot add adapters to modules {list(created)[:5]!r} of a sharded model: they would be plain "
            f"parameters that FSDP never synchronises, so every rank would train its own; add the adapters "
            f"before fully_shard (call apply_lora(model, config) first in configure_model)"
        )
    quantized = _quantized_weights(found, plan.quantize, plan.config.quantize)

    requires_grad = {id(p): (p, p.requires_grad) for p in model.parameters()}
    previous = {attr: vars(model).get(attr) for attr in (CONFIG_ATTR, TRAINABLE_ATTR)}

    def undo() -> None:
        for layer, (original, _) in quantized.items():
            layer.weight = original
        for name in created:
            found[name].replace(found[name].module)
        for param, flag in requires_grad.values():
            param.requires_grad_(flag)
        for attr, value in previous.items():
            if value is None:
                vars(model).pop(attr, None)
            else:
                object.__setattr__(model, attr, value)

    for name, adapter in created.items():
        found[name].replace(adapter)
    for layer, (_, weight) in quantized.items():
        layer.weight = weight
    object.__setattr__(model, CONFIG_ATTR, plan.config)
    object.__setattr__(model, TRAINABLE_ATTR, list(plan.trainable))
    _freeze(model)
    return Installation(names=list(plan.specs), created=created, _restore=undo)


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
    plan = plan_adapters(model, LoRAConfig() if config is None else config)
    return install(model, plan).names


def quantize_base(model: nn.Module, method: str = "nf4", trainable: Iterable[str] | None = None) -> list[str]:
    """Hold the frozen linear base weights of ``model`` in 4-bit ``method``, in place (QLoRA).

    :func:`apply_lora` with ``LoRAConfig(quantize="nf4")`` does this itself; call it on a fresh model
    before loading an adapter file or checkpoint trained on a quantized base, which is refused by an
    unquantized one. The layers are those of :func:`lightning_lora.plan.quantizable`; weights already
    quantized are left as they are, and the new ones do not require grad.

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


def _quantized_weights(
    found: dict[str, Site], names: Iterable[str], method: str | None
) -> dict[nn.Module, tuple[nn.Parameter, nn.Parameter]]:
    """Layer -> (its weight, a frozen quantized copy), for the layers ``names`` not yet quantized."""
    weights: dict[nn.Module, tuple[nn.Parameter, nn.Parameter]] = {}
    for name in names:
        assert method is not None, "a plan quantizes layers only when its config names a method"
        module = found[name].module
        layer = module.original_module if isinstance(module, LoRABase) else module
        weight = base_weight(layer)
        if quantized_format(weight) is None and isinstance(weight, nn.Parameter):
            weights[layer] = (weight, nn.Parameter(quantize_weight(weight, method), requires_grad=False))
    return weights


def _freeze(model: nn.Module) -> None:
    model.requires_grad_(False)
    for adapter in lora_modules(model).values():
        for param in adapter.adapter_params().values():
            param.requires_grad_(True)
    for module in trainable_modules(model).values():
        module.requires_grad_(True)


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Clean name -> module, for the modules an adapted ``model`` keeps fully trainable."""
    wanted = getattr(model, TRAINABLE_ATTR, [])
    if not wanted:
        return {}
    found = sites(model)
    return {name: found[name].module for name in wanted if name in found}


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config of the last adaptation of ``model``, or None if it was never adapted."""
    return getattr(model, CONFIG_ATTR, None)


def lora_modules(model: nn.Module) -> dict[str, LoRABase]:
    """Clean name -> adapter layer, for every adapter in ``model`` (selected by type)."""
    return {name: site.module for name, site in sites(model).items() if isinstance(site.module, LoRABase)}


def merged_modules(model: nn.Module) -> list[str]:
    """The clean names of the adapters in ``model`` that are merged into their original weights."""
    return [name for name, adapter in lora_modules(model).items() if adapter.merged]


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """What LoRA training updates: adapter parameters, then those of ``trainable`` modules."""
    for adapter in lora_modules(model).values():
        yield from adapter.adapter_params().values()
    for module in trainable_modules(model).values():
        yield from module.parameters()


def lora_tensors(model: nn.Module, include_trainable: bool = True) -> dict[str, torch.Tensor]:
    """Key -> the live parameter or buffer behind each entry of :func:`lora_state_dict`."""
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in lora_modules(model).items():
        for key, param in adapter.adapter_params().items():
            tensors[f"{name}.{key}"] = param
    if include_trainable:
        for name, module in trainable_modules(model).items():
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
    and after :func:`apply_lora`.
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


def merge_lora(model: nn.Module, tolerance: float = MERGE_TOLERANCE) -> None:
    """Merge every adapter into its original weights, in place (see :meth:`LoRA.merge`).

    Raises:
        RuntimeError: if an adapter is already merged or would merge with more than ``tolerance``
            error; ``ValueError`` if an adapted weight is tied to another module. The model is left
            unmerged on error.
    """
    adapters = lora_modules(model)
    _check_not_shared(model, adapters)
    done: list[LoRABase] = []
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
    :func:`apply_lora` and loads into that architecture with ``strict=True``. A quantized base
    (``quantize="nf4"``) is dequantized first, every quantized weight to the dtype it was quantized
    from, and the updates are merged into those weights in float32: the result is a float model that
    computes what the adapted quantized one did (up to the merge's rounding), not the original
    full-precision base plus the update. For that, load the adapter file into the full-precision
    model with ``check_base=False`` and merge there.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if an adapter's bias would need a bias the original layer does not have (it
            could not be stored in the original architecture); use ``bias=False`` for such layers.
        RuntimeError: as :func:`merge_lora`. The model is unchanged on error.
    """
    found = sites(model)
    adapters = {name: site.module for name, site in found.items() if isinstance(site.module, LoRABase)}
    needs_bias = [name for name, adapter in adapters.items() if adapter.merge_creates_bias]
    if needs_bias:
        raise ValueError(
            f"cannot unload modules {needs_bias[:5]!r}: their adapters have a bias but the original "
            f"layers have none, so the merged model would not fit the original architecture; adapt "
            f"them with bias=False, or keep the adapters and call merge_lora()"
        )
    merged = merged_modules(model)
    if len(merged) < len(adapters):
        if merged:
            raise RuntimeError("some adapters are merged and some are not; unmerge_lora() first")
        quantized = _quantized_parameters(model)
        for module, key, param in quantized:
            setattr(module, key, nn.Parameter(dequantize(param), requires_grad=param.requires_grad))
        try:
            merge_lora(model, tolerance)
        except (RuntimeError, ValueError):
            for module, key, param in quantized:
                setattr(module, key, param)
            raise
    for name, adapter in adapters.items():
        found[name].replace(adapter.original_module)
    for attr in (CONFIG_ATTR, TRAINABLE_ATTR):
        vars(model).pop(attr, None)
    return model


def _quantized_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, attribute, parameter) for every quantized parameter of ``model``."""
    return [
        (module, key, param)
        for module in model.modules()
        for key, param in module.named_parameters(recurse=False)
        if quantized_format(param) is not None
    ]


def _check_not_shared(model: nn.Module, adapters: dict[str, LoRABase]) -> None:
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


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` on or off, in place: off, each layer runs its original module alone.

    Nothing is merged or copied; for code that cannot use :func:`disable_adapters`.

    Raises:
        TypeError: if ``enabled`` is not a bool. RuntimeError: if adapters are merged (their update is
            in the weights; nothing is changed then).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r} ({type(enabled).__name__})")
    adapters = lora_modules(model)
    merged = merged_modules(model)
    if merged and not enabled:
        raise RuntimeError(f"cannot disable merged adapters {merged[:5]!r}: their update is in the weights; unmerge_lora() first")
    for adapter in adapters.values():
        adapter.enabled = enabled


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the ``with`` block: the adapters are switched off, not merged.

    Nestable and exception-safe: on leaving, every adapter is as it was on entering. Under
    ``torch.compile`` the two states compile once each, not at every switch.

    Example::

        with disable_adapters(model):
            reference = model(batch)  # the base model's outputs, e.g. for DPO's reference policy
    """
    adapters = list(lora_modules(model).values())
    previous = [adapter.enabled for adapter in adapters]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for adapter, enabled in zip(adapters, previous):
            adapter.enabled = enabled


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

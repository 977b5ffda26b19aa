"""Planning: which modules of a model get which adapter, decided without changing the model.

:func:`plan_adapters` turns a model and a :class:`~lightning_lora.LoRAConfig` into an
:class:`AdapterPlan` (module name -> :class:`~lightning_lora.adapters.AdapterSpec`, plus the modules
left fully trainable). It resolves the target patterns, checks every rule (supported types, tied
weights, patterns that match nothing, modules already adapted with other settings) and raises with
the closest module names as a hint. It reads the model in one walk (:func:`survey`), and the plan
keeps where each module sits, so that :func:`~lightning_lora.surgery.install` carries it out
without walking the model again.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from lightning_lora.adapters.base import LoRABase, base_bias, base_layer, base_weight
from lightning_lora.adapters.registry import find_kind, kind_of, parameter_kinds
from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.config import LoRAConfig
from lightning_lora.naming import Site, absolute, is_inside, walk
from lightning_lora.patterns import ALL_LINEAR, select
from lightning_lora.quantize import BLOCK_SIZE, fits
from lightning_lora.surgery.state import is_trainable
from lightning_lora.tasks import is_transformers_model, task_heads


@dataclass(frozen=True)
class AdapterPlan:
    """What to install: an adapter spec per module, the config it came from, the trainable modules.

    Attributes:
        specs: clean module name -> the adapter settings for it, in model order.
        config: the config, with ``targets`` resolved to the patterns actually used.
        trainable: names of modules left fully trainable.
        task_heads: those of them trained because they are a transformers model's new task head
            (``config.trainable=None``), each with the model's class name.
        quantize: names of the linear layers whose base weight to hold in ``config.quantize``
            (see :func:`quantizable`); empty unless the config asks for a quantized base.
        sites: where each module sat when the plan was made (None: look them up when installing).
    """

    specs: Mapping[str, AdapterSpec]
    config: LoRAConfig
    trainable: tuple[str, ...]
    quantize: tuple[str, ...] = ()
    task_heads: Mapping[str, str] = field(default_factory=dict)
    sites: Mapping[str, Site] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Survey:
    """What one walk of a model tells the planner.

    Attributes:
        sites: clean name -> site of every module outside adapters (adapters included).
        outputs: the names of the output layers (see :func:`output_layers`).
        users: ``id`` of each parameter -> how many modules hold it (more than one: tied).
        targets: every name a target pattern may select, in model order: the modules of ``sites`` and
            the parameters a kind adapts (their sites name the parameter, see :class:`Site`).
        sizes: element count of each of those parameters, and of all parameters (key ``""``).
        task_heads: the new task heads of transformers models (see :mod:`lightning_lora.tasks`), each
            with the model's class name.
        lazy: the modules whose parameters are not initialised yet (``nn.LazyLinear`` before its
            first forward): nothing can be adapted or frozen while they are.
    """

    sites: dict[str, Site]
    outputs: set[str]
    users: dict[int, int]
    targets: dict[str, Site] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    task_heads: dict[str, str] = field(default_factory=dict)
    lazy: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> dict[str, Site]:
        """The parameter targets not adapted yet (adapted ones are adapter modules in ``sites``)."""
        return {name: site for name, site in self.targets.items() if site.parameter}

    def linear_layers(self) -> list[str]:
        """The names of the layers ``all-linear`` may target (adapted or not), in model order."""
        return [
            name
            for name, site in self.sites.items()
            if not _is_attention_out_proj(site) and targeted_by_all_linear(site.module)
        ]

    def tied(self, module: nn.Module) -> bool:
        """Whether the base weight of ``module`` (or of the layer an adapter wraps) is held by another module too."""
        weight = getattr(base_layer(module), "weight", None)
        return weight is not None and self.users.get(id(weight), 0) > 1


def survey(model: nn.Module) -> Survey:
    """Walk ``model`` once and collect what planning needs: sites, output layers, tied weights."""
    found: dict[str, Site] = {}
    parameters: dict[str, Site] = {}
    users: dict[int, int] = {}
    sizes: dict[str, int] = {"": 0}
    names: dict[int, str] = {}
    heads: list[object] = []
    new_heads: dict[str, str] = {}
    lazy: list[str] = []
    for site in walk(model, into_adapters=False):
        module, layer = site.module, base_layer(site.module)
        names.setdefault(id(module), site.name)
        names.setdefault(id(layer), site.name)
        for param in layer.parameters(recurse=False):
            users[id(param)] = users.get(id(param), 0) + 1
            if isinstance(param, nn.parameter.UninitializedParameter):
                lazy += [] if lazy and lazy[-1] == site.name else [site.name]
            elif users[id(param)] == 1:
                sizes[""] += param.numel()
        if is_transformers_model(module):
            heads.append(module.get_output_embeddings())  # type: ignore[operator]
            heads += [getattr(module, attribute, None) for attribute in ("score", "classifier")]
            new_heads.update({absolute(head, site.name): type(module).__name__ for head in task_heads(module)})
        if site.name:
            found[site.name] = site  # where wrappers stack under one name, the innermost wins
            for parameter in parameter_kinds(module):
                name = f"{site.name}.{parameter}"
                parameters[name] = Site(name, module, site.parent, site.attribute, parameter)
                sizes[name] = getattr(module, parameter).numel()
    targets: dict[str, Site] = {}
    for name, site in found.items():
        targets[name] = site
        targets.update({p: parameters[p] for p in parameters if p.rpartition(".")[0] == name and p not in found})
    partial = Survey(found, set(), users, targets, sizes, {name: cls for name, cls in new_heads.items() if name in found}, lazy)
    linear = partial.linear_layers()
    return dataclasses.replace(partial, outputs=_outputs(linear, heads, names))


def plan_adapters(model: nn.Module, config: LoRAConfig) -> AdapterPlan:
    """The adapters that ``config`` asks for in ``model``; the model is not changed.

    Modules already adapted with the settings ``config`` gives them are part of the plan (installing
    it skips them). ``config.targets=None`` takes the model's ``lora_targets`` attribute, if it
    declares one, else ``["all-linear"]``. ``config.trainable=None`` trains the new task heads of
    transformers models fully (see :mod:`lightning_lora.tasks`), unless the targets adapt them.

    Raises:
        TypeError: if ``config`` is not a ``LoRAConfig``, or a target is of an unsupported type.
        ValueError: if a pattern matches nothing (with the closest names), targets and trainable
            overlap, adapted weights are tied, or a module is already adapted with other settings.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    found = survey(model)
    if found.lazy:
        raise ValueError(
            f"model has modules whose parameters are not initialised yet ({found.lazy[:5]!r}, e.g. nn.LazyLinear "
            f"before its first forward): run one forward pass first, so that nothing is adapted or frozen halfway"
        )
    modules = list(found.sites)
    names = list(found.targets)  # modules, and the parameters a kind adapts (expert weights)
    automatic = config.trainable is None
    trainable = list(found.task_heads) if config.trainable is None else select("trainable", config.trainable, modules)
    inside_trainable = {name for name in names if is_inside(name, trainable)}
    linear = [name for name in found.linear_layers() if name not in inside_trainable and name not in found.outputs]
    targets_used = config.targets_for(getattr(model, "lora_targets", None))
    chosen = select("targets", targets_used, names, linear)
    if automatic:  # a task head that the targets adapt is not also trained fully
        trainable = [head for head in trainable if not any(is_inside(name, [head]) for name in chosen)]
        inside_trainable = {name for name in names if is_inside(name, trainable)}
    _warn_if_only_output_or_tied(found, chosen)
    _warn_if_experts_are_left_out(found, chosen, targets_used)
    excluded = set(select("exclude", config.exclude, names))
    targets = [name for name in chosen if name not in excluded]
    if not targets:
        raise ValueError(f"exclude {config.exclude!r} removed every module matched by targets {targets_used!r}")
    overlap = [name for name in targets if name in inside_trainable]
    if overlap:
        raise ValueError(f"modules {overlap!r} are matched by both targets and trainable; choose one")
    select("rank_pattern", config.rank_pattern, targets)
    select("alpha_pattern", config.alpha_pattern, targets)

    specs = {name: _spec(found.targets[name], config) for name in targets}
    _check_untied(found, targets)
    experts = [name for name in targets if found.targets[name].parameter]
    if config.quantize is not None and experts:
        raise ValueError(
            f"quantize={config.quantize!r} holds linear layers in 4 bits, not expert weights: targets {experts[:3]!r} "
            f"are expert weights, which a quantized base cannot adapt here; set quantize=None to adapt them"
        )
    known = [name for name, site in found.sites.items() if is_trainable(site.module)]
    kept_trainable = tuple(known + [name for name in trainable if name not in known])
    return AdapterPlan(
        specs=specs,
        config=dataclasses.replace(config, targets=targets_used),
        trainable=kept_trainable,
        quantize=tuple(_quantizable(found, kept_trainable)) if config.quantize else (),
        task_heads={name: found.task_heads[name] for name in trainable} if automatic else {},
        sites=found.targets,
    )


def quantizable(model: nn.Module, trainable: Iterable[str] = ()) -> list[str]:
    """The linear layers of a quantized base: those whose frozen weight is held in 4 bits.

    As transformers' 4-bit loading with bitsandbytes: every ``nn.Linear`` (adapted or not) except the
    output layers (:func:`output_layers`: ``lm_head``, a classifier, else the last linear layer),
    the fully ``trainable`` modules and layers whose weight is tied to another module. Subclasses of
    ``nn.Linear`` are left out (they may read their weight other than through ``F.linear``), and
    so are layers whose weight does not split into whole NF4 blocks, with a warning naming them.
    """
    return _quantizable(survey(model), tuple(trainable))


def _quantizable(found: Survey, trainable: tuple[str, ...]) -> list[str]:
    chosen: list[str] = []
    unfit: list[str] = []
    for name in found.linear_layers():
        layer = base_layer(found.sites[name].module)
        if type(layer) is not nn.Linear or name in found.outputs or is_inside(name, trainable):
            continue
        if found.tied(layer):
            continue
        (chosen if fits(layer.weight) else unfit).append(name)
    if unfit:
        warnings.warn(
            f"quantize leaves {len(unfit)} linear layers in their dtype, whose weights do not split into "
            f"blocks of {BLOCK_SIZE} values: {unfit[:5]!r}",
            UserWarning,
            stacklevel=3,
        )
    return chosen


def output_layers(model: nn.Module) -> set[str]:
    """The names of the output layers of ``model``, which ``all-linear`` leaves out.

    As PEFT's ``all-linear`` does for transformers models: the output embeddings (``lm_head``) and the
    classification head (a ``score`` or ``classifier`` attribute) of every module that has
    ``get_output_embeddings`` (no transformers import: that method marks its models). In any other
    model with more than one linear layer: the last one, its output head.
    """
    return survey(model).outputs


def _outputs(linear: list[str], heads: list[object], names: dict[int, str]) -> set[str]:
    if not linear:
        return set()
    if not heads:
        return {linear[-1]} if len(linear) > 1 else set()  # a lone linear layer is the whole model
    head_names = [names[id(head)] for head in heads if isinstance(head, nn.Module) and id(head) in names]
    return {name for name in linear if any(name == head or name.startswith(head + ".") for head in head_names)}


def check_fits(model: nn.Module, specs: Mapping[str, AdapterSpec], source: str) -> dict[str, Site]:
    """Check that adapters with ``specs`` can be installed in ``model`` as it is.

    Every named module (or parameter) must exist and take an adapter of its spec's kind; a module
    already adapted must have exactly that spec (equal settings), and a model that has adapters must
    have adapters on exactly these modules.

    Returns:
        The model's targets (clean name -> site), as :func:`survey` gives them.

    Raises:
        ValueError: naming the module, the setting and both values; ``source`` starts the message.
    """
    found = survey(model).targets
    adapted = {name for name, site in found.items() if isinstance(site.module, LoRABase)}
    missing = [name for name in specs if name not in found]
    if missing:
        raise ValueError(f"{source} does not fit the model: it has no modules named {missing[:5]!r}")
    if adapted and adapted != set(specs):
        raise ValueError(
            f"{source} does not fit the model's adapters: adapted in the file but not in the model: "
            f"{[n for n in specs if n not in adapted][:5]!r}; adapted in the model but not in the file: "
            f"{sorted(adapted - set(specs))[:5]!r}"
        )
    for name, spec in specs.items():
        site = found[name]
        if isinstance(site.module, LoRABase):
            differences = site.module.spec.differences(spec)
            if differences:
                detail = ", ".join(f"{key}={new!r} in the file, {old!r} in the model" for key, (old, new) in differences.items())
                raise ValueError(f"{source} does not fit module '{name}': {detail}")
            continue
        try:
            kind = parameter_kinds(site.module)[site.parameter] if site.parameter else kind_of(site.module, name)
        except TypeError as err:
            raise ValueError(f"{source} does not fit the model: {err}") from err
        if kind.kind != spec.kind:
            held = f"a {spec.kind!r} adapter in the file, a {type(site.module).__name__}"
            raise ValueError(f"{source} does not fit module '{name}': {held} in the model{' (its ' + kind.kind + ' weight)' if site.parameter else ''}")
    return found


def target_base(site: Site) -> nn.Module:
    """The base layer an adapter at ``site`` wraps: the module (inside an adapter, its original), or for a
    parameter, the kind's view of it."""
    if site.parameter:
        return parameter_kinds(site.module)[site.parameter].parameter_base(site.module, site.parameter)
    return base_layer(site.module)


def _spec(site: Site, config: LoRAConfig) -> AdapterSpec:
    module, name = site.module, site.name
    if site.parameter:  # a weight a kind adapts as a parameter: it has no adapter bias ("auto")
        kind = parameter_kinds(module)[site.parameter]
        return config.spec_for(name, kind.kind, getattr(module, site.parameter).dtype, has_bias=False)
    if _is_attention_out_proj(site):
        raise TypeError(
            f"cannot adapt module '{name}': nn.MultiheadAttention reads out_proj's weight directly, "
            f"so an adapter there would have no effect"
        )
    if isinstance(module, LoRABase):
        existing = module.spec
        original = module.original_module
        wanted = config.spec_for(name, existing.kind, base_weight(original).dtype, base_bias(original) is not None)
        if config.adapter_dtype is None:
            wanted = dataclasses.replace(wanted, adapter_dtype=existing.adapter_dtype)
        differences = existing.differences(wanted)
        if differences:
            detail = ", ".join(f"{key}={old!r} (now {new!r})" for key, (old, new) in differences.items())
            raise ValueError(f"module '{name}' is already adapted with other settings: {detail}")
        return existing
    return config.spec_for(name, kind_of(module, name).kind, base_weight(module).dtype, base_bias(module) is not None)


def _check_untied(found: Survey, targets: list[str]) -> None:
    owners: dict[int, str] = {}
    for name in targets:
        site = found.targets[name]
        weight = getattr(site.module, site.parameter) if site.parameter else base_weight(base_layer(site.module))
        if id(weight) in owners:
            raise ValueError(
                f"modules '{owners[id(weight)]}' and '{name}' share one weight (tied weights); "
                f"adapt only one of them"
            )
        owners[id(weight)] = name


def _warn_if_only_output_or_tied(found: Survey, chosen: list[str]) -> None:
    modules = [name for name in chosen if name in found.sites]
    if modules == chosen and chosen and all(name in found.outputs or found.tied(found.sites[name].module) for name in chosen):
        warnings.warn(
            f"targets select only output or tied layers {chosen[:5]!r}: the adapters then change the output "
            f"head (or a weight shared with the input embeddings) and none of the layers inside the model; "
            f"if that is not intended, target the inner layers (e.g. 'all-linear')",
            UserWarning,
            stacklevel=4,
        )


def _warn_if_experts_are_left_out(found: Survey, chosen: list[str], targets: list[str]) -> None:
    """``all-linear`` means what it means in PEFT, linear layers: warn when that leaves most weights frozen in
    expert parameters, naming them and the patterns that adapt them."""
    left = [name for name in found.parameters if name not in chosen]
    held = sum(found.sizes[name] for name in left)
    if ALL_LINEAR in targets and left and held > found.sizes[""] / 2:
        patterns = sorted({".".join(name.split(".")[-2:]) for name in left})
        warnings.warn(
            f"targets 'all-linear' adapt linear layers only (as PEFT's), and leave {len(left)} expert weights frozen "
            f"({left[:2]!r}...), {held / found.sizes[''] :.0%} of the model's weights; add {patterns!r} to targets to "
            f"adapt them too",
            UserWarning,
            stacklevel=4,
        )


def targeted_by_all_linear(module: nn.Module) -> bool:
    if isinstance(module, LoRABase):
        return module.all_linear
    kind = find_kind(module)
    return kind is not None and kind.all_linear


def _is_attention_out_proj(site: Site) -> bool:
    return isinstance(site.parent, nn.MultiheadAttention) and site.attribute == "out_proj"

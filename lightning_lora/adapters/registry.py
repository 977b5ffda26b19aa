"""The registry of adapter kinds and LoRA variants: the one place that lists them.

A *kind* is an adapter layer class (a subclass of :class:`~lightning_lora.adapters.LoRABase`) for one
layout of base layer: ``linear`` (``nn.Linear``), ``transformers_conv1d`` (transformers' ``Conv1D``),
``conv`` (``nn.Conv1d/2d/3d``), ``embedding`` (``nn.Embedding``). Each base layer type is registered
with the kind that adapts it, and subclasses of a registered type take its kind (the most specific
registration wins). :func:`~lightning_lora.register_adapter_kind` adds a user's layer type, with a
built-in kind or one of the user's own; this module only stores and looks up.

A kind may adapt a module's *parameter* instead of the module (the fused expert weights of an MoE
layer, :mod:`~lightning_lora.adapters.experts`): a parameter finder names the parameters of a module
that it adapts. A *variant* (:class:`~lightning_lora.adapters.Variant`, DoRA the first) changes how
adapters of some kinds compute; an adapter's spec names its variant.

Layer types of libraries this package never imports (transformers' ``Conv1D``) are registered by
module and class name and recognised once that module is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

if TYPE_CHECKING:
    from lightning_lora.adapters.base import LoRABase
    from lightning_lora.adapters.variants import Variant

_KINDS: dict[str, type[LoRABase]] = {}  # kind name -> adapter layer class
_TYPES: dict[type[nn.Module], type[LoRABase]] = {}  # base layer type -> adapter layer class
_BY_NAME: dict[tuple[str, str], str] = {}  # (module, class) of a layer type not imported here -> kind name
_VARIANTS: dict[str, type[Variant]] = {}  # variant name -> variant class
# Functions that name the parameters of a module that a kind adapts (parameter -> kind), {} for other modules.
_PARAMETER_FINDERS: list[Callable[[nn.Module], dict[str, type[LoRABase]]]] = []
# Layer types that look adaptable (subclasses of nn.Linear) but are refused, by module and class name.
_REFUSED: dict[tuple[str, str], str] = {
    ("bitsandbytes.nn", "Linear4bit"): (
        "bitsandbytes' 4-bit layers pack their weight in a layout this package does not read; load the model "
        "unquantized and use LoRAConfig(quantize='nf4'), which holds the base in 4-bit NF4 through torchao"
    ),
}


def add_type(layer_type: type[nn.Module] | tuple[str, str], cls: type[LoRABase]) -> None:
    """Adapt ``layer_type`` (a type, or the module and class name of one) with kind ``cls``, checked by the caller.

    Raises:
        ValueError: if the type is registered already with another kind, or the kind's name is taken.
    """
    add_kind(cls)
    if isinstance(layer_type, tuple):
        _BY_NAME[layer_type] = cls.kind
        return
    registered = _TYPES.get(layer_type)
    if registered is not None and registered is not cls:
        raise ValueError(
            f"layer_type {layer_type.__name__} is registered already with kind {registered.kind!r} "
            f"({registered.__name__}), got kind {cls.kind!r} ({cls.__name__})"
        )
    _TYPES[layer_type] = cls


def add_kind(cls: type[LoRABase]) -> None:
    """Make kind ``cls`` known by its ``kind`` name.

    Raises:
        ValueError: if it has no name, or another class has that name.
    """
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"kind class {cls.__name__} must have a non-empty 'kind' name, got {name!r}")
    other = _KINDS.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"kind name {name!r} is taken by {other.__name__}, got {cls.__name__}")
    _KINDS[name] = cls


def add_variant(variant: type[Variant]) -> None:
    """Make ``variant`` known by its ``name``.

    Raises:
        ValueError: if it has no name, or another class has that name.
    """
    if not isinstance(variant.name, str) or not variant.name:
        raise ValueError(f"variant {variant.__name__} must have a non-empty name, got {variant.name!r}")
    other = _VARIANTS.get(variant.name)
    if other is not None and other is not variant:
        raise ValueError(f"variant name {variant.name!r} is taken by {other.__name__}, got {variant.__name__}")
    _VARIANTS[variant.name] = variant


def add_parameter_finder(finder: Callable[[nn.Module], dict[str, type[LoRABase]]]) -> None:
    """Register a function that names the parameters of a module its kinds adapt (for targets that name a
    parameter, such as ``mlp.experts.gate_up_proj``); their kinds must be known by name already."""
    if finder not in _PARAMETER_FINDERS:
        _PARAMETER_FINDERS.append(finder)


def parameter_kinds(module: nn.Module) -> dict[str, type[LoRABase]]:
    """Parameter name -> the kind that adapts it, for the parameters of ``module`` (not of its children)."""
    found: dict[str, type[LoRABase]] = {}
    for finder in _PARAMETER_FINDERS:
        found.update(finder(module))
    return found


def kind_named(name: str) -> type[LoRABase]:
    """The adapter layer class of the kind called ``name``.

    Raises:
        ValueError: for a name no kind has (naming the registered ones).
    """
    cls = _KINDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"kind must be one of {list(_KINDS)}, got {name!r} (a kind of your own is registered with "
            f"lightning_lora.register_adapter_kind)"
        )
    return cls


def variant_named(name: str) -> type[Variant]:
    """The variant class called ``name``.

    Raises:
        ValueError: for a name no variant has.
    """
    cls = _VARIANTS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"variant must be None or one of {list(_VARIANTS)}, got {name!r}")
    return cls


def kinds() -> list[type[LoRABase]]:
    """Every registered kind."""
    return list(_KINDS.values())


def variants() -> list[type[Variant]]:
    """Every registered variant."""
    return list(_VARIANTS.values())


def find_kind(module: nn.Module) -> type[LoRABase] | None:
    """The adapter layer class registered for ``module``'s type or its closest registered base class."""
    for (module_name, class_name), kind in list(_BY_NAME.items()):
        found = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            _TYPES.setdefault(found, _KINDS[kind])
            del _BY_NAME[(module_name, class_name)]
    for base in type(module).__mro__:
        cls = _TYPES.get(base)
        if cls is not None:
            return cls
    return None


def kind_of(module: nn.Module, name: str) -> type[LoRABase]:
    """The adapter layer class for ``module`` (named ``name`` in errors).

    Raises:
        TypeError: for a layer with uninitialised (lazy) parameters, a refused type (bitsandbytes'
            ``Linear4bit``), or a type no kind is registered for (naming ``register_adapter_kind``).
    """
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise TypeError(
            f"cannot adapt module '{name}' of type {type(module).__name__}: its parameters are not "
            f"initialised yet; run one forward pass (or adapt in configure_model after the model is built)"
        )
    for (module_name, class_name), reason in _REFUSED.items():
        refused = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(refused, type) and isinstance(module, refused):
            raise TypeError(f"cannot adapt module '{name}' of type {type(module).__name__}: {reason}")
    cls = find_kind(module)
    if cls is None:
        supported = [t.__name__ for t in _TYPES] + [f"{cls} ({module})" for module, cls in _BY_NAME]
        raise TypeError(
            f"cannot adapt module '{name}' of type {type(module).__name__}: LoRA supports {', '.join(supported)} "
            f"and their subclasses; register other layer types with "
            f"lightning_lora.register_adapter_kind({type(module).__name__}, kind)"
        )
    return cls

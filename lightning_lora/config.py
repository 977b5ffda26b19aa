"""``LoRAConfig``: which modules to adapt and how, validated on construction.

Its fields are the one list of LoRA settings: ``LoRACallback``'s arguments, the Hydra schema
``LoRACallbackConf`` and ``conf/lora/default.yaml`` repeat them with the same defaults (a test pins
this). This module also decides how settings given explicitly combine with those stored with an
adapter (:func:`explicit_settings`, :func:`reconcile`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lightning_lora.adapters.registry import variant_named
from lightning_lora.adapters.spec import (
    DORA,
    AdapterSpec,
    boolean,
    dtype_name,
    dtype_setting,
    positive_int,
    positive_number,
    probability,
    scaling,
)
from lightning_lora.patterns import ALL_LINEAR, check_pattern, first_match
from lightning_lora.quantize import check_method

_T = TypeVar("_T")


@dataclass
class LoRAConfig:
    """Settings for :func:`lightning_lora.apply_lora`.

    Every field is checked when the config is built; a bad value raises one ``ValueError`` or
    ``TypeError`` that names the field, what was expected and what was received. Sequences are
    stored as lists and mappings as dicts (Hydra's ``ListConfig``/``DictConfig`` are accepted).

    Example::

        >>> LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]).scaling_for("q_proj")
        2.0
    """

    r: int = 8  # rank of the update B @ A (PEFT's default)
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora): 2, as litgpt's
    # Give matrix_A and matrix_B biases (B's starts at zero): False, as PEFT (its exports then serve in vLLM);
    # True for all layers; "auto": where the original layer has one.
    bias: bool | str = False
    # Module name patterns; None: the model's ``lora_targets`` attribute if it has one, else all-linear.
    targets: Sequence[str] | None = None
    exclude: Sequence[str] = ()  # patterns removed from the matches
    dropout: float = 0.0  # dropout on the adapter input only; 0 means no dropout work at all
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)  # pattern -> r for those modules
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)  # pattern -> alpha
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # DoRA: W' = m * (W + s B A) / ||W + s B A|| with a trained magnitude m per output row (Linear and
    # transformers' Conv1D). Its update has no bias: bias must be False or "auto" (which then gives none).
    use_dora: bool = False
    # Modules left fully trainable (new heads); None: the new task head of a transformers model
    # (*ForSequenceClassification's classifier or score, ...), as PEFT's task_type; [] for none.
    trainable: Sequence[str] | None = None
    adapter_dtype: str | None = None  # None: the original weight's dtype; e.g. "float32"
    # "nf4": hold the frozen linear base weights in 4-bit NF4 while training (QLoRA; needs torchao)
    quantize: str | None = None

    def __post_init__(self) -> None:
        self.r = positive_int("r", self.r)
        self.alpha = positive_number("alpha", self.alpha)
        self.bias = _bias_setting(self.bias)
        self.targets = None if self.targets is None else _patterns("targets", self.targets, allow_empty=False)
        self.exclude = _patterns("exclude", self.exclude)
        self.dropout = probability("dropout", self.dropout)
        self.rank_pattern = _pattern_map("rank_pattern", self.rank_pattern, positive_int)
        self.alpha_pattern = _pattern_map("alpha_pattern", self.alpha_pattern, positive_number)
        self.use_rslora = boolean("use_rslora", self.use_rslora)
        self.use_dora = boolean("use_dora", self.use_dora)
        self.trainable = None if self.trainable is None else _patterns("trainable", self.trainable)
        self.adapter_dtype = dtype_setting("adapter_dtype", self.adapter_dtype, optional=True)
        self.quantize = check_method("quantize", self.quantize)
        if self.variant is not None:
            variant_named(self.variant).check_settings(bias=self.bias is True, quantize=self.quantize)

    @property
    def variant(self) -> str | None:
        """The LoRA variant of the adapters: ``"dora"`` with ``use_dora``, else None."""
        return DORA if self.use_dora else None

    def targets_for(self, declared: Sequence[str] | None) -> list[str]:
        """``targets``, or when it is None the model's declared ``lora_targets``, else ``["all-linear"]``."""
        if self.targets is not None:
            return list(self.targets)
        return list(declared) if declared else [ALL_LINEAR]

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``: the first matching ``rank_pattern`` entry, else ``r``."""
        patterns = self.rank_pattern
        key = first_match(name, patterns)
        return self.r if key is None else patterns[key]

    def alpha_for(self, name: str) -> float:
        """The alpha of module ``name``: the first matching ``alpha_pattern`` entry, else ``alpha``."""
        patterns = self.alpha_pattern
        key = first_match(name, patterns)
        return self.alpha if key is None else patterns[key]

    def scaling_for(self, name: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``) for module ``name``."""
        return scaling(self.alpha_for(name), self.rank_for(name), self.use_rslora)

    def spec_for(self, name: str, kind: str, weight_dtype: torch.dtype, has_bias: bool) -> AdapterSpec:
        """The :class:`AdapterSpec` of module ``name``: adapter ``kind``, around a layer whose weight is in
        ``weight_dtype`` and which has a bias or not (``bias="auto"`` follows it where the variant allows biases)."""
        return AdapterSpec(
            kind=kind,
            r=self.rank_for(name),
            alpha=self.alpha_for(name),
            bias=has_bias and self._variant_allows_bias() if self.bias == "auto" else bool(self.bias),
            dropout=self.dropout,
            use_rslora=self.use_rslora,
            adapter_dtype=self.adapter_dtype or dtype_name(weight_dtype),
            variant=self.variant,
        )

    def _variant_allows_bias(self) -> bool:
        return self.variant is None or variant_named(self.variant).allows_bias

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values, the inverse of ``LoRAConfig(**d)``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> LoRAConfig:
        """A config from :meth:`to_dict`'s output, as stored in files.

        Raises:
            ValueError: if ``values`` is not a mapping, has unknown keys, or holds a bad value.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"a LoRAConfig must be a mapping, got {type(values).__name__}")
        unknown = sorted(str(key) for key in values if key not in FIELDS)
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields {unknown!r}; known: {list(FIELDS)!r}")
        try:
            return cls(**values)
        except TypeError as err:
            raise ValueError(str(err)) from err


#: The names of the settings, in order.
FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(LoRAConfig))
#: Each setting's default as declared (sequences as ``()``, mappings as ``{}``).
DEFAULTS: dict[str, Any] = {
    field.name: field.default_factory() if callable(field.default_factory) else field.default
    for field in dataclasses.fields(LoRAConfig)
}


def most_common(values: Iterable[_T]) -> _T:
    """The value that occurs most often in ``values`` (the first of those tied); ``values`` must not be empty."""
    return Counter(values).most_common(1)[0][0]


def config_of_specs(specs: Mapping[str, AdapterSpec], trainable: Iterable[str] = ()) -> LoRAConfig:
    """The config that gives adapters these settings (module name -> spec): the most common rank and alpha,
    the others as ``rank_pattern`` / ``alpha_pattern`` entries, the modules by name as targets. For adapters
    whose config is not at hand: a submodule of an adapted model, an imported PEFT adapter."""
    if not specs:
        return LoRAConfig(trainable=list(trainable))
    r = most_common(spec.r for spec in specs.values())
    alpha = most_common(spec.alpha for spec in specs.values())
    biases = {spec.bias for spec in specs.values()}
    return LoRAConfig(
        r=r,
        alpha=alpha,
        bias=biases.pop() if len(biases) == 1 else "auto",
        targets=list(specs),
        dropout=most_common(spec.dropout for spec in specs.values()),
        rank_pattern={name: spec.r for name, spec in specs.items() if spec.r != r},
        alpha_pattern={name: spec.alpha for name, spec in specs.items() if spec.alpha != alpha},
        use_rslora=any(spec.use_rslora for spec in specs.values()),
        use_dora=any(spec.use_dora for spec in specs.values()),
        trainable=list(trainable),
    )


def explicit_settings(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The settings in ``arguments`` whose values differ from the defaults: those given explicitly.

    Values are compared in plain form (tuples and Hydra lists as lists, mappings as dicts), and a
    flag given as 1 is not taken for the default True.
    """
    return {
        name: value
        for name, value in arguments.items()
        if name in DEFAULTS and not _same(_plain(value), _plain(DEFAULTS[name]))
    }


def reconcile(stored: LoRAConfig, explicit: Mapping[str, Any], source: str, root: str | None = None) -> LoRAConfig:
    """The settings stored with an adapter, after checking that no explicitly given one contradicts them.

    Args:
        stored: the config an adapter was trained with.
        explicit: settings the user gave explicitly (see :func:`explicit_settings`).
        source: what the stored config comes from, for the message (e.g. ``adapter_path 'a.safetensors'``).
        root: the submodule the adapter's module names are under: a given name ``<root>.x`` is the
            stored ``x``.

    Raises:
        ValueError: naming each contradicting setting with both values.
    """
    given = LoRAConfig(**explicit).to_dict()  # validated and normalised like the stored values
    if root:
        given = {name: _relative(value, root) if name in NAMED else value for name, value in given.items()}
    stored_values = stored.to_dict()
    contradicting = [
        f"{name}={given[name]!r} (file: {stored_values[name]!r})"
        for name in explicit
        if not _same(given[name], stored_values[name])
    ]
    if contradicting:
        raise ValueError(f"{source} was trained with other settings: {', '.join(contradicting)}")
    return stored


#: Settings that name modules (as lists, or as the keys of a mapping).
NAMED = ("targets", "exclude", "trainable", "rank_pattern", "alpha_pattern")


def _relative(value: Any, root: str) -> Any:
    """Module names in a setting's value with the prefix ``<root>.`` taken off."""
    prefix = root + "."
    if isinstance(value, Mapping):
        return {key.removeprefix(prefix): item for key, item in value.items()}
    if isinstance(value, list):
        return [item.removeprefix(prefix) if isinstance(item, str) else item for item in value]
    return value


def _plain(value: Any) -> Any:
    """Hydra's ListConfig / DictConfig, tuples and mappings as plain lists and dicts."""
    if value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence):
        return [_plain(item) for item in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """Equality that tells True from 1 and None from an empty list (``trainable``: automatic or none),
    but takes None for an empty mapping (``rank_pattern=None`` means no patterns)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if a is None or b is None:
        return (a if b is None else b) in (None, {})
    return a == b


def _bias_setting(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise TypeError(f"bias must be True, False or 'auto', got {value!r} ({type(value).__name__})")


def _patterns(name: str, value: Any, allow_empty: bool = True) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a list of module name patterns, got {value!r} ({type(value).__name__})"
        )
    patterns = list(value)
    for item in patterns:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{name} must hold non-empty strings, got {item!r} in {patterns!r}")
        check_pattern(name, item)
    if not patterns and not allow_empty:
        raise ValueError(
            f"{name} must name at least one module pattern, got an empty list "
            f"(use None for the model's lora_targets, or {[ALL_LINEAR]!r})"
        )
    if len(set(patterns)) != len(patterns):
        raise ValueError(f"{name} must not repeat a pattern, got {patterns!r}")
    return patterns


def _pattern_map(name: str, value: Any, check: Callable[[str, Any], _T]) -> dict[str, _T]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a mapping from module pattern to value, got {value!r} "
            f"({type(value).__name__})"
        )
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty strings, got {key!r}")
        check_pattern(name, key)
        result[key] = check(f"{name}[{key!r}]", item)
    return result

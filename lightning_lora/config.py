"""``LoRAConfig``: which modules to adapt and how, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Names accepted for ``adapter_dtype`` (``None`` keeps the original weight's dtype).
ADAPTER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoRAConfig:
    """Settings for :func:`lightning_lora.apply_lora`.

    Every field is checked when the config is built; a bad value raises one ``ValueError`` or
    ``TypeError`` that names the field, what was expected and what was received.

    Example::

        >>> LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]).scaling_for("q_proj")
        2.0
    """

    r: int = 4  # rank of the update B @ A
    alpha: float = 1.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    bias: bool = True  # give matrix_A and matrix_B a bias (zero-initialised in B)
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # module name patterns
    exclude: list[str] = field(default_factory=list)  # patterns removed from the matches
    dropout: float = 0.0  # dropout on the adapter input only; 0 means no dropout work at all
    rank_pattern: dict[str, int] = field(default_factory=dict)  # pattern -> r for those modules
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # pattern -> alpha
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    trainable: list[str] = field(default_factory=list)  # modules left fully trainable (new heads)
    adapter_dtype: str | None = None  # None: the original weight's dtype; e.g. "float32"

    def __post_init__(self) -> None:
        self.r = _positive_int("r", self.r)
        self.alpha = _positive_number("alpha", self.alpha)
        self.bias = _boolean("bias", self.bias)
        self.targets = _patterns("targets", self.targets, allow_empty=False)
        self.exclude = _patterns("exclude", self.exclude)
        self.dropout = _probability("dropout", self.dropout)
        self.rank_pattern = _pattern_map("rank_pattern", self.rank_pattern, _positive_int)
        self.alpha_pattern = _pattern_map("alpha_pattern", self.alpha_pattern, _positive_number)
        self.use_rslora = _boolean("use_rslora", self.use_rslora)
        self.trainable = _patterns("trainable", self.trainable)
        self.adapter_dtype = _dtype_name("adapter_dtype", self.adapter_dtype)

    def rank_for(self, name: str) -> int:
        """The rank of module ``name``: the first matching ``rank_pattern`` entry, else ``r``."""
        from lightning_lora.targets import first_match

        key = first_match(name, self.rank_pattern)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        """The alpha of module ``name``: the first matching ``alpha_pattern`` entry, else ``alpha``."""
        from lightning_lora.targets import first_match

        key = first_match(name, self.alpha_pattern)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, name: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``) for module ``name``."""
        return scaling(self.alpha_for(name), self.rank_for(name), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values, the inverse of ``LoRAConfig(**d)``."""
        return dataclasses.asdict(self)


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor applied to ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` when ``use_rslora``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _patterns(name: str, value: Any, allow_empty: bool = True) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a list of module name patterns, got {value!r} ({type(value).__name__})"
        )
    patterns = list(value)
    for item in patterns:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{name} must hold non-empty strings, got {item!r} in {patterns!r}")
    if not patterns and not allow_empty:
        raise ValueError(f"{name} must name at least one module pattern, got an empty list")
    if len(set(patterns)) != len(patterns):
        raise ValueError(f"{name} must not repeat a pattern, got {patterns!r}")
    return patterns


def _pattern_map(name: str, value: Any, check: Any) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a mapping from module pattern to value, got {value!r} "
            f"({type(value).__name__})"
        )
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty strings, got {key!r}")
        result[key] = check(f"{name}[{key!r}]", item)
    return result


def _dtype_name(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for dtype_name, dtype in ADAPTER_DTYPES.items():
            if dtype == value:
                return dtype_name
    if isinstance(value, str) and value in ADAPTER_DTYPES:
        return value
    raise ValueError(f"{name} must be None or one of {sorted(ADAPTER_DTYPES)}, got {value!r}")

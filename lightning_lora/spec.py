"""``AdapterSpec``: the settings of one adapter layer, as a value.

A spec is what every part of the package passes around to say "an adapter of this kind, with these
settings": the planner produces specs, :func:`~lightning_lora.layers.build_adapter` turns one into a
layer, adapter files and checkpoints store them, and two adapters have the same settings exactly when
their specs are equal.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass
from typing import Any

import torch

#: Names accepted for ``adapter_dtype``.
ADAPTER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: The kinds of adapter layer (see :mod:`lightning_lora.layers`).
KINDS = ("linear", "transformers_conv1d", "conv", "embedding")


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor applied to ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` when ``use_rslora``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class AdapterSpec:
    """The settings of one adapter layer.

    Attributes:
        kind: ``"linear"``, ``"transformers_conv1d"``, ``"conv"`` or ``"embedding"``.
        r: rank of the update ``B @ A``.
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        bias: whether ``matrix_A`` and ``matrix_B`` have biases.
        dropout: dropout probability on the adapter input.
        use_rslora: rank-stabilised scaling.
        adapter_dtype: dtype of the adapter weights, one of :data:`ADAPTER_DTYPES`.
        use_dora: weight-decomposed LoRA (DoRA): a trained magnitude per output row. Files written
            before it existed read as False.

    Raises:
        ValueError, TypeError: for a value out of range or of the wrong type (naming the field), or
            ``use_dora`` with ``bias`` (DoRA's update has no bias).
    """

    kind: str
    r: int
    alpha: float
    bias: bool
    dropout: float
    use_rslora: bool
    adapter_dtype: str
    use_dora: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "r", positive_int("r", self.r))
        object.__setattr__(self, "alpha", positive_number("alpha", self.alpha))
        object.__setattr__(self, "bias", boolean("bias", self.bias))
        object.__setattr__(self, "dropout", probability("dropout", self.dropout))
        object.__setattr__(self, "use_rslora", boolean("use_rslora", self.use_rslora))
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {sorted(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")
        object.__setattr__(self, "use_dora", boolean("use_dora", self.use_dora))
        if self.use_dora and self.bias:
            raise ValueError("use_dora=True needs bias=False: DoRA's update has no bias (as in PEFT), got bias=True")

    @property
    def scaling(self) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``)."""
        return scaling(self.alpha, self.r, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; :meth:`from_dict` is the inverse."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> AdapterSpec:
        """A spec from :meth:`to_dict`'s output (other keys, such as stored shapes, are ignored).

        Fields with a default (added after the first file format) may be absent.

        Raises:
            ValueError: if ``values`` is not a mapping, lacks a field, or holds a bad value.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"an adapter spec must be a mapping, got {type(values).__name__}")
        fields = cls.__dataclass_fields__
        missing = [name for name, field in fields.items() if name not in values and field.default is MISSING]
        if missing:
            raise ValueError(f"an adapter spec must have the fields {missing!r}, got {sorted(values)!r}")
        try:
            return cls(**{name: values[name] for name in fields if name in values})
        except TypeError as err:
            raise ValueError(str(err)) from err

    def differences(self, other: AdapterSpec) -> dict[str, tuple[Any, Any]]:
        """Field -> (this value, other value), for every field in which the two specs differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}


# --- validators shared by AdapterSpec and LoRAConfig: one error per bad value, naming the field ---


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else a ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_number(name: str, value: Any) -> float:
    """``value`` as a float if it is a positive finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def probability(name: str, value: Any) -> float:
    """``value`` as a float if it is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)

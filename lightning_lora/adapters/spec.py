"""``AdapterSpec``: the settings of one adapter layer, as a value, and the validators of every setting.

A spec is what every part of the package passes around to say "an adapter of this kind, with these
settings": the planner produces specs, :func:`~lightning_lora.adapters.build_adapter` turns one into a
layer, adapter files and checkpoints store them, and two adapters have the same settings exactly when
their specs are equal. The validators below are the only place a setting's range and type are
checked; :class:`~lightning_lora.LoRAConfig` uses them too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from lightning_lora.adapters import registry

#: Names accepted for ``adapter_dtype``.
ADAPTER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: The variant whose files say ``use_dora`` instead of ``variant`` (the format before variants).
DORA = "dora"


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
        kind: the name of its kind (``"linear"``, ``"transformers_conv1d"``, ``"conv"``,
            ``"embedding"`` or one registered with :func:`~lightning_lora.register_adapter_kind`).
        r: rank of the update ``B @ A``.
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        bias: whether ``matrix_A`` and ``matrix_B`` have biases.
        dropout: dropout probability on the adapter input.
        use_rslora: rank-stabilised scaling.
        adapter_dtype: dtype of the adapter weights, one of :data:`ADAPTER_DTYPES`.
        variant: the name of a LoRA variant (``"dora"``), or None for plain LoRA.

    Raises:
        ValueError, TypeError: for a value out of range or of the wrong type (naming the field), an
            unknown kind or variant, or settings the variant does not allow.
    """

    kind: str
    r: int
    alpha: float
    bias: bool
    dropout: float
    use_rslora: bool
    adapter_dtype: str
    variant: str | None = None

    def __post_init__(self) -> None:
        registry.kind_named(self.kind)
        object.__setattr__(self, "r", positive_int("r", self.r))
        object.__setattr__(self, "alpha", positive_number("alpha", self.alpha))
        object.__setattr__(self, "bias", boolean("bias", self.bias))
        object.__setattr__(self, "dropout", probability("dropout", self.dropout))
        object.__setattr__(self, "use_rslora", boolean("use_rslora", self.use_rslora))
        object.__setattr__(self, "adapter_dtype", dtype_setting("adapter_dtype", self.adapter_dtype) or "")
        if self.variant is not None:
            registry.variant_named(self.variant).check_settings(bias=self.bias, quantize=None)

    @property
    def scaling(self) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``)."""
        return scaling(self.alpha, self.r, self.use_rslora)

    @property
    def use_dora(self) -> bool:
        """Whether the variant is DoRA."""
        return self.variant == DORA

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, as files store them; :meth:`from_dict` is the inverse.

        DoRA is written ``"use_dora": true`` (as since the first DoRA files); other variants add a
        ``"variant"`` key.
        """
        values = {field.name: getattr(self, field.name) for field in fields(self) if field.name != "variant"}
        values["use_dora"] = self.use_dora
        if self.variant not in (None, DORA):
            values["variant"] = self.variant
        return values

    @classmethod
    def from_dict(cls, values: Any) -> AdapterSpec:
        """A spec from :meth:`to_dict`'s output (other keys, such as stored shapes, are ignored).

        ``use_dora`` and ``variant`` may be absent (files written before they existed).

        Raises:
            ValueError: if ``values`` is not a mapping, lacks a field, or holds a bad value.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"an adapter spec must be a mapping, got {type(values).__name__}")
        required = [field.name for field in fields(cls) if field.name != "variant"]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"an adapter spec must have the fields {missing!r}, got {sorted(values)!r}")
        use_dora = values.get("use_dora", False)
        variant = values.get("variant")
        if use_dora is True and variant not in (None, DORA):
            raise ValueError(f"an adapter spec cannot have use_dora=true and variant={variant!r}")
        if use_dora not in (True, False):
            raise ValueError(f"use_dora must be true or false, got {use_dora!r}")
        try:
            return cls(**{name: values[name] for name in required}, variant=DORA if use_dora else variant)
        except TypeError as err:
            raise ValueError(str(err)) from err

    def differences(self, other: AdapterSpec) -> dict[str, tuple[Any, Any]]:
        """Field -> (this value, other value), for every field in which the two specs differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {name: (mine.get(name), theirs.get(name)) for name in {**mine, **theirs} if mine.get(name) != theirs.get(name)}


# --- validators shared by AdapterSpec, the layers and LoRAConfig: one error per bad value, naming the field ---


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


def dtype_setting(name: str, value: Any, optional: bool = False) -> str | None:
    """The name of an adapter dtype given as a name or a ``torch.dtype`` (one of :data:`ADAPTER_DTYPES`);
    ``optional``: None is accepted (and returned) too."""
    if isinstance(value, torch.dtype) and value in ADAPTER_DTYPES.values():
        return dtype_name(value)
    if (isinstance(value, str) and value in ADAPTER_DTYPES) or (optional and value is None):
        return value
    raise ValueError(f"{name} must be {'None or ' if optional else ''}one of {sorted(ADAPTER_DTYPES)}, got {value!r}")

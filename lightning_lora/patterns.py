"""Module name patterns: which qualified names a pattern selects (pure Python, no torch).

A pattern is one of:

- ``all-linear``: every linear layer but the output layer, expanded by :mod:`lightning_lora.plan`;
- an exact qualified name (``blocks.3.attn.qkv``) or a dotted suffix of one (``attn.qkv``, ``qkv``);
- a glob over the whole name or a dotted suffix (``blocks.*.attn.qkv``);
- a regular expression over the whole name, written ``re:...`` (``re:blocks\\.[0-3]\\..*``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

ALL_LINEAR = "all-linear"


def matches(name: str, pattern: str) -> bool:
    """Whether qualified module name ``name`` matches ``pattern`` (``all-linear`` excepted)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern in ``patterns`` that matches ``name``, or None."""
    return next((pattern for pattern in patterns if matches(name, pattern)), None)


def check_pattern(parameter: str, pattern: str) -> None:
    """Raise ``ValueError`` naming ``parameter`` if a ``re:`` pattern does not compile."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            raise ValueError(f"{parameter} pattern {pattern!r} is not a valid regular expression: {err}") from err


def select(
    parameter: str, patterns: Iterable[str], names: Sequence[str], linear_names: Sequence[str] | None = None
) -> list[str]:
    """The names matched by any of ``patterns``, in the order of ``names``.

    Args:
        parameter: the config field the patterns come from (named in errors).
        patterns: the patterns.
        names: the candidate module names.
        linear_names: the names that ``all-linear`` stands for (None: the keyword is not allowed).

    Raises:
        ValueError: if a pattern matches no name; the message lists the closest names that exist.
    """
    chosen: set[str] = set()
    for pattern in patterns:
        check_pattern(parameter, pattern)
        if pattern == ALL_LINEAR and linear_names is not None:
            hits = set(linear_names)
            if not hits:
                raise ValueError(f"{parameter} pattern {ALL_LINEAR!r} matched no nn.Linear module in the model")
        else:
            hits = {name for name in names if matches(name, pattern)}
        if not hits:
            raise ValueError(f"{parameter} pattern {pattern!r} matched no module{closest_hint(pattern, names)}")
        chosen |= hits
    return [name for name in names if name in chosen]


def closest_hint(pattern: str, names: Sequence[str]) -> str:
    """A hint listing the module names (or name endings) closest to ``pattern``, for error messages."""
    candidates: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for start in range(len(parts)):
            candidates.setdefault(".".join(parts[start:]), name)
    close = difflib.get_close_matches(pattern.removeprefix("re:"), list(candidates), n=5, cutoff=0.5)
    if not close:
        return f"; the model has modules such as {list(names[:5])!r}" if names else ""
    return "; closest names: " + ", ".join(repr(name) for name in dict.fromkeys(candidates[c] for c in close))

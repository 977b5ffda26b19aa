"""Module names and the patterns that select them.

A pattern is one of:

- ``all-linear``: every ``nn.Linear`` (except ``MultiheadAttention.out_proj``, whose weight the
  attention reads directly, and modules listed as ``trainable``);
- an exact qualified name (``blocks.3.attn.qkv``) or a dotted suffix of one (``attn.qkv``, ``qkv``);
- a glob over the whole name or a dotted suffix (``blocks.*.attn.qkv``);
- a regular expression over the whole name, written ``re:...`` (``re:blocks\\.[0-3]\\..*``).

Names are the clean module paths a user sees: the prefixes that ``torch.compile`` (``_orig_mod.``),
DDP (``module.``), FSDP and activation checkpointing add are left out.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Iterator

from torch import nn

from lightning_lora.layers import LoRALayer

ALL_LINEAR = "all-linear"

# Attributes by which wrappers hold the wrapped module; they never appear in clean names.
_WRAPPER_ATTRIBUTES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# Wrapper classes that hold the wrapped module as ``module`` or ``_forward_module``.
_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "_LightningModuleWrapperBase")


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with clean names (wrapper prefixes left out), each module once."""
    for name, module, _, _ in walk(model):
        yield name, module


def walk(model: nn.Module, base_view: bool = False) -> Iterator[tuple[str, nn.Module, nn.Module | None, str]]:
    """Each module once as ``(clean name, module, parent module, attribute name in the parent)``.

    With ``base_view`` an adapter's ``original_module`` takes the adapter's name and its
    ``matrix_A``, ``matrix_B`` and dropout are left out: the model as it was before adaptation.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module, nn.Module | None, str]] = [("", model, None, "")]
    while stack:
        name, current, owner, attr = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield name, current, owner, attr
        wrapper = any(base.__name__ in _MODULE_WRAPPERS for base in type(current).__mro__)
        children = []
        if base_view and isinstance(current, LoRALayer):
            stack.append((name, current.original_module, current, "original_module"))
            continue
        for child_attr, child in current.named_children():
            transparent = child_attr in _WRAPPER_ATTRIBUTES or (
                wrapper and child_attr in ("module", "_forward_module")
            )
            child_name = name if transparent else (f"{name}.{child_attr}" if name else child_attr)
            children.append((child_name, child, current, child_attr))
        stack.extend(reversed(children))


def clean_name(name: str) -> str:
    """Drop the ``_orig_mod``, FSDP and checkpoint-wrapper components of a qualified name."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_ATTRIBUTES)


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
    parameter: str, patterns: Iterable[str], names: list[str], linear_names: list[str] | None = None
) -> list[str]:
    """The names matched by any of ``patterns``, in model order.

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
            raise ValueError(f"{parameter} pattern {pattern!r} matched no module{_closest(pattern, names)}")
        chosen |= hits
    return [name for name in names if name in chosen]


def _closest(pattern: str, names: list[str]) -> str:
    """A hint listing the module names (or name endings) closest to ``pattern``."""
    candidates: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for start in range(len(parts)):
            candidates.setdefault(".".join(parts[start:]), name)
    close = difflib.get_close_matches(pattern.removeprefix("re:"), list(candidates), n=5, cutoff=0.5)
    if not close:
        return f"; the model has modules such as {names[1:6]!r}" if len(names) > 1 else ""
    return "; closest names: " + ", ".join(repr(name) for name in dict.fromkeys(candidates[c] for c in close))

"""Clean module names: where each module of a model sits, seen through wrappers.

Names are the module paths a user sees: the prefixes that ``torch.compile`` (``_orig_mod.``), DDP
(``module.``), FSDP and activation checkpointing add are left out, so a name means the same module
before and after wrapping, and adapter files and plans can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import nn

from lightning_lora.adapters.base import AdapterContainer, LoRABase

# Attributes by which wrappers hold the wrapped module; they never appear in clean names.
_WRAPPER_ATTRIBUTES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# Wrapper classes that hold the wrapped module as ``module`` or ``_forward_module``.
_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "_LightningModuleWrapperBase")


@dataclass(frozen=True)
class Site:
    """Where a module lives: its clean name, the module, and how its parent holds it.

    A parameter's site (``parameter`` set) names the parameter (``mlp.experts.gate_up_proj``); its
    ``module`` is the module that holds it, placed as that module's own site says.
    """

    name: str
    module: nn.Module
    parent: nn.Module | None
    attribute: str
    parameter: str = ""

    def replace(self, module: nn.Module) -> None:
        """Put ``module`` where this site's module is, in place."""
        assert self.parent is not None, "the root module has no parent to replace it in"
        setattr(self.parent, self.attribute, module)


def walk(model: nn.Module, base_view: bool = False, into_adapters: bool = True) -> Iterator[Site]:
    """Each module of ``model`` once, as a :class:`Site`, parents before children.

    With ``base_view`` an adapter's ``original_module`` takes the adapter's name and the adapter's
    own modules are left out: the model as it was before adaptation. Without ``into_adapters`` an
    adapter is yielded but nothing inside it. The module an
    :class:`~lightning_lora.adapters.base.AdapterContainer` holds takes the container's name.
    """
    seen: set[int] = set()
    stack: list[Site] = [Site("", model, None, "")]
    while stack:
        site = stack.pop()
        if id(site.module) in seen:
            continue
        seen.add(id(site.module))
        yield site
        current, name = site.module, site.name
        if not into_adapters and isinstance(current, LoRABase):
            continue
        if base_view and isinstance(current, (LoRABase, AdapterContainer)):
            stack.append(Site(name, current.original_module, current, "original_module"))
            continue
        wrapper = any(base.__name__ in _MODULE_WRAPPERS for base in type(current).__mro__)
        children = []
        for attribute, child in current.named_children():
            transparent = (
                attribute in _WRAPPER_ATTRIBUTES
                or (wrapper and attribute in ("module", "_forward_module"))
                or (isinstance(current, AdapterContainer) and attribute == "original_module")
            )
            child_name = name if transparent else (f"{name}.{attribute}" if name else attribute)
            children.append(Site(child_name, child, current, attribute))
        stack.extend(reversed(children))


def sites(model: nn.Module) -> dict[str, Site]:
    """Clean name -> site for every module outside adapters (adapters themselves included).

    Where wrappers stack under one name, the innermost module wins; the root is left out.
    """
    found = {site.name: site for site in walk(model, into_adapters=False)}
    found.pop("", None)
    return found


def is_inside(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or lies inside one of them."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def resolve_root(model: nn.Module, root: str | nn.Module | None) -> str:
    """The clean name of submodule ``root`` of ``model`` (``""`` for None or ``model`` itself).

    Raises:
        TypeError: if ``root`` is neither a name, a module nor None.
        ValueError: if it is not a module of ``model``.
    """
    if root is None:
        return ""
    if isinstance(root, nn.Module):
        for site in walk(model):
            if site.module is root:
                return site.name
        raise ValueError(f"root must be a submodule of the model, got a {type(root).__name__} that is not part of it")
    if not isinstance(root, str):
        raise TypeError(f"root must be a module name, a module or None, got {root!r} ({type(root).__name__})")
    if root and root not in sites(model):
        raise ValueError(f"root must name a module of the model, got {root!r}")
    return root


def relative(name: str, prefix: str) -> str | None:
    """``name`` relative to module ``prefix`` (None if it lies outside)."""
    if not prefix:
        return name
    return name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None


def absolute(name: str, prefix: str) -> str:
    """The inverse of :func:`relative`."""
    return f"{prefix}.{name}" if prefix else name

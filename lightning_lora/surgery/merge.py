"""Merging: fold every adapter's update into its base weights, take it out again, or unload the adapters.

Merging is computed in float32 and refused where a low-precision weight would lose the update
(:meth:`~lightning_lora.adapters.LoRABase.merge`); unmerging restores the weights bit for bit. Each
function either succeeds for every adapter or leaves the model as it was.
"""

from __future__ import annotations

from torch import nn

from lightning_lora.adapters.base import MERGE_TOLERANCE, AdapterContainer, LoRABase, base_weight
from lightning_lora.naming import sites, walk
from lightning_lora.quantize import dequantize, quantized_format
from lightning_lora.surgery.state import CONFIG_ATTR, lora_modules, mark_trainable, merged_modules, trainable_modules


def merge_lora(model: nn.Module, tolerance: float = MERGE_TOLERANCE) -> None:
    """Merge every adapter into its original weights, in place (see :meth:`~lightning_lora.adapters.LoRABase.merge`).

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
        if not isinstance(found[name].parent, AdapterContainer):  # those go with their container, below
            found[name].replace(adapter.original_module)
    containers = [(site, site.module) for site in walk(model, into_adapters=False)]
    for site, container in containers:
        if isinstance(container, AdapterContainer):
            site.replace(container.original_module)
    for module in trainable_modules(model).values():
        mark_trainable(module, False)
    vars(model).pop(CONFIG_ATTR, None)
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
        holders = users.get(id(base_weight(adapter.original_module)), [])
        if len(holders) > 1:
            raise ValueError(
                f"cannot merge module '{name}': its weight is shared with {holders!r} (tied weights), "
                f"so merging would change the other module too"
            )

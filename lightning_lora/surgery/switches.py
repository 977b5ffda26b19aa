"""Switching adapters off and on without merging: :func:`disable_adapters` and :func:`set_adapters_enabled`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_lora.surgery.state import lora_modules, merged_modules


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` on or off, in place: off, each layer runs its original module alone.

    Nothing is merged or copied; for code that cannot use :func:`disable_adapters`.

    Raises:
        TypeError: if ``enabled`` is not a bool. RuntimeError: if adapters are merged (their update is
            in the weights; nothing is changed then).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r} ({type(enabled).__name__})")
    adapters = lora_modules(model)
    merged = merged_modules(model)
    if merged and not enabled:
        raise RuntimeError(f"cannot disable merged adapters {merged[:5]!r}: their update is in the weights; unmerge_lora() first")
    for adapter in adapters.values():
        adapter.enabled = enabled


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the ``with`` block: the adapters are switched off, not merged.

    Nestable and exception-safe: on leaving, every adapter is as it was on entering. Under
    ``torch.compile`` the two states compile once each, not at every switch.

    Example::

        with disable_adapters(model):
            reference = model(batch)  # the base model's outputs, e.g. for DPO's reference policy
    """
    adapters = list(lora_modules(model).values())
    previous = [adapter.enabled for adapter in adapters]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for adapter, enabled in zip(adapters, previous):
            adapter.enabled = enabled

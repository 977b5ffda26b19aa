"""Switching adapters off and on without merging: :func:`disable_adapters` and :func:`set_adapters_enabled`.

:func:`disable_adapters` switches the adapters off for the calling thread only: each adapter counts
the blocks of each thread that hold it off, so blocks nest, may be left in any order, and a
reference forward in one thread never runs another thread's training forward without adapters.
:func:`set_adapters_enabled` is the switch for every thread. Inside a block, merging, switching and
adding adapters are refused: each would break the block's promise of the base model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_lora.adapters.base import LoRABase
from lightning_lora.surgery.state import lora_modules, merged_modules

_LOCK = threading.Lock()  # the blocks' counts change under it
#: How many disable_adapters blocks are open, in every thread (0: nothing to check for).
_OPEN = 0


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` on or off for every thread, in place: off, each layer runs its
    original module alone.

    Nothing is merged or copied; for code that cannot use :func:`disable_adapters`.

    Raises:
        TypeError: if ``enabled`` is not a bool. RuntimeError: if adapters are merged (their update is
            in the weights), or a ``disable_adapters`` block holds them; nothing is changed then.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r} ({type(enabled).__name__})")
    adapters = lora_modules(model)
    merged = merged_modules(model)
    if merged and not enabled:
        raise RuntimeError(f"cannot disable merged adapters {merged[:5]!r}: their update is in the weights; unmerge_lora() first")
    check_no_block(adapters, "switch adapters")
    for adapter in adapters.values():
        adapter.enabled = enabled


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the ``with`` block, in this thread: the adapters are
    switched off for it, not merged.

    Nestable, exception-safe, and per thread: on leaving, every adapter is as it was on entering
    (blocks may be left in any order), and other threads run the adapted model meanwhile. Under
    ``torch.compile`` the two states compile once each, not at every switch.

    Raises:
        RuntimeError: if adapters are merged (their update is in the weights).

    Example::

        with disable_adapters(model):
            reference = model(batch)  # the base model's outputs, e.g. for DPO's reference policy
    """
    global _OPEN
    adapters = list(lora_modules(model).values())
    merged = merged_modules(model)
    if merged:
        raise RuntimeError(f"cannot disable merged adapters {merged[:5]!r}: their update is in the weights; unmerge_lora() first")
    thread = threading.get_ident()
    with _LOCK:
        for adapter in adapters:
            adapter.off_threads = {**adapter.off_threads, thread: adapter.off_threads.get(thread, 0) + 1}
        _OPEN += 1
    try:
        yield model
    finally:
        with _LOCK:
            for adapter in adapters:
                counts = dict(adapter.off_threads)
                if counts.get(thread, 0) > 1:
                    counts[thread] -= 1
                else:
                    counts.pop(thread, None)
                adapter.off_threads = counts  # a new dict: forwards of other threads read a whole one
            _OPEN -= 1


def check_no_block(adapters: dict[str, LoRABase], action: str) -> None:
    """Refuse ``action`` while a ``disable_adapters`` block (of any thread) holds any of ``adapters``.

    Raises:
        RuntimeError: naming the modules.
    """
    if not _OPEN:
        return
    held = [name for name, adapter in adapters.items() if adapter.off_threads]
    if held:
        raise RuntimeError(
            f"cannot {action} inside a disable_adapters block: it holds modules {held[:5]!r} off, and "
            f"promises the base model until it ends; {action} after the block"
        )


def blocks_open() -> bool:
    """Whether any ``disable_adapters`` block is open, in any thread."""
    return _OPEN > 0

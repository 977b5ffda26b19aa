"""The random states that drive training, kept in ``LoRACallback``'s checkpoint state for exact resume.

Adapter dropout, a shuffling sampler and the data loader's worker seeds draw from torch's CPU
generator, the CUDA generators, Python's ``random`` and NumPy. Lightning saves none of them, so a run
resumed from a checkpoint would draw other numbers than the run that wrote it. :func:`saved_states`
(every rank calls it, when a checkpoint is written) gathers every rank's states; :func:`restore_states`
(when the checkpoint is loaded, before the data loader draws its first number) gives each rank its own
back. The states are tensors and plain values, so the checkpoint still loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_lora.formats.files import gather_objects, global_rank

try:
    import numpy
except ImportError:  # pragma: no cover - numpy comes with lightning's dependencies
    numpy = None  # type: ignore[assignment]

#: Version of the saved layout.
VERSION = 1


def collect() -> dict[str, Any]:
    """This process's random states: torch's CPU generator, each CUDA device's (once CUDA is in use),
    Python's ``random`` and NumPy's global generator."""
    version, python, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": {"version": version, "state": torch.tensor(python, dtype=torch.int64), "gauss": gauss},
    }
    if numpy is not None:
        legacy: Any = numpy.random.get_state()  # ('MT19937', keys, position, has_gauss, cached)
        kind, keys, position, has_gauss, cached = legacy
        states["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(numpy.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    return states


def restore(states: dict[str, Any]) -> None:
    """Set this process's random states to ``states`` (from :func:`collect`)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    python = states["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss"]))
    saved = states.get("numpy")
    if saved is not None and numpy is not None:
        keys = saved["keys"].numpy().astype(numpy.uint32)
        numpy.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached"]))


def saved_states(end_of_epoch: bool) -> dict[str, Any]:
    """What a checkpoint keeps: every rank's random states (gathered: every rank must call this)."""
    return {"version": VERSION, "ranks": gather_objects(collect()), "end_of_epoch": end_of_epoch}


def restore_states(saved: dict[str, Any] | None, world_size: int, path: str) -> None:
    """Give this rank its random states from a checkpoint's ``saved`` (see :func:`saved_states`).

    Warns once, and restores nothing, where they cannot make the resume exact: a checkpoint without
    them (written before they were kept), or one of another number of processes; warns that the resume
    is not exact from a checkpoint taken inside an epoch (the data loader starts the epoch again).
    """
    if not isinstance(saved, dict) or "ranks" not in saved:
        rank_zero_warn(
            f"LoRA: {path} holds no random states (written by an older lightning_lora): the resumed run "
            f"draws other dropout masks and data orders than an uninterrupted one would"
        )
        return
    if saved.get("version", 0) > VERSION:
        raise ValueError(f"{path}: its random states have version {saved['version']}, newer than {VERSION}; upgrade lightning_lora")
    ranks = saved["ranks"]
    if len(ranks) != world_size:
        rank_zero_warn(
            f"LoRA: {path} was written by {len(ranks)} processes and resumes on {world_size}: their random "
            f"states are not restored, so the resumed run is not exact"
        )
        return
    restore(ranks[global_rank()])
    if not saved.get("end_of_epoch", True):
        rank_zero_warn(
            f"LoRA: {path} was taken inside an epoch: the random states are restored, but the data loader "
            f"starts that epoch again, so the resumed run is not exact (resume from an end-of-epoch checkpoint)"
        )

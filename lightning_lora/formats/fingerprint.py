"""A cheap, deterministic identifier of a model's frozen base weights, whatever dtype holds them.

It hashes every base parameter's name and shape and a fixed sample of its values (the same evenly
spaced positions every time), so its cost does not grow with tensor size beyond the sample. It tells
apart different checkpoints of one architecture; weights that differ only outside the sampled
positions are not told apart. Weights sharded across ranks are sampled where they lie (every rank
must then take part) and give the digest of the whole tensors, whatever the number of ranks.

The dtypes the weights had are recorded beside the digest (:func:`dtypes_of`). A check casts the
sampled values to those dtypes first, so weights saved in bfloat16, float16 or float64 after a cast
from float32 (Lightning's ``*-true`` precisions) match the float32 base they came from; weights held
in a lower precision than recorded cannot, and :func:`dtype_note` says so in the error.

A quantized weight (``quantize="nf4"``) is fingerprinted as stored: its 4-bit codes and scales, not
the values they decode to, and its dtype is recorded as ``nf4``. Adapters trained on a quantized base
therefore do not match the unquantized one (nor one quantized otherwise), and the note says which.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lightning_lora.adapters.spec import ADAPTER_DTYPES, dtype_name
from lightning_lora.quantize import METHODS, quantized_format, stored_parts
from lightning_lora.sharding import sample_flat
from lightning_lora.surgery.state import base_named_parameters, merged_modules

#: Values sampled from each tensor.
SAMPLES_PER_TENSOR = 256
_DEFAULT = ""  # key of the most common dtype in a dtype map; other keys are tensor names


def base_fingerprint(model: nn.Module, trainable: Iterable[str] | None = None) -> str:
    """Hex digest of the base weights of ``model``, the same before and after adaptation.

    Args:
        model: the model, adapted or not.
        trainable: names of fully trainable modules to leave out (default: the model's own).

    Raises:
        RuntimeError: if an adapter is merged (the weights then hold the update too).
    """
    return fingerprint_tensors(_base(model, trainable))


#: Sampled values of tensors already read, by ``id`` of the tensor: one save reads each tensor once,
#: however many fingerprints it computes (a checkpoint's and its companion's name the tensors differently).
Samples = dict[int, "torch.Tensor | None"]


def fingerprint_matches(named: Iterable[tuple[str, torch.Tensor]], digest: str, dtypes: Mapping[str, str] | None) -> bool:
    """Whether named tensors match a recorded digest, taken in the recorded ``dtypes``.

    ``dtypes=None`` means a record of format version 1, whose digest is :func:`legacy_fingerprint`.
    """
    named = list(named)
    return (fingerprint_tensors(named, dtypes) if dtypes is not None else legacy_fingerprint(named)) == digest


def fingerprint_tensors(
    named: Iterable[tuple[str, torch.Tensor]], dtypes: Mapping[str, str] | None = None, samples: Samples | None = None
) -> str:
    """Hex digest of named tensors: each name and shape, and a fixed sample of values.

    Args:
        named: (name, tensor) pairs.
        dtypes: cast the sampled values of each tensor to these dtypes first (a map from
            :func:`dtypes_of`); default: each tensor's own dtype.
        samples: values sampled before (reused, and filled with those read now).
    """
    return _fingerprint(
        named,
        lambda name, tensor: f"{name}|{tuple(tensor.shape)}",
        lambda name, tensor: _dtype_for(dtypes, name) if dtypes is not None else tensor.dtype,
        {} if samples is None else samples,
    )


def legacy_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The digest files and checkpoints of format version 1 hold: the dtype was part of the hash."""
    return _fingerprint(named, lambda name, tensor: f"{name}|{tuple(tensor.shape)}|{tensor.dtype}", lambda _, tensor: tensor.dtype, {})


def _fingerprint(
    named: Iterable[tuple[str, torch.Tensor]],
    line: Callable[[str, torch.Tensor], str],
    dtype: Callable[[str, torch.Tensor], torch.dtype],
    samples: Samples,
) -> str:
    """SHA-256 of ``line`` of each tensor (in name order), then of its sampled values cast to ``dtype``
    (those of a quantized tensor's stored parts as they are)."""
    digest = hashlib.sha256()
    values: list[torch.Tensor] = []
    for name, tensor in sorted(named, key=lambda item: item[0]):
        parts = stored_parts(tensor)
        stored = f"|{quantized_format(tensor)}" if parts else ""
        digest.update(f"{line(name, tensor)}{stored}\n".encode())
        if parts:
            values += [sample for part in parts.values() if (sample := _sampled(part, samples)) is not None]
            continue
        sample = _sampled(tensor, samples)
        if sample is not None:
            values.append(sample.to(dtype(name, tensor)).to(torch.float64))
    if values:
        device = values[0].device
        digest.update(torch.cat([v.to(device) for v in values]).cpu().numpy().tobytes())  # one small transfer
    return digest.hexdigest()


def _sampled(tensor: torch.Tensor, samples: Samples) -> torch.Tensor | None:
    """:func:`_sample` of ``tensor``, read once per ``samples``."""
    if id(tensor) not in samples:
        samples[id(tensor)] = _sample(tensor)
    return samples[id(tensor)]


def dtypes_of(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """The dtype of each tensor, compactly: ``{"": the most common dtype, name: dtype of each other one}``.

    A quantized tensor's dtype is its format (``"nf4"``).
    """
    dtypes = {name: _held(tensor) for name, tensor in named}
    if not dtypes:
        return {}
    counts: dict[str, int] = {}
    for value in dtypes.values():
        counts[value] = counts.get(value, 0) + 1
    common = max(counts, key=lambda value: counts[value])
    return {_DEFAULT: common, **{name: value for name, value in dtypes.items() if value != common}}


def dtype_note(named: Iterable[tuple[str, torch.Tensor]], dtypes: Mapping[str, str] | None) -> str:
    """A sentence for error messages when the weights' dtypes (or quantization) differ from the
    recorded ones, else ""."""
    if not dtypes:
        return ""
    differing = {
        name: (recorded, held)
        for name, tensor in named
        if (recorded := dtypes.get(name, dtypes.get(_DEFAULT, "float32"))) != (held := _held(tensor))
    }
    if not differing:
        return ""
    quantized = {name: pair for name, pair in differing.items() if any(value in METHODS for value in pair)}
    name, (recorded, held) = next(iter((quantized or differing).items()))
    if quantized and recorded in METHODS:
        return (
            f" Note: the file's base was quantized and {len(quantized)} of this model's base weights are not "
            f"(e.g. '{name}': {held} now, {recorded} then); quantize the model first with "
            f"lightning_lora.quantize_base(model, {recorded!r})."
        )
    if quantized:
        return (
            f" Note: {len(quantized)} of this model's base weights are quantized and were not when the file was "
            f"written (e.g. '{name}': {held} now, {recorded} then); load the base weights unquantized."
        )
    return (
        f" Note: {len(differing)} base weights are held in another dtype than when the file was written "
        f"(e.g. '{name}': {held} now, {recorded} then); a copy in a lower precision "
        f"cannot match, so load the base weights in {recorded}."
    )


def _base(model: nn.Module, trainable: Iterable[str] | None) -> list[tuple[str, torch.Tensor]]:
    merged = merged_modules(model)
    if merged:
        raise RuntimeError(f"cannot fingerprint base weights while modules {merged[:5]!r} are merged; unmerge first")
    return list(base_named_parameters(model, trainable))


def _held(tensor: torch.Tensor) -> str:
    """The name of the dtype ``tensor`` is held in: its quantized format, else its dtype."""
    return quantized_format(tensor) or dtype_name(tensor.dtype)


def _dtype_for(dtypes: Mapping[str, str], name: str) -> torch.dtype:
    value = dtypes.get(name, dtypes.get(_DEFAULT, "float32"))
    return ADAPTER_DTYPES.get(value, torch.float64)


def _sample(tensor: torch.Tensor) -> torch.Tensor | None:
    """The sampled values in float64 (exact for every dtype a weight has); sharded tensors are sampled
    on each rank's own shard (see :func:`lightning_lora.sharding.sample_flat`)."""
    if tensor.is_meta or tensor.numel() == 0:
        return None
    count = min(SAMPLES_PER_TENSOR, tensor.numel())
    index = torch.linspace(0, tensor.numel() - 1, count).round().long()
    return sample_flat(tensor, index)

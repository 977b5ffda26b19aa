"""Lightning checkpoints of LoRA models: slim by default, verified on load, with companion adapter files.

A slim checkpoint leaves out the frozen base weights (a checkpoint of a 7B model is megabytes) and
records, under ``checkpoint["lora"]``, which keys were left out, a fingerprint of those tensors and the
adapter layout. On load the left-out keys are filled from the model in memory, but only after its
weights are shown to match the fingerprint; any other missing key still fails strict loading.

:class:`LoRACheckpointIO` wraps a strategy's ``CheckpointIO`` so that every checkpoint Lightning
writes is slimmed and gets a companion adapter file (``epoch=2-step=300.ckpt`` ->
``epoch=2-step=300.lora.safetensors``), removed together with it.

A checkpoint and its companion never disagree silently. The checkpoint records a digest of the
adapter tensors (``adapter_digest``) and the companion records the checkpoint's epoch and global
step, and the SHA-256 of each of the checkpoint's files, verified before the checkpoint is loaded
(:mod:`~lightning_lora.lightning.digests`). Writes are ordered so that a crash leaves either a
matching pair or a checkpoint without a companion: the old companion is removed, the checkpoint written (atomically, for local files through
Lightning's default IO), then the companion written atomically; removal takes the companion first.
:func:`check_companion` verifies a pair and :func:`write_companion` regenerates a missing or stale
companion from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.config import LoRAConfig, config_of_specs
from lightning_lora.formats.adapter_file import (
    SUFFIX,
    adapter_contents,
    adapter_tensors,
    read_adapter,
    serialize,
    tensors_digest,
)
from lightning_lora.formats.files import exists, read_bytes, remove_if_exists, write_atomic, write_on_rank_zero
from lightning_lora.formats.fingerprint import Samples, dtype_note, dtypes_of, fingerprint_matches, fingerprint_tensors
from lightning_lora.formats.peft import CONFIG_FILE, WEIGHTS_FILE, export_peft
from lightning_lora.lightning.digests import SINGLE, digest_bytes, digest_file, verify_checkpoint, warn_unverified
from lightning_lora.lightning.spawn import write_final_adapters
from lightning_lora.sharding import is_sharded
from lightning_lora.surgery.apply import Installation, install
from lightning_lora.surgery.plan import AdapterPlan, check_fits
from lightning_lora.surgery.state import adapted, lora_config, lora_modules

#: The file of a sharded checkpoint folder that holds everything but the tensors (Lightning's name).
METADATA_FILE = "meta.pt"
#: Key of the LoRA record in a Lightning checkpoint.
CHECKPOINT_KEY = "lora"
CHECKPOINT_VERSION = 2
#: A key put first in a LoRA checkpoint's state dict (holding an empty tensor) and taken out again
#: before this package loads it. A loader that knows nothing of LoRA (``load_from_checkpoint`` of a
#: class without ``LoRAMixin``, a resume without ``LoRACallback``) reports it as the first unexpected
#: key, so its error says what the file is and how to load it.
MARKER_KEY = (
    "[lightning_lora] a LoRA checkpoint: the model must be adapted to load it; load it with LoRAMixin, "
    "through LoRACallback, or with lightning_lora.load_checkpoint(model, path)"
)


def adapter_path_for(checkpoint_path: str) -> str:
    """The companion adapter file of a checkpoint: ``x.ckpt`` -> ``x.lora.safetensors``."""
    path = str(checkpoint_path)
    return (path[: -len(".ckpt")] if path.endswith(".ckpt") else path) + SUFFIX


def peft_path_for(checkpoint_path: str) -> str:
    """The PEFT folder written beside a checkpoint when asked for: ``x.ckpt`` -> ``x.peft/``."""
    path = str(checkpoint_path)
    return (path[: -len(".ckpt")] if path.endswith(".ckpt") else path) + ".peft"


def step_of(checkpoint: Mapping[str, Any]) -> dict[str, int]:
    """The ``epoch`` and ``global_step`` of a Lightning checkpoint (0 where absent): what its companion records."""
    return {"epoch": checkpoint.get("epoch", 0), "global_step": checkpoint.get("global_step", 0)}


@dataclass(frozen=True)
class Prepared:
    """What a save adds to a checkpoint: its LoRA record and, if asked for, its companion file's contents
    (tensors and metadata), serialised once the checkpoint's files are written and digested."""

    record: dict[str, Any]
    contents: tuple[dict[str, torch.Tensor], dict[str, str]] | None

    def companion(self, files: Mapping[str, str]) -> bytes:
        """The companion file's bytes, recording the digests ``files`` of the checkpoint's files."""
        assert self.contents is not None
        tensors, metadata = self.contents
        return serialize(tensors, {**metadata, "checkpoint_files": json.dumps(dict(files), sort_keys=True)})


def prepare_checkpoint(
    module: nn.Module, step: Mapping[str, int], keep_base_weights: bool = False, companion: bool = True
) -> Prepared | None:
    """The LoRA record of a checkpoint of ``module`` at ``step`` and its companion file, or None for a
    model without adapters or with merged ones (its weights then differ from the base).

    The adapters are read (gathered, for a sharded model: every rank must call this then) and the
    base weights sampled once, for both the record and the companion.
    """
    adapters, trainable = adapted(module)
    if not adapters or any(adapter.merged for adapter in adapters.values()):
        return None
    samples: Samples = {}
    contents = adapter_contents(module, checkpoint=step, samples=samples) if companion else None
    tensors = contents[0] if contents is not None else adapter_tensors(module)
    state = module.state_dict(keep_vars=True)
    # from the module, not the checkpoint: under a sharded strategy rank 0 alone may hold a full state
    dropped = [] if keep_base_weights else [
        key for key, value in state.items() if isinstance(value, nn.Parameter) and not value.requires_grad
    ]
    named = [(key, state[key].detach()) for key in dropped]
    specs = {name: layer.spec for name, layer in adapters.items()}
    record = {
        "version": CHECKPOINT_VERSION,
        "base_keys": dropped,
        "base_fingerprint": fingerprint_tensors(((key, state[key]) for key in dropped), samples=samples),
        "base_dtypes": dtypes_of(named),
        "config": (lora_config(module) or config_of_specs(specs, trainable)).to_dict(),
        "modules": {name: spec.to_dict() for name, spec in specs.items()},
        "trainable": list(trainable),
        "adapter_digest": tensors_digest(tensors),  # as its companion file holds them
    }
    return Prepared(record, contents)


def slim_checkpoint(checkpoint: dict[str, Any], module: nn.Module, keep_base_weights: bool = False) -> None:
    """Record the LoRA layout in ``checkpoint`` and, unless ``keep_base_weights``, drop frozen weights.

    Changes ``checkpoint`` in place. A checkpoint already slimmed, or of a model without adapters or
    with merged ones (its weights then differ from the base), is left as it is.
    """
    if CHECKPOINT_KEY not in checkpoint:
        apply_record(checkpoint, prepare_checkpoint(module, step_of(checkpoint), keep_base_weights, companion=False))


def apply_record(checkpoint: dict[str, Any], prepared: Prepared | None) -> None:
    """Put a prepared LoRA record into ``checkpoint`` and drop the base weights it lists, in place."""
    if prepared is None or CHECKPOINT_KEY in checkpoint:
        return
    state = checkpoint["state_dict"]
    checkpoint[CHECKPOINT_KEY] = prepared.record
    for key in prepared.record["base_keys"]:
        state.pop(key, None)
    checkpoint["state_dict"] = {MARKER_KEY: torch.zeros(0), **state}


def restore_checkpoint(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Make a slim checkpoint loadable into ``module``: adapt it if needed, fill in the base weights.

    Changes ``checkpoint`` (and, if ``module`` has no adapters yet, ``module``) in place. A
    checkpoint without a LoRA record is left as it is. Adapters ``module`` already has must have the
    recorded settings (their dtype aside: Lightning may convert the model after restoring it).

    Raises:
        ValueError: if the checkpoint is of a newer format, was saved from a model with other adapters
            or base weights this module does not have, or this module's base weights differ from those
            trained on. ``module`` is unchanged then.
    """
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is None or "state_dict" not in checkpoint:  # none, or the strategy loaded it already
        return
    installed = check_record(record, module)
    try:
        _fill_base_weights(record, checkpoint["state_dict"], module)
    except ValueError:
        installed.undo()
        raise
    checkpoint["state_dict"].pop(MARKER_KEY, None)


def check_record(record: dict[str, Any], module: nn.Module) -> Installation:
    """Check a checkpoint's LoRA record against ``module``, adapting it as recorded if needed.

    Adapters ``module`` already has must have the recorded settings (their dtype aside: Lightning may
    convert the model after restoring it), and its base weights must match the recorded fingerprint
    (for a sharded model every rank must call this: the fingerprint is read from the shards).

    Returns:
        The :class:`~lightning_lora.surgery.Installation` of the adapters it added (to undo them).

    Raises:
        ValueError: if the record is of a newer format, was saved from a model with other adapters
            or base weights. ``module`` is unchanged then.
    """
    if record.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint LoRA record has version {record.get('version')}, newer than this lightning_lora "
            f"supports ({CHECKPOINT_VERSION}); upgrade lightning_lora"
        )
    specs = {name: AdapterSpec.from_dict(spec) for name, spec in record["modules"].items()}
    current = lora_modules(module)
    for name, spec in list(specs.items()):
        if name in current:  # the dtype is left to Lightning's precision plugin
            specs[name] = dataclasses.replace(spec, adapter_dtype=current[name].spec.adapter_dtype)
    check_fits(module, specs, "checkpoint")
    installed = install(module, AdapterPlan(specs, LoRAConfig.from_dict(record["config"]), tuple(record["trainable"])))
    try:
        _check_base(record, module)
    except ValueError:
        installed.undo()
        raise
    return installed


def load_checkpoint(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a Lightning checkpoint of a LoRA model into ``module``, in place, without Lightning.

    For models without :class:`~lightning_lora.LoRAMixin`: ``module`` (e.g. a fresh LightningModule with
    its base weights loaded) is adapted as recorded, its base weights are checked against the
    checkpoint's fingerprint, the left-out base weights are taken from it, and the checkpoint's
    ``state_dict`` is loaded. Nothing but tensors and plain values is unpickled.

    Returns:
        ``module``.

    Raises:
        ValueError: if the checkpoint is not a LoRA checkpoint or does not fit ``module``.
    """
    _load_into(module, read_checkpoint(str(path)), str(path), strict)
    return module


def _load_into(module: nn.Module, checkpoint: dict[str, Any], path: str, strict: bool) -> None:
    if not isinstance(checkpoint.get(CHECKPOINT_KEY), dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} is not a LoRA checkpoint (it has no {CHECKPOINT_KEY!r} record)")
    restore_checkpoint(checkpoint, module)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)


def _check_base(record: dict[str, Any], module: nn.Module) -> None:
    base_keys = record["base_keys"]
    own = module.state_dict()
    unknown = [key for key in base_keys if key not in own]
    if unknown:
        raise ValueError(
            f"checkpoint was saved without base weights {unknown[:5]!r} that this model does not have; "
            f"load it into the model it was trained with"
        )
    named = [(key, own[key]) for key in base_keys]
    dtypes = record.get("base_dtypes")  # absent in records of version 1
    if not fingerprint_matches(named, record["base_fingerprint"], dtypes):
        found = fingerprint_tensors(named)
        raise ValueError(
            f"checkpoint was trained on different base weights (fingerprint {record['base_fingerprint'][:12]} "
            f"in the checkpoint, {found[:12]} in this model): it holds no base weights, so load the base "
            f"model it was trained on before resuming, or save with save_base_weights=True.{dtype_note(named, dtypes)}"
        )


def _fill_base_weights(record: dict[str, Any], state: dict[str, Any], module: nn.Module) -> None:
    own = module.state_dict()
    for key in record["base_keys"]:
        state.setdefault(key, own[key])


def check_companion(checkpoint_path: str | os.PathLike) -> bool:
    """Check that a checkpoint (a file, or a sharded checkpoint's folder) and its companion adapter file
    belong together, and the checkpoint's files match the digests the companion records.

    Returns:
        Whether the files were verified against digests (False: a companion written before they were
        recorded, with a warning).

    Raises:
        ValueError: if a file of the checkpoint differs from its digest, the checkpoint has no LoRA
            record, the companion is missing, or it holds other adapter tensors or another step than
            the checkpoint records (a stale pair).
    """
    path = str(checkpoint_path)
    verified = verify_checkpoint(path, adapter_path_for)  # before it is read; False without a companion
    check_loaded_pair(read_checkpoint(os.path.join(path, METADATA_FILE) if os.path.isdir(path) else path), path)
    return verified


def warn_if_stale_companion(checkpoint: dict[str, Any], path: str) -> None:
    """On resume from ``path`` (already loaded as ``checkpoint``): a warning if its companion exists
    but belongs to another checkpoint."""
    if exists(adapter_path_for(path)):
        try:
            check_loaded_pair(checkpoint, path)
        except ValueError as err:
            rank_zero_warn(f"LoRA: resuming from {path}, whose companion adapter file is stale: {err}")


def check_loaded_pair(checkpoint: dict[str, Any], path: str) -> None:
    """:func:`check_companion` of the checkpoint ``path``, already loaded as ``checkpoint``."""
    record = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(record, dict) or "adapter_digest" not in record:
        raise ValueError(f"{path} has no LoRA record of its adapter (not written by this lightning_lora version)")
    companion = adapter_path_for(path)
    if not exists(companion):
        raise ValueError(f"{path} has no companion {companion}; regenerate it with lightning_lora.write_companion")
    adapter = read_adapter(companion)
    step = step_of(checkpoint)
    if tensors_digest(adapter.tensors) != record["adapter_digest"] or adapter.checkpoint != step:
        raise ValueError(
            f"{companion} does not belong to {path} (a stale pair: companion of step {adapter.checkpoint}, "
            f"checkpoint of step {step}); regenerate it with lightning_lora.write_companion"
        )


def write_companion(checkpoint_path: str | os.PathLike, module: nn.Module) -> str:
    """Regenerate a checkpoint's companion adapter file from the checkpoint itself.

    ``module`` is the model the checkpoint was trained from (e.g. a fresh LightningModule with the
    base weights loaded); it is adapted if needed and loads the checkpoint's state, in place, after
    the base weights are checked against the checkpoint's fingerprint. Only global rank 0 writes.

    Returns:
        The companion's path.

    Raises:
        ValueError: if the checkpoint is a folder (sharded), has no LoRA record or does not fit ``module``.
    """
    path = str(checkpoint_path)
    if os.path.isdir(path):
        raise ValueError(
            f"checkpoint_path must be a checkpoint file, got {path!r}, a folder: the companion of a sharded "
            f"checkpoint is written by its save, on every rank (resume from it and save again to regenerate one)"
        )
    data = read_bytes(path)
    checkpoint = parse_checkpoint(data, path)
    _load_into(module, checkpoint, path, strict=True)
    companion = adapter_path_for(path)
    tensors, metadata = adapter_contents(module, checkpoint=step_of(checkpoint))
    files = json.dumps({SINGLE: digest_bytes(data)})  # the checkpoint as it is now
    write_on_rank_zero(companion, serialize(tensors, {**metadata, "checkpoint_files": files}))
    return companion


class LoRACheckpointIO(CheckpointIO):
    """Wraps a ``CheckpointIO``: slims every checkpoint, writes and removes its adapter file.

    Args:
        checkpoint_io: the strategy's own ``CheckpointIO`` that reads and writes the files.
        module: a callable returning the LightningModule whose adapters are saved.
        save_base_weights: keep the frozen base weights in the checkpoint.
        owner: the object that installed this wrapper (a ``LoRACallback``), if any.
        linked: a callable returning the checkpoint paths that are links to other checkpoints
            (``ModelCheckpoint(save_last="link")``): their companions are links too, removed before any
            checkpoint is written and put back by :func:`link_companion` once the checkpoint link is.
        export: also write each checkpoint's adapters in PEFT's format to ``x.peft/`` beside it:
            ``"peft"`` or ``"vllm"`` (see :func:`lightning_lora.export_peft`); None writes none.
    """

    def __init__(
        self,
        checkpoint_io: CheckpointIO,
        module: Callable[[], nn.Module],
        save_base_weights: bool = False,
        owner: object = None,
        linked: Callable[[], list[str]] = list,
        export: str | None = None,
    ) -> None:
        self.checkpoint_io = checkpoint_io
        self._module = module
        self.save_base_weights = save_base_weights
        self.owner = owner
        self.linked = linked
        self.export = export
        #: The record and companion, when every rank prepared them (sharded models: rank 0 alone cannot).
        self.prepared: Prepared | None = None
        self._warned_merged = False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        module = self._module()
        if "state_dict" not in checkpoint:  # the bare state dict a spawn launcher's rank 0 returns
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            write_final_adapters(module, str(path))
            return
        adapters, _ = adapted(module)
        if any(adapter.merged for adapter in adapters.values()):
            if not self._warned_merged:
                rank_zero_warn(
                    f"LoRA adapters are merged: saving {path} as a full checkpoint without an adapter file"
                )
                self._warned_merged = True
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        prepared = self.prepared
        if prepared is None and adapters:
            if is_sharded(module):  # gathering it here, where rank 0 alone runs, would wait forever
                raise RuntimeError(
                    f"cannot write {path}: the model is sharded, and its checkpoints are saved through the "
                    f"strategy with LoRACallback attached (trainer.save_checkpoint on every rank)"
                )
            prepared = prepare_checkpoint(module, step_of(checkpoint), self.save_base_weights)
        apply_record(checkpoint, prepared)
        remove_stale_companions(str(path), self.linked())
        digest = self._write(checkpoint, path, storage_options)
        if prepared is not None and prepared.contents is not None:
            write_atomic(adapter_path_for(str(path)), prepared.companion({SINGLE: digest}))
            if self.export is not None:
                export_peft(module, peft_path_for(str(path)), target=self.export)

    def _write(self, checkpoint: dict[str, Any], path: Any, storage_options: Any) -> str:
        """Lightning's default IO writes in place; then write atomically instead, else delegate.

        Returns:
            The SHA-256 of the file written: of the bytes in memory, or read back once where another IO wrote it.
        """
        if type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getbuffer()
            write_atomic(str(path), data)
            return digest_bytes(data)
        self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
        return digest_file(str(path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Verify the checkpoint's bytes against its companion's digests, then load it through the wrapped IO
        with ``weights_only=True`` (nothing but tensors and plain values is unpickled) unless the caller
        passes ``weights_only=False`` for a trusted file; then restore it."""
        weights_only = True if weights_only is None else weights_only
        verified = verify_checkpoint(str(path), adapter_path_for)
        checkpoint = self.checkpoint_io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if "state_dict" in checkpoint:
            if not verified and CHECKPOINT_KEY in checkpoint and not exists(adapter_path_for(str(path))):
                warn_unverified(str(path))
            restore_checkpoint(checkpoint, self._module())
            warn_if_stale_companion(checkpoint, str(path))
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        remove_if_exists(adapter_path_for(str(path)))  # first: a crash leaves a checkpoint without companion
        _remove_peft(str(path))
        self.checkpoint_io.remove_checkpoint(path)

    def teardown(self) -> None:
        self.checkpoint_io.teardown()


def link_companion(link: str) -> None:
    """Make the companion of checkpoint link ``link`` a link to the companion of the checkpoint it points to.

    Lightning's ``ModelCheckpoint(save_last="link")`` makes ``last.ckpt`` a symbolic link (a copy where
    links are not allowed); this gives ``last.lora.safetensors`` the same treatment. Local paths only.
    """
    if not os.path.islink(link):
        return
    companion = adapter_path_for(link)
    target = adapter_path_for(os.path.join(os.path.dirname(link), os.readlink(link)))
    if os.path.exists(target):
        if os.path.lexists(companion):
            os.remove(companion)
        os.symlink(os.path.relpath(target, os.path.dirname(companion)), companion)


def remove_stale_companions(checkpoint_path: str, links: list[str]) -> None:
    """Before ``checkpoint_path`` is written: remove its companion, its PEFT export and the companions of
    the checkpoint links ``links`` (they may move to it). A crash from then on leaves a checkpoint
    without companion, never a checkpoint beside another one's companion."""
    for link in links:
        remove_if_exists(adapter_path_for(link))
    remove_if_exists(adapter_path_for(checkpoint_path))
    _remove_peft(checkpoint_path)


def _remove_peft(checkpoint_path: str) -> None:
    folder = peft_path_for(checkpoint_path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # the config first: without it the folder is no adapter
        remove_if_exists(os.path.join(folder, name))
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint file, read with ``weights_only=True`` (nothing but tensors and plain values is unpickled).

    Raises:
        ValueError: if it is not a readable checkpoint, or holds something other than a dict.
    """
    return parse_checkpoint(read_bytes(path), path)


def parse_checkpoint(data: bytes, path: str) -> dict[str, Any]:
    """The bytes ``data`` of the checkpoint file ``path``, loaded as :func:`read_checkpoint` loads them."""
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError) as err:  # torch's errors for bad files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip() or type(err).__name__
        raise ValueError(f"{path} is not a readable checkpoint: {text.split('. ')[0].splitlines()[0]}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint

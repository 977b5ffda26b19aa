"""LoRA checkpoints under Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``).

That strategy reads and writes checkpoints without the ``CheckpointIO`` that
:class:`~lightning_lora.checkpoint.LoRACheckpointIO` wraps: a sharded checkpoint (its default) is a
folder that every rank writes its shards into, a full one (``save_distributed_checkpoint=False``) a
file that rank 0 writes after a gather. :class:`ShardedCheckpoints` wraps the strategy's own
``save_checkpoint`` and ``load_checkpoint`` on the instance, for one run:

- Save (every rank runs it): the adapters are gathered and the checkpoint slimmed (the base
  fingerprint is read from every rank's shards), rank 0 removes the old companion, the strategy
  writes the checkpoint, every rank waits for it and digests the files it wrote, then rank 0 writes
  the companion adapter file with the whole tensors and every file's digest. A sharded checkpoint
  is written into a hidden folder beside its path (``.<name>.<random>.tmp``) and rank 0 renames it
  into place once every rank has written its part (an old one at that path is renamed aside first).
  A crash, or a rank killed, leaves the previous checkpoint at that path (or a checkpoint without
  companion), never a folder with some shards missing or some of another save's, and never a
  mismatched pair; the next save of that path removes the hidden folders killed saves left.
- Load: the checkpoint's files must match the digests its companion records (the ranks share the
  files between them), before anything of it is read; the checkpoint's adapters must already be in
  the model (they cannot be added once it is sharded) and its base weights must match the recorded
  fingerprint; then only the tensors the
  checkpoint holds are loaded (a sharded one through ``torch.distributed.checkpoint``, a full one
  through the strategy), with the optimizer states, and every other key of the model is still
  required. The adapters loaded must be those the record describes, and a stale companion is
  reported.

The wrappers stay on the strategy after the run, so that ``trainer.save_checkpoint`` after ``fit``
writes the same slim checkpoints (every rank calls it, as Lightning asks).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lightning_lora.formats.adapter_file import adapter_tensors, tensors_digest
from lightning_lora.formats.files import (
    exists,
    gather_objects,
    publish_staged,
    remove_leftovers,
    staging_folder,
    write_atomic,
)
from lightning_lora.lightning.checkpoint import (
    CHECKPOINT_KEY,
    MARKER_KEY,
    METADATA_FILE,
    LoRACheckpointIO,
    adapter_path_for,
    apply_record,
    check_record,
    prepare_checkpoint,
    remove_stale_companions,
    step_of,
    warn_if_stale_companion,
)
from lightning_lora.lightning.digests import checkpoint_files, digests_of, verify_checkpoint, warn_unverified
from lightning_lora.surgery.state import lora_modules

#: A shard of ``torch.distributed.checkpoint``'s file system writer: ``__<rank>_<n>.distcp``.
_SHARD = re.compile(r"__(\d+)_\d+\.distcp")


class ShardedCheckpoints:
    """Slim, verified checkpoints with companion adapter files for a ``ModelParallelStrategy``.

    Args:
        strategy: the strategy whose ``save_checkpoint`` and ``load_checkpoint`` are wrapped.
        checkpoint_io: the :class:`LoRACheckpointIO` of the run (its settings apply; it writes the
            companions of full checkpoints, which reach it on rank 0 only).
    """

    def __init__(self, strategy: ModelParallelStrategy, checkpoint_io: LoRACheckpointIO) -> None:
        self.strategy = strategy
        self.checkpoint_io = checkpoint_io
        self._save: Callable[..., None] = strategy.save_checkpoint
        self._load: Callable[..., dict[str, Any]] = strategy.load_checkpoint

    def attach(self) -> None:
        """Put the wrappers on the strategy instance."""
        vars(self.strategy)["save_checkpoint"] = self.save_checkpoint
        vars(self.strategy)["load_checkpoint"] = self.load_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        module = self.strategy.lightning_module
        # every rank: the adapters are gathered and the base sampled from each rank's shards
        prepared = None if module is None or "state_dict" not in checkpoint else prepare_checkpoint(
            module, step_of(checkpoint), self.checkpoint_io.save_base_weights
        )
        if prepared is None or prepared.contents is None:
            self._save(checkpoint, filepath, storage_options)
            return
        path = str(self.strategy.broadcast(str(filepath)))
        apply_record(checkpoint, prepared)
        # a sharded checkpoint is written into a hidden folder beside its path, published when whole:
        # until then the previous checkpoint at that path and its companion stay as they were
        folder = getattr(self.strategy, "_save_distributed_checkpoint", True)
        if self.strategy.is_global_zero and not folder:
            remove_stale_companions(path, self.checkpoint_io.linked())
        staging = ""  # rank 0 creates the hidden folder, every rank writes into it
        if folder:
            staging = str(self.strategy.broadcast(staging_folder(path) if self.strategy.is_global_zero else ""))
        self.checkpoint_io.prepared = prepared  # a full checkpoint reaches the IO on rank 0 only
        try:
            self._save(checkpoint, staging or filepath, storage_options)
        except BaseException:
            if staging and self.strategy.is_global_zero:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self.checkpoint_io.prepared = None
        self.strategy.barrier("lightning_lora.save_checkpoint")  # every shard is written
        if folder:  # sharded: no IO wrote the companion
            digests = self._digests(staging)
            if self.strategy.is_global_zero:
                remove_stale_companions(path, self.checkpoint_io.linked())
                publish_staged(staging, path)
                remove_leftovers(path)  # of saves of this path that were killed before
                write_atomic(adapter_path_for(path), prepared.companion(digests))
            self.strategy.barrier("lightning_lora.publish_checkpoint")  # every rank sees it published

    def _digests(self, path: str) -> dict[str, str]:
        """Every file of the sharded checkpoint ``path`` and its digest: each rank digests the shards it
        wrote (rank 0 also the metadata), and every rank gets them all."""
        rank = self.strategy.global_rank
        names = [
            name for name in checkpoint_files(path)
            if (int(match.group(1)) == rank if (match := _SHARD.fullmatch(os.path.basename(name))) else rank == 0)
        ]
        found: dict[str, str] = {}
        for part in gather_objects(digests_of(path, names)):
            found.update(part)
        return found

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.strategy.broadcast(str(checkpoint_path)))
        share = (self.strategy.global_rank, self.strategy.world_size)
        verified = verify_checkpoint(str(path), adapter_path_for, share)  # before anything of it is unpickled
        sharded = path.is_dir()
        weights_only = True if weights_only is None else weights_only
        head = torch.load(path / METADATA_FILE if sharded else path, map_location="cpu", mmap=True, weights_only=weights_only)
        record = head.get(CHECKPOINT_KEY)
        module = self.strategy.lightning_module
        if record is None or module is None:
            return self._load(checkpoint_path, weights_only)
        if not verified and not exists(adapter_path_for(str(path))):
            warn_unverified(str(path))
        missing_adapters = sorted(set(record["modules"]) - set(lora_modules(module)))
        if missing_adapters:  # they cannot be added to a sharded model
            raise ValueError(
                f"checkpoint {path} was trained with adapters on modules {missing_adapters[:5]!r} that this model "
                f"does not have; resume with the targets it was trained with"
            )
        check_record(record, module)  # every rank: the fingerprint is read from the shards
        base = set(record["base_keys"])
        model_keys = set(get_model_state_dict(module))
        held = _sharded_keys(path) if sharded else set(head["state_dict"]) - {MARKER_KEY}
        missing = sorted(model_keys - held - base)
        if missing:
            raise ValueError(f"checkpoint {path} misses tensors {missing[:5]!r} of this model (not base weights)")
        if sharded:
            self._load_sharded(path, module, base)
            metadata = head
        else:
            strict, module.strict_loading = module.strict_loading, False  # the base keys are left out
            try:
                metadata = self._load(checkpoint_path, weights_only)
            finally:
                module.strict_loading = strict
        self._check_loaded(record, module, path, {**head, **metadata})
        metadata.pop(CHECKPOINT_KEY, None)
        return metadata

    def _check_loaded(self, record: dict[str, Any], module: torch.nn.Module, path: Path, checkpoint: dict[str, Any]) -> None:
        """The adapters loaded are those the record describes (a folder overwritten in part is not),
        where their dtype is the recorded one; a stale companion is worth a warning."""
        current = {name: layer.spec.adapter_dtype for name, layer in lora_modules(module).items()}
        if all(current.get(name) == spec["adapter_dtype"] for name, spec in record["modules"].items()):
            if tensors_digest(adapter_tensors(module)) != record["adapter_digest"]:  # every rank: a gather
                raise ValueError(
                    f"the adapters loaded from {path} are not those its LoRA record describes (a checkpoint "
                    f"folder overwritten in part?); resume from another checkpoint"
                )
        if self.strategy.is_global_zero:
            warn_if_stale_companion(checkpoint, str(path))

    def _load_sharded(self, path: Path, module: torch.nn.Module, base: set[str]) -> None:
        """Lightning's sharded load of the model and optimizer states, but the base keys are left out."""
        state = {key: value for key, value in get_model_state_dict(module).items() if key not in base}
        dcp.load({"state_dict": state}, checkpoint_id=path)
        module.load_state_dict(state, strict=False)
        for index, optimizer in enumerate(self.strategy.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(
                module, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
            )


def _sharded_keys(path: Path) -> set[str]:
    """The model state keys a sharded checkpoint folder holds (from its ``torch.distributed.checkpoint`` index)."""
    prefix = "state_dict."
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key[len(prefix):] for key in stored if key.startswith(prefix)}


"""Digests of checkpoint files: recorded in the companion adapter file, verified before a checkpoint is loaded.

When a checkpoint is written, its companion (``x.lora.safetensors`` beside ``x.ckpt``) records the
SHA-256 of every file the checkpoint consists of, under ``checkpoint_files``: one entry, named
:data:`SINGLE`, for a single ``.ckpt`` file (digested from the bytes in memory as they are written),
and one per file, by its path inside the folder, for a sharded checkpoint folder (each rank digests
the files it wrote). The companion itself is covered by its own SHA-256 (see
:mod:`~lightning_lora.formats.adapter_file`), so a flipped byte anywhere in the pair is found.

:func:`verify_checkpoint` checks a checkpoint against its companion before anything of it is
unpickled: a file that differs, is missing, or is not listed (a folder overwritten in part) is an
error that names the file and the newest checkpoint beside it that verifies. A checkpoint whose
companion records no digests (written by an older version) loads with one warning.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.utilities import rank_zero_warn

from lightning_lora.formats.adapter_file import read_adapter
from lightning_lora.formats.files import exists, gather_objects

#: The name under which a single-file checkpoint's digest is recorded.
SINGLE = "."
_CHUNK = 8 * 2**20


def digest_bytes(data: bytes | memoryview) -> str:
    """SHA-256 (hex) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest_file(path: str) -> str:
    """SHA-256 (hex) of the file at ``path`` (local or fsspec URL), read once in chunks."""
    fs, fs_path = url_to_fs(path)
    digest = hashlib.sha256()
    if isinstance(fs, LocalFileSystem):
        buffer = bytearray(_CHUNK)  # one buffer, read into again and again
        view = memoryview(buffer)
        with open(fs_path, "rb", buffering=0) as file:
            while n := file.readinto(buffer):
                digest.update(view[:n])
        return digest.hexdigest()
    with fs.open(fs_path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(path: str) -> list[str]:
    """The files a checkpoint consists of, by the names digests are recorded under: :data:`SINGLE` for a
    file, the sorted paths inside a folder (local folders)."""
    if not os.path.isdir(path):
        return [SINGLE]
    names = []
    for folder, _, files in os.walk(path):
        names += [os.path.relpath(os.path.join(folder, name), path) for name in files]
    return sorted(names)


def file_path(path: str, name: str) -> str:
    """The path of the checkpoint file recorded as ``name`` of the checkpoint at ``path``."""
    return path if name == SINGLE else os.path.join(path, name)


def digests_of(path: str, names: Iterable[str]) -> dict[str, str]:
    """The digests of the named files of the checkpoint at ``path``."""
    return {name: digest_file(file_path(path, name)) for name in names}


def mismatches(path: str, recorded: Mapping[str, str], names: Iterable[str]) -> list[str]:
    """Which of the named files of the checkpoint at ``path`` do not match the ``recorded`` digests, each
    with why: it differs, is missing, or is not listed."""
    found = []
    for name in names:
        where = file_path(path, name)
        if name not in recorded:
            found.append(f"{where} (not listed in its companion: a folder overwritten in part?)")
        elif not exists(where):
            found.append(f"{where} (missing)")
        elif digest_file(where) != recorded[name]:
            found.append(f"{where} (its bytes differ from the digest recorded when it was written)")
    return found


def expected_files(path: str, recorded: Mapping[str, str]) -> list[str]:
    """Every file that must be checked: those recorded and those present."""
    present = checkpoint_files(path) if os.path.isdir(path) else [SINGLE]
    return sorted(set(recorded) | set(present))


def recorded_digests(path: str, companion: str) -> dict[str, str] | None:
    """The digests the companion of the checkpoint at ``path`` records, or None (none recorded, with a
    warning: written by an older version).

    Raises:
        ValueError: if the companion is not a readable adapter file.
    """
    try:
        recorded = read_adapter(companion).checkpoint_files
    except ValueError as err:  # corrupted itself: it cannot vouch for the checkpoint
        raise ValueError(f"checkpoint {path}: its companion cannot be read: {err}") from err
    if recorded is None:
        rank_zero_warn(
            f"LoRA: {companion} records no digests of {path} (written by an older lightning_lora): "
            f"the checkpoint is loaded without verifying its bytes"
        )
    return recorded


def verify_checkpoint(path: str, companion_of: Callable[[str], str], share: tuple[int, int] = (0, 1)) -> bool:
    """Check the checkpoint at ``path`` against the digests its companion records, before it is read.

    Args:
        path: the checkpoint (a file or a folder).
        companion_of: the path of a checkpoint's companion.
        share: ``(rank, world size)`` where every rank of the process group calls this: each checks
            its share of the files, and all raise the same error.

    Returns:
        Whether it was verified (False: it has no companion, or one without digests, with a warning
        for the latter).

    Raises:
        ValueError: naming each file that differs, is missing or is not listed, and the newest
            checkpoint beside it that verifies.
    """
    companion = companion_of(path)
    if not exists(companion):
        return False
    try:
        recorded = recorded_digests(path, companion)
    except ValueError as err:
        raise ValueError(f"{err}. Resume from another checkpoint: {_newest_verified(path, companion_of)}") from err
    if recorded is None:
        return False
    rank, world = share
    bad = mismatches(path, recorded, expected_files(path, recorded)[rank::world])
    if world > 1:
        bad = sorted(item for part in gather_objects(bad) for item in part)
    refuse(path, companion_of, bad)
    return True


def warn_unverified(path: str) -> None:
    """The warning for a slim checkpoint that has no companion, so no digests to verify."""
    rank_zero_warn(f"LoRA: {path} has no companion adapter file: its bytes cannot be verified before loading")


def refuse(path: str, companion_of: Callable[[str], str], bad: list[str]) -> None:
    """Raise the error of :func:`verify_checkpoint` if ``bad`` names any file."""
    if bad:
        raise ValueError(
            f"checkpoint {path} does not match the digests its companion {companion_of(path)} records: "
            f"{'; '.join(bad[:5])}. A file is corrupted or was overwritten, or the companion belongs to another "
            f"checkpoint (regenerate it with lightning_lora.write_companion only if you know the checkpoint is "
            f"intact). Resume from another checkpoint: {_newest_verified(path, companion_of)}"
        )


def _newest_verified(path: str, companion_of: Callable[[str], str]) -> str:
    last = last_verified(path, companion_of)
    return f"the newest checkpoint beside it that verifies is {last}" if last else "no checkpoint beside it verifies"


def last_verified(path: str, companion_of: Callable[[str], str]) -> str | None:
    """The newest other checkpoint in ``path``'s folder whose files match their companion's digests."""
    folder = os.path.dirname(os.path.abspath(path))
    if "://" in path or not os.path.isdir(folder):
        return None
    own = os.path.realpath(path)
    candidates = [
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.endswith(".ckpt") and os.path.realpath(os.path.join(folder, name)) != own
    ]
    for candidate in sorted(candidates, key=os.path.getmtime, reverse=True):
        companion = companion_of(candidate)
        try:
            recorded = read_adapter(companion).checkpoint_files if os.path.exists(companion) else None
        except ValueError:
            continue
        if recorded is not None and not mismatches(candidate, recorded, expected_files(candidate, recorded)):
            return candidate
    return None

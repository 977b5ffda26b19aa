"""Files: atomic writes on global rank 0, reads and removals, for local paths and fsspec URLs.

Every file the package writes (adapter files, companion files of checkpoints) goes through
:func:`write_on_rank_zero` or :func:`write_atomic`, and every folder (PEFT exports, sharded
checkpoints) through :func:`publish_folder`, :func:`staged_folder` or :func:`publish_staged`, so a
crash never leaves a partial file or a mix of old and new files under the final name and, in a
distributed run, one process writes (:func:`gather_objects` collects a value of every rank).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.rank_zero import rank_zero_only


def global_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else Lightning's (0 alone)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(getattr(rank_zero_only, "rank", 0))


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (this one's alone outside a process group); every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def write_on_rank_zero(path: str, data: bytes) -> None:
    """:func:`write_atomic` on global rank 0; other ranks write nothing."""
    if global_rank() == 0:
        write_atomic(path, data)


def write_atomic(path: str, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that ``path`` never holds a partial file.

    Local paths: a temporary file in the same folder, flushed to disk, given the permissions the
    umask allows (as ``open`` would), then renamed over ``path``. Remote fsspec paths: one ``put``
    of the whole object (object stores publish it atomically).
    """
    fs, fs_path = url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(fs_path, bytes(data))
        return
    folder = os.path.dirname(os.path.abspath(fs_path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            _write_synced(file, data)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, fs_path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def publish_folder(folder: str, files: Mapping[str, bytes], check_existing: Callable[[list[str]], None]) -> None:
    """Write ``files`` (name -> bytes) as the folder ``folder``, so that it never holds a mix of old and new.

    Local folders: the files are written into a new hidden folder beside ``folder`` and flushed, then
    that folder is renamed into place (an existing ``folder`` is first renamed aside, and removed
    after). A kill or a full disk leaves the old folder (or, between the two renames, none, with the
    old one beside it under a hidden name), never some of the new files with some of the old. Remote
    fsspec folders: each file is one ``put``, in the order given.

    Args:
        folder: the folder to write.
        files: its files; nothing else will be in it.
        check_existing: called with the names an existing local ``folder`` holds, before anything is
            written; it raises to refuse replacing it.

    Raises:
        ValueError: if ``folder`` is an existing file; what ``check_existing`` raises.
    """
    fs, fs_path = url_to_fs(folder)
    if not isinstance(fs, LocalFileSystem):
        for name, data in files.items():
            fs.pipe_file(f"{fs_path.rstrip('/')}/{name}", data)
        return
    target = os.path.abspath(fs_path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{folder!r} is a file, not a folder")
    if os.path.isdir(target):
        check_existing(sorted(os.listdir(target)))
    with staged_folder(target) as staging:
        for file_name, data in files.items():
            with open(os.path.join(staging, file_name), "wb") as handle:
                _write_synced(handle, data)


@contextmanager
def staged_folder(target: str) -> Iterator[str]:
    """A new hidden folder beside the local folder ``target`` to write into; renamed into place when the
    ``with`` block ends without error (see :func:`publish_staged`), and removed if it raises. ``target``
    never holds a mix of old and new files."""
    target = os.path.abspath(target)
    staging = staging_folder(target)
    try:
        yield staging
        publish_staged(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staging_folder(target: str) -> str:
    """A new, empty hidden folder beside the local folder ``target`` (``.<name>.<random>.tmp``), to be
    published as ``target`` by :func:`publish_staged`."""
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")


def remove_leftovers(target: str) -> list[str]:
    """Remove the hidden folders of earlier, interrupted writes of the local folder ``target`` (see
    :func:`staging_folder` and :func:`publish_staged`); only for a ``target`` that one writer writes.

    Returns:
        The paths removed.
    """
    parent, name = os.path.split(os.path.abspath(target))
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]+\.(tmp|old)")
    removed = [os.path.join(parent, entry) for entry in os.listdir(parent) if pattern.fullmatch(entry)]
    for path in removed:
        _remove_entry(path)
    return removed


def publish_staged(staging: str, target: str) -> None:
    """Rename the finished folder ``staging`` to ``target``. An existing ``target`` (a folder, a file or a
    link) is renamed aside first and removed after, so a kill leaves the old one (or, between the two
    renames, none, with the old one beside it under a hidden name), never a mix of old and new files."""
    os.chmod(staging, 0o777 & ~_umask())
    parent, name = os.path.split(os.path.abspath(target))
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".old")
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        _remove_entry(old)


def _remove_entry(path: str) -> None:
    """Remove a folder with its contents, or a file or link (never what a link points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def _write_synced(file: BinaryIO, data: bytes | memoryview) -> None:
    """``data`` written to the open ``file`` and flushed to disk."""
    file.write(data)
    file.flush()
    os.fsync(file.fileno())


def overlaps(a: str, b: str) -> bool:
    """Whether the local paths ``a`` and ``b`` are the same, or one lies inside the other (links resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([a, b]) in (a, b)


def read_bytes(path: str) -> bytes:
    """The whole content of ``path`` (local or fsspec URL).

    Raises:
        FileNotFoundError: if there is no such file.
    """
    fs, fs_path = url_to_fs(path)
    with fs.open(fs_path, "rb") as handle:
        return handle.read()


def exists(path: str) -> bool:
    """Whether ``path`` (local or fsspec URL) exists."""
    fs, fs_path = url_to_fs(path)
    return bool(fs.exists(fs_path))


def remove_if_exists(path: str) -> None:
    """Remove ``path`` (local or fsspec URL) if it exists."""
    fs, fs_path = url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

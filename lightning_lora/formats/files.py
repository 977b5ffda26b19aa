"""Files: atomic writes on global rank 0, reads and removals, for local paths and fsspec URLs.

Every file the package writes (adapter files, companion files of checkpoints) goes through
:func:`write_on_rank_zero` or :func:`write_atomic`, so a crash never leaves a partial file under
its final name and, in a distributed run, one process writes.
"""

from __future__ import annotations

import os
import tempfile

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.rank_zero import rank_zero_only


def global_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else Lightning's (0 alone)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(getattr(rank_zero_only, "rank", 0))


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
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, fs_path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


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

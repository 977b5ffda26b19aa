"""Adapter files: one ``.safetensors`` file with the adapter tensors and what is needed to reload them.

Layout: the tensors of :func:`~lightning_lora.lora_state_dict` (adapters and ``trainable`` modules)
under clean module names, and string metadata:

==================== ==========================================================================
``format``           ``lightning_lora.adapter``
``format_version``   ``1``
``library_version``  the ``lightning_lora`` version that wrote it
``config``           the ``LoRAConfig`` (JSON)
``modules``          adapted module -> kind, r, alpha, bias, dropout, use_rslora, dtype, shapes (JSON)
``trainable``        the fully trainable modules (JSON list)
``base_fingerprint`` :func:`~lightning_lora.base_fingerprint` of the base weights trained on
``tensors_sha256``   SHA-256 of the tensor data, so corruption is detected on load
==================== ==========================================================================

Files are written atomically (temporary file, then rename) on global rank 0 only, and read with
safetensors, which never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from lightning_lora import __version__
from lightning_lora.config import LoRAConfig
from lightning_lora.fingerprint import base_fingerprint
from lightning_lora.layers import LoRALayer
from lightning_lora.surgery import (
    _apply_specs,
    _install,
    _sites,
    _trainable_modules,
    lora_config,
    lora_modules,
    lora_state_dict,
)

FORMAT = "lightning_lora.adapter"
FORMAT_VERSION = 1
#: The suffix of adapter files.
SUFFIX = ".lora.safetensors"


@dataclass
class AdapterFile:
    """The parsed contents of an adapter file."""

    tensors: dict[str, torch.Tensor]
    config: LoRAConfig
    modules: dict[str, dict[str, Any]]
    trainable: list[str]
    base_fingerprint: str
    library_version: str


def adapter_metadata(model: nn.Module) -> dict[str, str]:
    """The metadata of :func:`save_adapter` for ``model``, without the tensor checksum."""
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("model has no LoRA adapters to save; call apply_lora(model, config) first")
    modules = {}
    for name, adapter in adapters.items():
        shapes = {
            f"{part}.{key}": list(tensor.shape)
            for part in ("matrix_A", "matrix_B")
            for key, tensor in getattr(adapter, part).state_dict().items()
        }
        modules[name] = {**adapter.lora_spec(), "shapes": shapes}
    config = lora_config(model) or LoRAConfig()
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "library_version": __version__,
        "config": json.dumps(config.to_dict()),
        "modules": json.dumps(modules),
        "trainable": json.dumps(list(_trainable_modules(model))),
        "base_fingerprint": base_fingerprint(model),
    }


def adapter_bytes(model: nn.Module) -> bytes:
    """The bytes of an adapter file for ``model``, as :func:`save_adapter` writes them."""
    metadata = adapter_metadata(model)
    tensors = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in lora_state_dict(model).items()}
    draft = save_tensors(tensors, metadata={**metadata, "tensors_sha256": "0" * 64})
    metadata["tensors_sha256"] = hashlib.sha256(_tensor_region(draft)).hexdigest()
    return save_tensors(tensors, metadata=metadata)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> str:
    """Write the adapters of ``model`` (and its ``trainable`` modules) to one ``.safetensors`` file.

    The file is written atomically: a crash never leaves a partial file under ``path``. In a
    distributed run only global rank 0 writes. ``path`` may be any fsspec URL.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: if the model has no adapters. RuntimeError: if an adapter is merged.
    """
    data = adapter_bytes(model)
    if _global_rank() == 0:
        atomic_write(str(path), data)
    return str(path)


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file without unpickling anything.

    Raises:
        ValueError: if the file is truncated, corrupted, not an adapter file or of a newer format.
        FileNotFoundError: if there is no such file.
    """
    path = str(path)
    fs, local_path = url_to_fs(path)
    with fs.open(local_path, "rb") as handle:
        data = handle.read()
    header = _header(path, data)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning_lora adapter file (its metadata has no format {FORMAT!r})")
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path} has no valid format_version in its metadata") from err
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has adapter format version {version}, newer than this lightning_lora supports "
            f"({FORMAT_VERSION}); upgrade lightning_lora"
        )
    try:
        tensors = load_tensors(data)
    except SafetensorError as err:
        raise ValueError(f"{path} is truncated or corrupted: {err}") from err
    if hashlib.sha256(_tensor_region(data)).hexdigest() != meta.get("tensors_sha256"):
        raise ValueError(f"{path} is corrupted: its tensor data does not match the checksum in its metadata")
    try:
        return AdapterFile(
            tensors=tensors,
            config=LoRAConfig(**json.loads(meta["config"])),
            modules=json.loads(meta["modules"]),
            trainable=json.loads(meta["trainable"]),
            base_fingerprint=meta["base_fingerprint"],
            library_version=meta.get("library_version", "unknown"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} has invalid adapter metadata: {err!r}") from err


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> list[str]:
    """Load an adapter file into ``model``, in place.

    If the model has no adapters yet, the file's modules are adapted first with the stored
    settings. Everything is checked before the model is touched: on any error it is unchanged.

    Args:
        model: the base model (plain or already adapted with the same modules and ranks).
        path: the adapter file (any fsspec URL).
        check_base: compare the model's base weights with the fingerprint stored in the file.

    Returns:
        The adapted module names.

    Raises:
        ValueError: on missing or unexpected tensors or modules, a shape or rank mismatch, a different
            base model, or a truncated, corrupted or foreign file.
    """
    adapter = read_adapter(path)
    current = lora_modules(model)
    if any(layer.merged for layer in current.values()):
        raise ValueError(f"cannot load {path} into a model with merged adapters; call unmerge_lora() first")
    if current:
        _check_same_modules(path, current, adapter.modules)
        targets, new = current, {}
        trainable_names = list(_trainable_modules(model))
    else:
        try:
            new = _apply_specs(model, adapter.modules)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot apply the adapters of {path} to this model: {err}") from err
        targets, trainable_names = new, adapter.trainable
    sites = _sites(model)
    missing_trainable = [name for name in trainable_names if name not in sites]
    if missing_trainable:
        raise ValueError(f"{path} has trainable modules {missing_trainable!r} that this model does not have")
    expected = _expected_tensors(targets, {name: sites[name].module for name in trainable_names})
    _check_tensors(path, expected, adapter.tensors)
    if check_base:
        found = base_fingerprint(model, trainable_names)
        if found != adapter.base_fingerprint:
            raise ValueError(
                f"{path} was trained on different base weights: base fingerprint {adapter.base_fingerprint[:12]} "
                f"in the file, {found[:12]} in this model. Load the base checkpoint it was trained on, "
                f"or pass check_base=False to load anyway"
            )
    if new:
        _install(model, new, adapter.config, trainable_names)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(adapter.tensors[key])
    return list(targets)


def _check_same_modules(path: str, current: dict[str, LoRALayer], stored: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in stored if name not in current]
    unexpected = [name for name in current if name not in stored]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model's adapters: adapted in the file but not in the model: "
            f"{missing[:5]!r}; adapted in the model but not in the file: {unexpected[:5]!r}"
        )
    for name, layer in current.items():
        spec = layer.lora_spec()
        for key in ("kind", "r", "bias"):
            if spec[key] != stored[name][key]:
                raise ValueError(
                    f"{path} does not fit module '{name}': {key}={stored[name][key]!r} in the file, "
                    f"{spec[key]!r} in the model"
                )


def _expected_tensors(adapters: dict[str, LoRALayer], trainable: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Key -> the parameter or buffer that the file's tensor of that key is loaded into."""
    expected: dict[str, torch.Tensor] = {}
    for name, adapter in adapters.items():
        for part in ("matrix_A", "matrix_B"):
            for key, tensor in _tensors(getattr(adapter, part)).items():
                expected[f"{name}.{part}.{key}"] = tensor
    for name, module in trainable.items():
        for key, tensor in _tensors(module).items():
            expected[f"{name}.{key}"] = tensor
    return expected


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    keys = module.state_dict().keys()
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    return {key: named[key] for key in keys}


def _check_tensors(path: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model: missing tensors {missing[:5]!r}, unexpected tensors {unexpected[:5]!r}"
        )
    for key, target in expected.items():
        if tuple(found[key].shape) != tuple(target.shape):
            raise ValueError(
                f"{path} does not fit the model: tensor '{key}' has shape {tuple(found[key].shape)} in the "
                f"file and {tuple(target.shape)} in the model (a different rank or layer size)"
            )


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` never holds a partial file.

    Local paths: a temporary file in the same folder, flushed to disk, then renamed over ``path``.
    Remote fsspec paths: one ``put`` of the whole object (object stores publish it atomically).
    """
    fs, fs_path = url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(fs_path, data)
        return
    folder = os.path.dirname(os.path.abspath(fs_path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, fs_path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _header(path: str, data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError(f"{path} is truncated or not a safetensors file ({len(data)} bytes)")
    length = int.from_bytes(data[:8], "little")
    if 8 + length > len(data):
        raise ValueError(f"{path} is truncated or not a safetensors file (header of {length} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is corrupted or not a safetensors file: its header is not JSON") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupted or not a safetensors file: its header is not a JSON object")
    return header


def _tensor_region(data: bytes) -> bytes:
    return data[8 + int.from_bytes(data[:8], "little") :]


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))

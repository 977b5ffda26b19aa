"""Adapter files: the format of one ``.safetensors`` file holding a model's adapters.

Layout: the tensors of :func:`~lightning_lora.lora_state_dict` (adapters and ``trainable`` modules)
under clean module names, and string metadata:

==================== ==========================================================================
``format``           ``lightning_lora.adapter``
``format_version``   ``2``
``library_version``  the ``lightning_lora`` version that wrote it
``config``           the ``LoRAConfig`` (JSON)
``modules``          adapted module -> its ``AdapterSpec`` and tensor shapes (JSON)
``trainable``        the fully trainable modules (JSON list)
``base_fingerprint`` :func:`~lightning_lora.base_fingerprint` of the base weights trained on
``base_dtypes``      the dtypes those weights had (the fingerprint is checked in them)
``task_type``        PEFT's task type of the transformers model saved from (optional)
``base_model_name_or_path`` the name or folder that model was loaded from (optional)
``checkpoint``       for the companion file of a Lightning checkpoint: that checkpoint's epoch and
                     global step (JSON); the checkpoint records :func:`tensors_digest` of this file
``checkpoint_files`` for a companion file: the SHA-256 of each file of its checkpoint, by name (JSON;
                     see :mod:`lightning_lora.lightning.digests`)
``sha256``           SHA-256 of the header (every tensor's name, dtype, shape and offsets, and all
                     other metadata) and of the tensor data, so any change is detected on load
==================== ==========================================================================

This module owns the format: :func:`adapter_contents` (model -> tensors and metadata, read once),
:func:`serialize` (-> bytes, written once: the digest goes into a placeholder of the same length),
:func:`parse_adapter` (bytes -> :class:`AdapterFile`) and :func:`check_fits` (does a file fit a
model). Reading and writing go through :mod:`lightning_lora.formats.files`; loading installs the
stored specs with :func:`lightning_lora.surgery.install`. Nothing is ever unpickled. Tensor names
inside an adapted module belong to its kind (:mod:`lightning_lora.adapters`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from lightning_lora.adapters.registry import kind_named
from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.config import LoRAConfig, config_of_specs
from lightning_lora.formats.files import read_bytes, write_on_rank_zero
from lightning_lora.formats.fingerprint import Samples, dtype_note, dtypes_of, fingerprint_matches, fingerprint_tensors
from lightning_lora.naming import absolute, relative, resolve_root, walk
from lightning_lora.sharding import copy_into, full_tensor
from lightning_lora.surgery.apply import Installation, install
from lightning_lora.surgery.plan import AdapterPlan
from lightning_lora.surgery.plan import check_fits as check_specs_fit
from lightning_lora.surgery.plan import survey, target_base
from lightning_lora.surgery.state import (
    adapted,
    base_named_parameters,
    lora_config,
    lora_modules,
    merged_modules,
    tensors_of,
    trainable_modules,
    trained_with,
)
from lightning_lora.tasks import is_transformers_model, name_or_path, task_type

_V = TypeVar("_V")

FORMAT = "lightning_lora.adapter"
FORMAT_VERSION = 2
#: The suffix of adapter files.
SUFFIX = ".lora.safetensors"
_DIGEST_KEY = "sha256"
_OLD_DIGEST_KEY = "tensors_sha256"  # format version 1: a digest of the tensor data only


@dataclass
class AdapterFile:
    """The parsed contents of an adapter file.

    Attributes:
        tensors: clean key -> tensor.
        config: the ``LoRAConfig`` the adapters were made with.
        modules: adapted module name -> its adapter settings.
        trainable: names of the fully trainable modules whose tensors the file holds.
        base_fingerprint: fingerprint of the base weights trained on.
        library_version: the ``lightning_lora`` version that wrote the file.
        base_dtypes: the dtypes of those weights (None in files of format version 1).
        checkpoint: for a checkpoint's companion file, that checkpoint's ``epoch`` and ``global_step``.
        checkpoint_files: for a checkpoint's companion file, the SHA-256 of each of that checkpoint's
            files (None in companions written before they were recorded).
        root: the submodule of the saved model the names are relative to (``""``: the model itself).
        task_type: PEFT's task type of the transformers model at ``root`` (None: not one, or none fits).
        base_model_name_or_path: the name or folder that model was loaded from (None: built from a config).
    """

    tensors: dict[str, torch.Tensor]
    config: LoRAConfig
    modules: dict[str, AdapterSpec]
    trainable: list[str]
    base_fingerprint: str
    library_version: str
    base_dtypes: dict[str, str] | None = None
    checkpoint: dict[str, int] | None = None
    checkpoint_files: dict[str, str] | None = None
    root: str = ""
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def under(self, prefix: str) -> AdapterFile:
        """The same file with every module and tensor name placed under module ``prefix``."""
        return dataclasses.replace(
            self,
            tensors={absolute(key, prefix): tensor for key, tensor in self.tensors.items()},
            modules={absolute(name, prefix): spec for name, spec in self.modules.items()},
            trainable=[absolute(name, prefix) for name in self.trainable],
        )


def library_version() -> str:
    """The installed ``lightning-lora`` version, from the package metadata."""
    try:
        return version("lightning-lora")
    except PackageNotFoundError:
        return "unknown"


def default_root(model: nn.Module, held: Iterable[str] | None = None) -> str:
    """The submodule whose names an adapter file uses by default: the base model inside a wrapper.

    A direct child that is a transformers model (it has ``get_output_embeddings`` and ``config``) and
    holds every adapter and trainable module (``held``: their names, if known), as in a
    LightningModule with ``self.model = AutoModelForCausalLM...``; else ``model`` itself (``""``).
    Names relative to it load into the bare transformers model as well as into the wrapper.
    """
    if is_transformers_model(model):
        return ""
    children = [name for name, child in model.named_children() if is_transformers_model(child)]
    if not children:
        return ""
    names = [*lora_modules(model), *trainable_modules(model)] if held is None else list(held)
    return next((name for name in children if names and all(relative(item, name) for item in names)), "")


def adapter_bytes(
    model: nn.Module, checkpoint: Mapping[str, int] | None = None, root: str | nn.Module | None = None
) -> bytes:
    """The bytes of an adapter file for ``model``, as :func:`save_adapter` writes them.

    Args:
        model: the adapted model.
        checkpoint: for the companion file of a checkpoint, its ``epoch`` and ``global_step``.
        root: the submodule that is the base model (a name or the module); module names in the file
            are relative to it (default: :func:`default_root`), and it is recorded in the file.

    Raises:
        ValueError: if the model has no adapters, or some lie outside ``root``. RuntimeError: if an
            adapter is merged.
    """
    return serialize(*adapter_contents(model, checkpoint, root))


def adapter_contents(
    model: nn.Module,
    checkpoint: Mapping[str, int] | None = None,
    root: str | nn.Module | None = None,
    samples: Samples | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (CPU copies, gathered whole) and the metadata of an adapter file for ``model``.

    Arguments as for :func:`adapter_bytes`; ``samples``: base-weight values read before (see
    :func:`~lightning_lora.formats.fingerprint.fingerprint_tensors`), reused and filled.

    Raises:
        ValueError: if the model has no adapters, or some lie outside ``root``. RuntimeError: if an
            adapter is merged.
    """
    adapters, trainable = adapted(model)
    merged = [name for name, adapter in adapters.items() if adapter.merged]
    if merged:  # the weights hold the update too: neither they nor the fingerprint are the base's
        raise RuntimeError(f"cannot fingerprint base weights while modules {merged[:5]!r} are merged; unmerge first")
    _check_trained_with(adapters, trainable)
    prefix = resolve_root(model, root) if root is not None else default_root(model, [*adapters, *trainable])
    inner = _inside(adapters, prefix, "adapted module")
    if not inner:
        raise ValueError("model has no LoRA adapters to save; call apply_lora(model, config) first")
    modules = {
        name: {**adapter.spec.to_dict(), "shapes": {k: list(p.shape) for k, p in adapter.adapter_params().items()}}
        for name, adapter in inner.items()
    }
    base = _base_inside(model, prefix, trainable)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "library_version": library_version(),
        "config": json.dumps(_stored_config(model, inner, trainable, prefix).to_dict()),
        "modules": json.dumps(modules),
        "trainable": json.dumps(list(_inside(trainable, prefix, "trainable module"))),
        "base_fingerprint": fingerprint_tensors(base, samples=samples),
        "base_dtypes": json.dumps(dtypes_of(base)),
        "root": prefix,
    }
    if checkpoint is not None:
        metadata["checkpoint"] = json.dumps(dict(checkpoint))
    base_model = model.get_submodule(prefix)
    for key, value in (("task_type", task_type(base_model)), ("base_model_name_or_path", name_or_path(base_model))):
        if value:
            metadata[key] = value
    return _copies(_inside(tensors_of(adapters, trainable), prefix, "adapter tensor")), metadata


def _check_trained_with(adapters: Mapping[str, Any], trainable: Mapping[str, nn.Module]) -> None:
    """Every module trained fully with these adapters must be saved with them: refuse a submodule that lacks one."""
    held = {id(module) for module in trainable.values()}
    outside = sorted({name for adapter in adapters.values() for name, module in trained_with(adapter).items() if id(module) not in held})
    if outside:
        raise ValueError(
            f"modules {outside[:5]!r} were trained fully with these adapters but lie outside the module being saved, "
            f"so the file would lack them; save from the model that holds them (e.g. the LightningModule, which "
            f"names the adapters relative to the transformers model inside it), or adapt with trainable=[]"
        )


def _stored_config(model: nn.Module, adapters: Mapping[str, Any], trainable: Mapping[str, nn.Module], prefix: str) -> LoRAConfig:
    """The config an adapter file records: the model's, or for a submodule of an adapted model (which does
    not hold the config) the settings its adapters have (:func:`~lightning_lora.config.config_of_specs`)."""
    config = lora_config(model)
    if config is not None:
        return config
    return config_of_specs({name: adapter.spec for name, adapter in adapters.items()}, _inside(trainable, prefix, "trainable module"))


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The adapter file of ``tensors`` and ``metadata``, with the SHA-256 of both in its metadata.

    The tensors are serialised once: with a placeholder digest of the same length, which the digest
    (computed without the digest itself) then replaces in the header.
    """
    placeholder = "0" * 64
    data = save_tensors(dict(tensors), metadata={**metadata, _DIGEST_KEY: placeholder})
    field = f'"{_DIGEST_KEY}":"{placeholder}"'.encode()
    length = int.from_bytes(data[:8], "little")
    start = data.index(field, 8, 8 + length)  # quotes inside other metadata values are escaped: this is the key
    digest = _digest(_header(data, "the new adapter file"), data)
    return data[:start] + f'"{_DIGEST_KEY}":"{digest}"'.encode() + data[start + len(field):]


def adapter_tensors(model: nn.Module, root: str | nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The tensors an adapter file of ``model`` holds: CPU copies, named relative to ``root``
    (default: :func:`default_root`), as :func:`tensors_digest` of a companion file sees them. Sharded
    tensors are gathered whole (every rank must call this then)."""
    adapters, trainable = adapted(model)
    prefix = resolve_root(model, root) if root is not None else default_root(model, [*adapters, *trainable])
    return _copies(_inside(tensors_of(adapters, trainable), prefix, "adapter tensor"))


def _copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole (gathered), contiguous CPU copies of ``tensors``."""
    return {key: full_tensor(tensor.detach()).to("cpu", copy=True).contiguous() for key, tensor in tensors.items()}


def parse_adapter(data: bytes, source: str) -> AdapterFile:
    """Parse and verify the bytes of an adapter file (``source`` names it in errors).

    Raises:
        ValueError: if the data is truncated, corrupted, not an adapter file or of a newer format.
    """
    header = _header(data, source)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{source} is not a lightning_lora adapter file (its metadata has no format {FORMAT!r})")
    raw_version = meta.get("format_version")
    if not isinstance(raw_version, str) or not raw_version.isdigit():
        raise ValueError(f"{source} has no valid format_version in its metadata (got {raw_version!r})")
    format_version = int(raw_version)
    if format_version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has adapter format version {format_version}, newer than this lightning_lora supports "
            f"({FORMAT_VERSION}); upgrade lightning_lora"
        )
    try:
        tensors = load_tensors(data)
    except (SafetensorError, TypeError, RuntimeError, OverflowError) as err:  # torch refuses some shapes itself
        raise ValueError(f"{source} is truncated or corrupted: {err}") from err
    if format_version >= 2:
        intact = meta.get(_DIGEST_KEY) == _digest(header, data)
    else:
        intact = meta.get(_OLD_DIGEST_KEY) == hashlib.sha256(_tensor_region(data)).hexdigest()
    if not intact:
        raise ValueError(f"{source} is corrupted: its header or tensor data does not match the checksum in its metadata")
    try:
        modules = json.loads(meta["modules"])
        trainable = json.loads(meta["trainable"])
        dtypes = json.loads(meta["base_dtypes"]) if format_version >= 2 else None
        checkpoint = json.loads(meta["checkpoint"]) if "checkpoint" in meta else None
        if checkpoint is not None and not (
            isinstance(checkpoint, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in checkpoint.values())
        ):
            raise ValueError("checkpoint must be a JSON object of integers")
        files = json.loads(meta["checkpoint_files"]) if "checkpoint_files" in meta else None
        if files is not None and not (
            isinstance(files, dict) and all(isinstance(v, str) and len(v) == 64 for v in files.values())
        ):
            raise ValueError("checkpoint_files must be a JSON object of SHA-256 digests")
        if not isinstance(modules, dict) or not isinstance(trainable, list):
            raise ValueError("modules must be a JSON object and trainable a JSON list")
        if dtypes is not None and not (isinstance(dtypes, dict) and all(isinstance(v, str) for v in dtypes.values())):
            raise ValueError("base_dtypes must be a JSON object of dtype names")
        return AdapterFile(
            tensors=tensors,
            config=LoRAConfig.from_dict(json.loads(meta["config"])),
            modules={str(name): AdapterSpec.from_dict(spec) for name, spec in modules.items()},
            trainable=[str(name) for name in trainable],
            base_fingerprint=str(meta["base_fingerprint"]),
            library_version=str(meta.get("library_version", "unknown")),
            base_dtypes=None if dtypes is None else {str(k): v for k, v in dtypes.items()},
            checkpoint=checkpoint,
            checkpoint_files=None if files is None else {str(k): v for k, v in files.items()},
            root=str(meta.get("root", "")),
            task_type=meta.get("task_type"),
            base_model_name_or_path=meta.get("base_model_name_or_path"),
        )
    except (KeyError, TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"{source} has invalid adapter metadata: {err!r}") from err


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and values): what a checkpoint records of its companion."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_fits(model: nn.Module, adapter: AdapterFile, source: str, check_base: bool = True, prefix: str = "") -> None:
    """Check, without changing ``model``, that ``adapter`` (with names placed under ``prefix``) can be loaded.

    The model must have the adapted and trainable modules the file names, adapters it already has
    must have exactly the stored settings, and (with ``check_base``) the base weights under ``prefix``
    must match the stored fingerprint.

    Raises:
        ValueError: saying what does not fit.
    """
    merged = merged_modules(model)
    if merged:
        raise ValueError(f"cannot load {source} into a model with merged adapters {merged[:5]!r}; call unmerge_lora() first")
    found = check_specs_fit(model, adapter.modules, source)
    for name, spec in adapter.modules.items():  # before anything is allocated for the claimed settings
        original = target_base(found[name])
        for key, shape in kind_named(spec.kind).shapes(original, spec).items():
            tensor = adapter.tensors.get(f"{name}.{key}")
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{source} does not fit the model: tensor '{name}.{key}' has shape {tuple(tensor.shape)} in "
                    f"the file and {shape} in the model (from the file's settings, r={spec.r}, on this layer)"
                )
    missing_trainable = [name for name in adapter.trainable if name not in found]
    if missing_trainable:
        raise ValueError(f"{source} has trainable modules {missing_trainable!r} that this model does not have")
    base = _base_inside(model, prefix, adapter.trainable) if check_base else []
    if check_base and not fingerprint_matches(base, adapter.base_fingerprint, adapter.base_dtypes):
        fingerprint = fingerprint_tensors(base)
        note = dtype_note(base, adapter.base_dtypes)
        raise ValueError(
            f"{source} was trained on different base weights: base fingerprint {adapter.base_fingerprint[:12]} "
            f"in the file, {fingerprint[:12]} in this model. Load the base checkpoint it was trained on, "
            f"or pass check_base=False to load anyway.{note}"
        )


def save_adapter(model: nn.Module, path: str | os.PathLike, root: str | nn.Module | None = None) -> str:
    """Write the adapters of ``model`` (and its ``trainable`` modules) to one ``.safetensors`` file.

    The file is written atomically: a crash never leaves a partial file under ``path``. In a
    distributed run only global rank 0 writes. For a sharded model (FSDP2) call it on every rank: the
    tensors are gathered whole, and the base fingerprint is read from each rank's shards. ``path``
    may be any fsspec URL.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: if the model has no adapters. RuntimeError: if an adapter is merged.
    """
    target = _path("path", path)
    write_on_rank_zero(target, adapter_bytes(model, root=root))
    return target


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file without unpickling anything.

    Raises:
        ValueError: if the file is truncated, corrupted, not an adapter file (a folder) or of a newer format.
        FileNotFoundError: if there is no such file.
    """
    source = _path("path", path)
    if os.path.isdir(source):
        raise ValueError(
            f"path must be an adapter file, got the folder {source!r}; a PEFT adapter folder loads with "
            f"import_peft(model, folder) (LoRAMixin.load_adapter and LoRACallback(adapter_path=...) take both)"
        )
    return parse_adapter(read_bytes(source), source)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, check_base: bool = True, root: str | nn.Module | None = None
) -> list[str]:
    """Load an adapter file into ``model``, in place.

    If the model has no adapters yet, the file's modules are adapted first with the stored
    settings; adapters the model already has must have exactly those settings. Everything is
    checked before the model is kept changed: on any error it is as it was.

    Args:
        model: the base model (plain or already adapted with the same modules and settings).
        path: the adapter file (any fsspec URL).
        check_base: compare the model's base weights with the fingerprint stored in the file.
        root: the submodule the file's names are relative to. By default the file's names are tried
            as they are and under the root recorded in the file (the base model inside the wrapper it
            was saved from), and the one that fits the model is used: an adapter saved from a
            LightningModule's ``self.model`` loads into the bare model and back.

    Returns:
        The adapted module names.

    Raises:
        ValueError: on missing or unexpected tensors or modules, other settings, a shape mismatch, a
            different base model, or a truncated, corrupted or foreign file.
    """
    return install_adapter(model, path, check_base, root).names


def install_adapter(
    model: nn.Module, path: str | os.PathLike, check_base: bool = True, root: str | nn.Module | None = None
) -> Installation:
    """:func:`load_adapter`, returning the :class:`~lightning_lora.surgery.Installation` (to undo it)."""
    source = _path("path", path)
    return install_file(model, read_adapter(source), source, check_base, root)


def install_file(
    model: nn.Module, adapter: AdapterFile, source: str, check_base: bool = True, root: str | nn.Module | None = None
) -> Installation:
    """:func:`install_adapter` of an adapter file already read (``source`` names it in errors)."""
    prefix = resolve_root(model, root) if root is not None else _locate(model, adapter, source)
    return install_parsed(model, adapter.under(prefix), source, check_base, prefix)


def install_parsed(model: nn.Module, adapter: AdapterFile, source: str, check_base: bool, prefix: str) -> Installation:
    """Check that ``adapter`` (names already under ``prefix``) fits ``model``, install it and load its tensors.

    On any error the model is left as it was.
    """
    check_fits(model, adapter, source, check_base, prefix)
    installed = install(model, AdapterPlan(adapter.modules, adapter.config, tuple(adapter.trainable)))
    try:
        expected = tensors_of(installed.adapters, installed.trainable)
        _check_tensors(source, expected, adapter.tensors, set(tensors_of(installed.adapters, {})))
    except ValueError:
        installed.undo()
        raise
    with torch.no_grad():
        for key, target in expected.items():
            copy_into(target, adapter.tensors[key])
    return installed


def _locate(model: nn.Module, adapter: AdapterFile, source: str) -> str:
    """Where in ``model`` the file's names fit (see :func:`locate_root`)."""
    names = set(survey(model).targets)  # modules, and the parameters a kind adapts
    return locate_root(model, list(adapter.modules), names, adapter.root, source)


def locate_root(model: nn.Module, wanted: list[str], names: set[str], recorded: str, source: str) -> str:
    """The submodule of ``model`` under which every name in ``wanted`` is one of ``names``.

    Tried: the model itself, the root the file records (the base model inside the wrapper it was saved
    from), every transformers model inside it and its direct children: an adapter saved from the bare
    model loads into a LightningModule that holds it under any attribute, and back. Where none fits,
    the one that fits most names is returned (loading it then says what is missing).

    Raises:
        ValueError: if the names fit under more than one of them, asking for ``root``.
    """
    candidates = dict.fromkeys(["", recorded])
    candidates.update(dict.fromkeys(site.name for site in walk(model, into_adapters=False) if is_transformers_model(site.module)))
    candidates.update(dict.fromkeys(name for name, _ in model.named_children()))
    counts = {prefix: sum(absolute(name, prefix) in names for name in wanted) for prefix in candidates}
    fits = [prefix for prefix, count in counts.items() if count == len(wanted)]
    if len(fits) > 1:
        raise ValueError(
            f"{source} fits this model under several submodules {fits!r}; pass root= (LoRACallback: adapter_root=) "
            f"to say which"
        )
    return fits[0] if fits else max(counts, key=lambda prefix: counts[prefix])


def _inside(items: Mapping[str, _V], prefix: str, what: str) -> dict[str, _V]:
    """``items`` with names relative to module ``prefix``; any outside it is an error."""
    outside = [name for name in items if relative(name, prefix) is None]
    if outside:
        raise ValueError(f"{what}s {outside[:5]!r} lie outside root {prefix!r}; save with a root that holds them")
    return {str(relative(name, prefix)): item for name, item in items.items()}


def _base_inside(model: nn.Module, prefix: str, trainable: Iterable[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The base weights under module ``prefix``, named relative to it."""
    named: list[tuple[str, torch.Tensor]] = []
    for name, param in base_named_parameters(model, trainable):
        inner = relative(name, prefix)
        if inner is not None:
            named.append((inner, param))
    return named


def _path(name: str, value: Any) -> str:
    """``value`` as a path string if it is a ``str`` or ``os.PathLike``, else a ``TypeError`` naming ``name``."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TypeError(f"{name} must be a file path or URL, got {value!r} ({type(value).__name__})")
    return str(value)


def _check_tensors(
    source: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], adapter_keys: set[str]
) -> None:
    """Names and shapes must match; adapter tensors (built in the stored dtype) must match in dtype too,
    while ``trainable`` modules' floating-point tensors are cast to the floating-point dtype the model
    holds them in (never integers to floats or back)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the model: missing tensors {missing[:5]!r}, unexpected tensors {unexpected[:5]!r}"
        )
    for key, target in expected.items():
        if tuple(found[key].shape) != tuple(target.shape):
            raise ValueError(
                f"{source} does not fit the model: tensor '{key}' has shape {tuple(found[key].shape)} in the "
                f"file and {tuple(target.shape)} in the model (a different rank or layer size)"
            )
        kinds_differ = found[key].dtype.is_floating_point != target.dtype.is_floating_point
        if (key in adapter_keys and found[key].dtype != target.dtype) or kinds_differ:
            raise ValueError(
                f"{source} is inconsistent: tensor '{key}' is {found[key].dtype} in the file but "
                f"{target.dtype} in the model"
            )


def _header(data: bytes, source: str) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError(f"{source} is truncated or not a safetensors file ({len(data)} bytes)")
    length = int.from_bytes(data[:8], "little")
    if 8 + length > len(data):
        raise ValueError(f"{source} is truncated or not a safetensors file (header of {length} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{source} is corrupted or not a safetensors file: its header is not JSON") from err
    if not isinstance(header, dict):
        raise ValueError(f"{source} is corrupted or not a safetensors file: its header is not a JSON object")
    return header


def _digest(header: dict[str, Any], data: bytes) -> str:
    """SHA-256 of the header (in a canonical JSON form, without the digest itself) and the tensor data."""
    meta = header.get("__metadata__")
    meta = {k: v for k, v in meta.items() if k != _DIGEST_KEY} if isinstance(meta, dict) else meta
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode())
    digest.update(_tensor_region(data))
    return digest.hexdigest()


def _tensor_region(data: bytes) -> bytes:
    return data[8 + int.from_bytes(data[:8], "little") :]

"""The Hugging Face PEFT LoRA format: export adapters to PEFT and vLLM, import PEFT adapters.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.<suffix>``, with the suffixes of the module's kind (``lora_A.weight``
and ``lora_B.weight`` for linear layers; each kind converts its own tensors, see
:mod:`lightning_lora.adapters`) and of its variant (DoRA's ``lora_magnitude_vector``, with
``use_dora: true``), and the modules to save under their own keys. Conversions are exact or refused:

- A's bias folds into PEFT's ``lora_B.bias``; adapters without a bias get a zero one when others have
  one (PEFT's ``lora_bias`` is global).
- Per-module ranks and alphas become ``rank_pattern``/``alpha_pattern`` keys anchored to the whole
  module name (``^`` and escaped dots).
- ``target="vllm"``: what vLLM serves (:mod:`lightning_lora.formats.vllm`): one global rank, each
  module's own scaling folded into its B, no biases, no DoRA, at most one classification head.
- ``task_type`` and ``base_model_name_or_path`` come from the model (its class and the name or folder
  it was loaded from), as an adapter file records them, so ``AutoPeftModelFor*`` loads the export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from lightning_lora.adapters.base import base_layer
from lightning_lora.adapters.registry import kind_named, kind_of, kinds, parameter_kinds, variant_named, variants
from lightning_lora.adapters.spec import AdapterSpec, dtype_name
from lightning_lora.adapters.variants import Variant
from lightning_lora.config import LoRAConfig, config_of_specs, most_common
from lightning_lora.formats.adapter_file import (
    AdapterFile,
    adapter_bytes,
    install_parsed,
    locate_root,
    parse_adapter,
    read_adapter,
)
from lightning_lora.formats.files import overlaps, publish_folder, read_bytes
from lightning_lora.formats.peft_config import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_agrees,
    check_values,
    flags,
    read_config,
    targeted,
    targeted_without_tensors,
    weights_path,
)
from lightning_lora.formats.vllm import for_vllm
from lightning_lora.naming import Site, absolute, relative, resolve_root, sites
from lightning_lora.patterns import ALL_LINEAR
from lightning_lora.surgery.apply import Installation
from lightning_lora.surgery.plan import survey, target_base

PREFIX = "base_model.model."
TARGETS = ("peft", "vllm")
#: PEFT's task types (``TaskType``): ``AutoPeftModelFor*`` loads the base model by the one recorded.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")


def export_peft(
    model_or_adapter_file: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    root: str | nn.Module | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    target: str = "peft",
    overwrite: bool = False,
) -> str:
    """Write an adapter as PEFT writes it: ``out_dir/adapter_config.json`` and ``adapter_model.safetensors``.

    Args:
        model_or_adapter_file: an adapted model, or the path of an adapter file.
        out_dir: the folder to write, local or an fsspec URL (a path, not empty). A local folder is
            written beside it and renamed into place, replacing a previous export as a whole: a kill
            or a full disk leaves the old folder or none, never a mix. On an object store each file is
            one put, the weights first.
        root: for a model, the submodule that is the transformers model (default: as
            :func:`~lightning_lora.save_adapter` chooses); names in the output are relative to it.
        base_model_name_or_path: recorded in the config, as PEFT does (default: the name or folder the
            transformers model was loaded from, as the model or the adapter file records it).
        task_type: PEFT's task type (one of :data:`TASK_TYPES`; default: from the transformers model's
            class, e.g. ``CAUSAL_LM`` for ``*ForCausalLM``), by which ``AutoPeftModelFor*`` loads the base.
        target: ``"peft"``, or ``"vllm"`` for what vLLM serves (see the module docstring).
        overwrite: replace an ``out_dir`` that holds other files than a PEFT export.

    Returns:
        ``out_dir`` as a string.

    Raises:
        TypeError: if ``out_dir`` is not a path. ValueError: for an empty ``out_dir``, one that holds
            other files (without ``overwrite``) or the adapter file exported from, a bad ``target``, or
            anything the format cannot hold exactly. Nothing is written then.
    """
    folder = _out_dir(out_dir, model_or_adapter_file, overwrite)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {list(TASK_TYPES)}, got {task_type!r}")
    if isinstance(model_or_adapter_file, nn.Module):
        adapter = parse_adapter(adapter_bytes(model_or_adapter_file, root=root), "the model")
        found = sites(model_or_adapter_file)
        bases = {
            name: base_layer(found[full].module)
            for name in adapter.modules
            if (full := absolute(name, adapter.root)) in found
        }
    else:
        adapter = read_adapter(model_or_adapter_file)
        bases = {}
    adapter = dataclasses.replace(
        adapter,
        task_type=task_type or adapter.task_type,
        base_model_name_or_path=base_model_name_or_path or adapter.base_model_name_or_path,
    )
    converted, config = _to_peft(adapter, bases)
    specs = dict(adapter.modules)
    if target == "vllm":
        trainable = {name: _keys_under(adapter.tensors, name) for name in adapter.trainable}
        converted, specs, config = for_vllm(specs, converted, trainable, config)
    paths = peft_paths(specs)
    tensors = {f"{PREFIX}{paths[name]}.{suffix}": t.contiguous() for name, own in converted.items() for suffix, t in own.items()}
    for name in adapter.trainable:  # modules to save, under their own keys
        tensors.update({PREFIX + key: t.contiguous() for key, t in adapter.tensors.items() if key.startswith(name + ".")})
    files = {
        WEIGHTS_FILE: save_tensors(tensors, metadata={"format": "pt"}),
        CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }

    def check_existing(names: list[str]) -> None:
        others = [name for name in names if name not in EXPORT_FILES]
        if others and not overwrite:
            raise ValueError(
                f"out_dir {folder!r} holds files that are not a PEFT export ({others[:5]!r}); choose another "
                f"folder, or pass overwrite=True to replace it with the export"
            )

    publish_folder(folder, files, check_existing)
    return folder


#: The files of a PEFT adapter folder (PEFT also writes a README.md): a folder holding no others is
#: a previous export, replaced without ``overwrite``.
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, "README.md")


def _out_dir(out_dir: Any, source: Any, overwrite: Any) -> str:
    """``out_dir`` as a string, checked: a path, not empty, not holding the adapter file exported from."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a folder path (str or os.PathLike), got {out_dir!r} ({type(out_dir).__name__})")
    folder = os.fspath(out_dir)
    if not isinstance(folder, str) or not folder.strip():
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if isinstance(source, (str, os.PathLike)) and "://" not in folder:
        if overlaps(os.fspath(source), folder):
            raise ValueError(
                f"out_dir {folder!r} holds the adapter file exported from ({os.fspath(source)!r}); "
                f"writing the export would replace it: choose another folder"
            )
    return folder


def import_peft(model: nn.Module, peft_dir: str | os.PathLike, *, root: str | nn.Module | None = None) -> list[str]:
    """Load a PEFT LoRA adapter into ``model`` (plain, or adapted with the same settings), in place.

    The adapters get exactly PEFT's outputs: same ranks, alphas, rsLoRA, dropout, ``lora_bias``, and
    ``modules_to_save`` loaded as fully trainable modules. PEFT adapters carry no fingerprint of their
    base model, so the base is not checked.

    Args:
        model: the transformers model (or a wrapper around it, with ``root`` naming it).
        peft_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        root: the submodule that is the model PEFT adapted (default: ``model`` itself, or else the
            transformers model or child inside it under which the adapter's modules are).

    Returns:
        The adapted module names (relative to ``model``).

    Raises:
        ValueError: for another PEFT method, a LoRA variant or setting this package lacks, or tensors
            that do not fit the model; the model is unchanged then.
    """
    return install_peft(model, read_peft(peft_dir), root).names


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter folder, read and checked.

    Attributes:
        folder: where it was read from (it names the adapter in errors).
        config: its ``adapter_config.json``.
        tensors: its ``adapter_model.safetensors``.
    """

    folder: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def settings(self) -> LoRAConfig:
        """Its settings as a :class:`~lightning_lora.LoRAConfig` (what a callback's arguments must not contradict).

        Raises:
            ValueError: naming the folder, for settings that are not LoRA settings.
        """
        try:
            return self._settings()
        except (TypeError, ValueError) as err:
            raise ValueError(f"{os.path.join(self.folder, CONFIG_FILE)} holds settings that are not valid LoRA settings: {err}") from err

    def _settings(self) -> LoRAConfig:
        targets = self.config.get("target_modules") or []
        trainable = self.config.get("modules_to_save") or []
        return LoRAConfig(
            r=int(self.config.get("r", 8)),
            alpha=float(self.config.get("lora_alpha", 8)),
            bias=bool(self.config.get("lora_bias", False)),
            targets=(["re:" + targets] if targets != ALL_LINEAR else [ALL_LINEAR]) if isinstance(targets, str) else list(targets),
            dropout=float(self.config.get("lora_dropout") or 0.0),
            use_rslora=bool(self.config.get("use_rslora", False)),
            use_dora=bool(self.config.get("use_dora", False)),
            trainable=[str(name) for name in trainable],
        )


def is_peft_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local folder holding a PEFT adapter (``adapter_config.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_peft(peft_dir: str | os.PathLike) -> PeftAdapter:
    """Read a PEFT LoRA adapter folder without unpickling anything.

    Raises:
        ValueError: for another PEFT method or a LoRA variant this package lacks.
        FileNotFoundError: if a file is missing.
    """
    folder = str(peft_dir)
    config = read_config(folder)
    path = weights_path(folder)
    try:
        tensors = load_tensors(read_bytes(path))
    except (SafetensorError, TypeError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    return PeftAdapter(folder, config, tensors)


def install_peft(model: nn.Module, peft: PeftAdapter, root: str | nn.Module | None = None) -> Installation:
    """:func:`import_peft` of a folder already read, returning the installation (to undo it).

    ``root`` None: the model itself, or else the submodule under which the adapter's modules are (see
    :func:`~lightning_lora.formats.adapter_file.locate_root`).
    """
    targets = survey(model).targets
    if root is None:
        wanted = sorted({_module_path(key[len(PREFIX):]) for key in peft.tensors if key.startswith(PREFIX)})
        names = {name for name, site in targets.items() if not site.parameter}
        prefix = locate_root(model, wanted, names, "", peft.folder)
    else:
        prefix = resolve_root(model, root)
    adapter = _from_peft(model, targets, prefix, peft.config, peft.tensors, peft.folder)
    return install_parsed(model, adapter.under(prefix), peft.folder, check_base=False, prefix=prefix)


def _module_path(key: str) -> str:
    """The module a PEFT tensor key belongs to (the wrapper nesting of expert weights taken out)."""
    path = key.rpartition(".")[0]
    for suffix in _peft_suffixes():
        if key.endswith("." + suffix):
            path = key[: -len(suffix) - 1]
            break
    return path.replace(".base_layer", "")


# --- export ---------------------------------------------------------------------------------------


def _to_peft(
    adapter: AdapterFile, bases: Mapping[str, nn.Module]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Each adapter's tensors by PEFT's key suffix, and PEFT's config."""
    specs = adapter.modules
    if not specs:
        raise ValueError("the adapter has no adapted modules to export")
    rslora = {spec.use_rslora for spec in specs.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT has one use_rslora for all modules, but the adapter mixes rsLoRA and plain scaling")
    used = {spec.variant for spec in specs.values()}
    if len(used) > 1:
        if used == {None, "dora"}:
            raise ValueError("PEFT has one use_dora for all modules, but the adapter mixes DoRA and plain LoRA modules")
        raise ValueError(f"PEFT has one LoRA variant for all modules, but the adapter mixes {sorted(map(str, used))}")
    variant = None if (name := next(iter(used))) is None else variant_named(name)
    if variant is not None and variant.peft_config is None:
        raise ValueError(f"PEFT has no LoRA variant {variant.name!r}; the adapter cannot be exported")
    dropouts = sorted({spec.dropout for spec in specs.values()})
    if len(dropouts) > 1:
        raise ValueError(f"PEFT has one lora_dropout for all modules, but the adapter's modules use {dropouts}")
    with_bias = any(spec.bias for spec in specs.values())
    no_bias = [name for name, spec in specs.items() if not kind_named(spec.kind).peft_bias]
    if with_bias and no_bias:
        kind = specs[no_bias[0]].kind
        raise ValueError(
            f"PEFT cannot combine adapter biases (lora_bias) with {kind} adapters {no_bias[:5]!r}; "
            f"adapt with bias=False, or leave those modules out"
        )
    converted: dict[str, dict[str, torch.Tensor]] = {}
    for name, spec in specs.items():
        own = {key[len(name) + 1 :]: tensor for key, tensor in adapter.tensors.items() if key.startswith(name + ".")}
        converted[name] = kind_named(spec.kind).to_peft(own, spec, bases.get(name), with_bias, name)
        if variant is not None:
            variant.check_export(own, name)
            converted[name].update({theirs: own[ours] for ours, theirs in variant.peft_tensors.items()})
    r = most_common(spec.r for spec in specs.values())
    alpha = most_common(spec.alpha for spec in specs.values())
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(name for name in specs if not kind_named(specs[name].kind).adapts_parameter),
        "target_parameters": sorted(name for name in specs if kind_named(specs[name].kind).adapts_parameter) or None,
        "rank_pattern": {_anchored(name): spec.r for name, spec in specs.items() if spec.r != r},
        "alpha_pattern": {_anchored(name): spec.alpha for name, spec in specs.items() if spec.alpha != alpha},
        "use_rslora": rslora.pop(),
        "lora_dropout": dropouts[0],
        "lora_bias": with_bias,
        "bias": "none",
        "fan_in_fan_out": any(spec.kind == "transformers_conv1d" for spec in specs.values()),
        "modules_to_save": list(adapter.trainable) or None,
        "use_dora": False,
        **(variant.peft_config if variant is not None and variant.peft_config else {}),
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    return converted, config


def peft_paths(specs: Mapping[str, AdapterSpec]) -> dict[str, str]:
    """Adapter name -> the module path PEFT gives it (for an expert weight, its nesting under its module)."""
    owners: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if kind_named(spec.kind).adapts_parameter:
            owners.setdefault(name.rpartition(".")[0], []).append(name)
    return {
        name: kind_named(spec.kind).peft_module(name, owners.get(name.rpartition(".")[0], [name]))
        for name, spec in specs.items()
    }


def _keys_under(tensors: Mapping[str, torch.Tensor], name: str) -> list[str]:
    """The keys of module ``name``'s tensors, relative to it."""
    return [key[len(name) + 1 :] for key in tensors if key.startswith(name + ".")]


def _anchored(name: str) -> str:
    return "^" + re.escape(name)


# --- import ---------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key with ``re.match(rf"(.*\\.)?({key})$", name)`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _from_peft(
    model: nn.Module, targets: Mapping[str, Site], prefix: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str
) -> AdapterFile:
    stray = [key for key in tensors if not key.startswith(PREFIX)]
    if stray:
        raise ValueError(f"{source} has tensors outside {PREFIX!r}: {stray[:5]!r}")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    others: list[str] = []
    suffixes = _peft_suffixes()
    for key in (key[len(PREFIX) :] for key in tensors):
        suffix = next((suffix for suffix in suffixes if key.endswith("." + suffix)), None)
        if suffix is None:
            others.append(key)
        else:
            by_module.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensors[PREFIX + key]
    variant = _peft_variant(config, source)
    found = {inner: site for name, site in targets.items() if (inner := relative(name, prefix))}
    parameters = _parameter_paths(found, config, source)
    ours: dict[str, torch.Tensor] = {}
    specs: dict[str, AdapterSpec] = {}
    for path in sorted(by_module):
        name = parameters.get(path, path)
        if name not in found:
            raise ValueError(f"{source} adapts module '{name}', which the model does not have")
        site = found[name]
        original = target_base(site)
        kind = parameter_kinds(site.module)[site.parameter] if site.parameter else kind_of(original, absolute(name, prefix))
        own = dict(by_module[path])
        check_values(own, name, source)
        check_agrees(config, own, name, kind, variant, source)
        bias = "lora_B.bias" in own
        try:
            converted = kind.from_peft(own, original, name, source)
            rank = kind.peft_rank(own, original)
        except KeyError as err:
            raise ValueError(f"{source}: module '{name}' has no PEFT tensor {err}") from err
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        if rank != r:
            raise ValueError(f"{source}: module '{name}' has rank {rank} in its tensors but r={r} in its config")
        spec = AdapterSpec(
            kind=kind.kind,
            r=int(r),
            alpha=float(alpha),
            bias=bias,
            dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora", False)),
            adapter_dtype=dtype_name(next(iter(converted.values())).dtype),
            variant=None if variant is None else variant.name,
        )
        if variant is not None:
            shapes = variant.param_shapes(kind, original, spec)
            for mine, theirs in variant.peft_tensors.items():
                if theirs not in own:
                    raise ValueError(f"{source} sets {flags(variant)} but has no {theirs} for module '{name}'")
                if own[theirs].numel() != math.prod(shapes[mine]):
                    raise ValueError(
                        f"{source}: module '{name}' has {theirs} of shape {tuple(own[theirs].shape)}, "
                        f"expected {shapes[mine]}"
                    )
                converted[mine] = own[theirs].reshape(shapes[mine])
        ours.update({f"{name}.{key}": tensor.contiguous() for key, tensor in converted.items()})
        specs[name] = spec
    rest = []
    for key in others:
        if ".base_layer." in key:  # PEFT saves targeted embeddings' own weights too ("save_embedding_layers")
            _check_base_layer_copy(model, absolute(key.replace(".base_layer.", "."), prefix), tensors[PREFIX + key], source)
            continue
        rest.append(key)
    saved = [str(name) for name in (config.get("modules_to_save") or [])]
    trainable: list[str] = []  # PEFT matches modules_to_save by name suffix
    for inner, site in found.items():
        if site.parameter:
            continue
        if any(inner == s or inner.endswith("." + s) for s in saved) and any(k.startswith(inner + ".") for k in rest):
            trainable.append(inner)
    for key in rest:
        if not any(key.startswith(name + ".") for name in trainable):
            raise ValueError(f"{source} has tensor '{key}' that belongs to no adapter and no module to save")
        ours[key] = tensors[PREFIX + key]
    if not specs:
        raise ValueError(f"{source} has no LoRA tensors")
    named = [name for name, site in found.items() if not site.parameter]  # PEFT skips names no module has
    unsaved = [
        s for s in saved
        if any(targeted(name, [s]) for name in named) and not any(targeted(name, [s]) for name in trainable)
    ]
    if unsaved:
        raise ValueError(f"{source} sets modules_to_save {unsaved!r} but holds no tensors of them")
    untrained = targeted_without_tensors(model, found, prefix, config, set(specs))
    if untrained:
        raise ValueError(
            f"{source}: its target_modules {config.get('target_modules')!r} name modules {untrained[:5]!r} it holds "
            f"no tensors of (PEFT would give them fresh adapters)"
        )
    specs = {name: specs[name] for name in found if name in specs}  # in model order
    return AdapterFile(
        tensors=ours,
        config=config_of_specs(specs, trainable),
        modules=specs,
        trainable=trainable,
        base_fingerprint="",
        library_version="peft",
        base_dtypes=None,
        root="",
    )


def _parameter_paths(found: Mapping[str, Site], config: Mapping[str, Any], source: str) -> dict[str, str]:
    """PEFT's module path of each parameter its ``target_parameters`` adapt in the model -> the parameter's name.

    PEFT matches a parameter when its qualified name is, or ends with ``.`` and, a target; the wrappers of
    one module's parameters are nested (see the kind's ``peft_module``).
    """
    wanted = config.get("target_parameters") or []
    if not isinstance(wanted, list) or not all(isinstance(item, str) and item for item in wanted):
        raise ValueError(f"{source}: target_parameters must be a list of parameter names, got {wanted!r}")
    chosen = {
        name: site
        for name, site in found.items()
        if site.parameter and any(name == target or name.endswith("." + target) for target in wanted)
    }
    kinds = {name: parameter_kinds(site.module)[site.parameter] for name, site in chosen.items()}
    owners: dict[str, list[str]] = {}
    for name in chosen:
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    return {kinds[name].peft_module(name, owners[name.rpartition(".")[0]]): name for name in chosen}


def _peft_suffixes() -> list[str]:
    """Every key suffix of PEFT's LoRA tensors that a kind or variant knows, longest first."""
    found = {"lora_B.bias"}
    for kind in kinds():
        found |= {kind.peft_a[0], kind.peft_b[0]}
    for variant in variants():
        found |= set(variant.peft_tensors.values())
    return sorted(found, key=len, reverse=True)


def _peft_variant(config: Mapping[str, Any], source: str) -> type[Variant] | None:
    """The variant whose PEFT fields the config sets (DoRA: ``use_dora: true``), or None."""
    matching = [
        variant
        for variant in variants()
        if variant.peft_config and all(config.get(key) == value for key, value in variant.peft_config.items())
    ]
    if len(matching) > 1:
        raise ValueError(f"{source} sets the fields of several LoRA variants: {[v.name for v in matching]}")
    return matching[0] if matching else None


def _check_base_layer_copy(model: nn.Module, key: str, tensor: torch.Tensor, source: str) -> None:
    """A base weight PEFT saved beside the adapter must be the model's own (else the vocabulary was resized)."""
    own = dict(model.named_parameters()).get(key)
    if own is None:  # the model is adapted already: its weight sits in original_module
        module_name, _, parameter = key.rpartition(".")
        own = dict(model.named_parameters()).get(f"{module_name}.original_module.{parameter}")
    if own is None or own.shape != tensor.shape or not torch.equal(own.detach().cpu(), tensor.to(own.dtype)):
        raise ValueError(
            f"{source} holds base weights '{key}' that differ from this model's (e.g. a resized vocabulary); "
            f"load the base model those weights belong to"
        )

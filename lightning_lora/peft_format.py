"""The Hugging Face PEFT LoRA format: export adapters to PEFT and vLLM, import PEFT adapters.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias`` with
``lora_bias``), ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings, and the modules to save
under their own keys; DoRA adapters add ``lora_magnitude_vector`` (our ``magnitude``) and
``use_dora: true``. Conversions are exact or refused:

- A's bias folds into PEFT's ``lora_B.bias`` (``B(Ax + a) + b = BAx + (Ba + b)``); adapters without a
  bias get a zero one when others have one (PEFT's ``lora_bias`` is global).
- Grouped convolutions: PEFT's ``lora_A`` sees every input channel, so ours (one block per group) is
  written with zeros outside its blocks, and read back only when those are zero. PEFT's conv adapter
  has no dilation and no padding mode: such layers are refused.
- Per-module ranks and alphas become ``rank_pattern``/``alpha_pattern`` keys anchored to the whole
  module name (``^`` and escaped dots).
- ``target="vllm"``: one global rank from vLLM's allowed set (ranks are padded with zero rows and
  columns, which changes nothing) and ``lora_alpha`` equal to it, each module's own scaling folded
  into ``lora_B``; no modules to save, no biases, no convolutions, no DoRA (vLLM serves none; a
  merged model serves DoRA's result).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from lightning_lora.adapter_file import (
    AdapterFile,
    adapter_bytes,
    install_parsed,
    parse_adapter,
    read_adapter,
)
from lightning_lora.config import LoRAConfig
from lightning_lora.files import read_bytes, write_atomic
from lightning_lora.layers import LoRABase, adapter_kind
from lightning_lora.naming import absolute, relative, resolve_root, sites
from lightning_lora.spec import AdapterSpec, dtype_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
TARGETS = ("peft", "vllm")
#: The ranks vLLM accepts (``--max-lora-rank``).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT config fields this package cannot represent when they are set.
_UNSUPPORTED: dict[str, Any] = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "target_parameters": None,
    "megatron_config": None,
    "loftq_config": {},
    "use_qalora": False,
    "lora_ga_config": None,
    "trainable_token_indices": None,
}


def export_peft(
    model_or_adapter_file: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    root: str | nn.Module | None = None,
    base_model_name_or_path: str | None = None,
    target: str = "peft",
) -> str:
    """Write an adapter as PEFT writes it: ``out_dir/adapter_config.json`` and ``adapter_model.safetensors``.

    Args:
        model_or_adapter_file: an adapted model, or the path of an adapter file.
        out_dir: the folder to write, local or an fsspec URL (created if needed; each file is written
            atomically, the weights first).
        root: for a model, the submodule that is the transformers model (default: as
            :func:`~lightning_lora.save_adapter` chooses); names in the output are relative to it.
        base_model_name_or_path: recorded in the config, as PEFT does.
        target: ``"peft"``, or ``"vllm"`` for what vLLM serves (see the module docstring).

    Returns:
        ``out_dir`` as a string.

    Raises:
        ValueError: for a bad ``target``, or anything the format cannot hold exactly.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if isinstance(model_or_adapter_file, nn.Module):
        adapter = parse_adapter(adapter_bytes(model_or_adapter_file, root=root), "the model")
        geometry = _conv_geometry(model_or_adapter_file, adapter)
    else:
        adapter = read_adapter(model_or_adapter_file)
        geometry = {}
    tensors, config = _to_peft(adapter, geometry, base_model_name_or_path)
    if target == "vllm":
        tensors, config = _for_vllm(adapter, tensors, config)
    folder = str(out_dir)  # write_atomic creates a local folder; object stores need none
    write_atomic(os.path.join(folder, WEIGHTS_FILE), save_tensors(tensors, metadata={"format": "pt"}))
    write_atomic(os.path.join(folder, CONFIG_FILE), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def import_peft(model: nn.Module, peft_dir: str | os.PathLike, *, root: str | nn.Module | None = None) -> list[str]:
    """Load a PEFT LoRA adapter into ``model`` (plain, or adapted with the same settings), in place.

    The adapters get exactly PEFT's outputs: same ranks, alphas, rsLoRA, dropout, ``lora_bias``, and
    ``modules_to_save`` loaded as fully trainable modules. PEFT adapters carry no fingerprint of their
    base model, so the base is not checked.

    Args:
        model: the transformers model (or a wrapper around it, with ``root`` naming it).
        peft_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        root: the submodule that is the model PEFT adapted (default: ``model`` itself).

    Returns:
        The adapted module names (relative to ``model``).

    Raises:
        ValueError: for another PEFT method, a LoRA variant or setting this package lacks, or tensors
            that do not fit the model; the model is unchanged then.
    """
    folder = str(peft_dir)
    config = _read_config(folder)
    tensors = load_tensors(read_bytes(os.path.join(folder, WEIGHTS_FILE)))
    prefix = resolve_root(model, root)
    adapter = _from_peft(model, prefix, config, tensors, folder)
    return install_parsed(model, adapter.under(prefix), folder, check_base=False, prefix=prefix).names


# --- export ---------------------------------------------------------------------------------------


def _to_peft(
    adapter: AdapterFile, geometry: Mapping[str, Mapping[str, Any]], base_model_name_or_path: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    specs = adapter.modules
    if not specs:
        raise ValueError("the adapter has no adapted modules to export")
    rslora = {spec.use_rslora for spec in specs.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT has one use_rslora for all modules, but the adapter mixes rsLoRA and plain scaling")
    dora = {spec.use_dora for spec in specs.values()}
    if len(dora) > 1:
        raise ValueError("PEFT has one use_dora for all modules, but the adapter mixes DoRA and plain LoRA modules")
    dropouts = sorted({spec.dropout for spec in specs.values()})
    if len(dropouts) > 1:
        raise ValueError(f"PEFT has one lora_dropout for all modules, but the adapter's modules use {dropouts}")
    with_bias = any(spec.bias for spec in specs.values())
    embeddings = [name for name, spec in specs.items() if spec.kind == "embedding"]
    if with_bias and embeddings:
        raise ValueError(
            f"PEFT cannot combine adapter biases (lora_bias) with embedding adapters {embeddings[:5]!r}; "
            f"adapt with bias=False, or leave the embeddings out"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        a = adapter.tensors[f"{name}.matrix_A.weight"]
        b = adapter.tensors[f"{name}.matrix_B.weight"]
        key = PREFIX + name
        if spec.kind == "embedding":
            if spec.bias:
                raise ValueError(f"PEFT has no bias for embedding adapters: module '{name}' has one; adapt it with bias=False")
            tensors[f"{key}.lora_embedding_A"] = a.T.contiguous()  # (r, num_embeddings)
            tensors[f"{key}.lora_embedding_B"] = b.contiguous()  # (dim, r)
            continue
        if spec.kind == "conv":
            a = _dense_conv_a(name, a, b, geometry.get(name))
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = b.contiguous()
        if spec.use_dora:
            tensors[f"{key}.lora_magnitude_vector"] = adapter.tensors[f"{name}.magnitude"].contiguous()
        if with_bias:
            tensors[f"{key}.lora_B.bias"] = _folded_bias(adapter, name, spec, b)
    for name in adapter.trainable:
        for key, tensor in adapter.tensors.items():
            if key.startswith(name + "."):
                tensors[PREFIX + key] = tensor.contiguous()
    r = _most_common(spec.r for spec in specs.values())
    alpha = _most_common(spec.alpha for spec in specs.values())
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(specs),
        "rank_pattern": {_anchored(name): spec.r for name, spec in specs.items() if spec.r != r},
        "alpha_pattern": {_anchored(name): spec.alpha for name, spec in specs.items() if spec.alpha != alpha},
        "use_rslora": rslora.pop(),
        "lora_dropout": dropouts[0],
        "lora_bias": with_bias,
        "bias": "none",
        "fan_in_fan_out": any(spec.kind == "transformers_conv1d" for spec in specs.values()),
        "modules_to_save": list(adapter.trainable) or None,
        "use_dora": dora.pop(),
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    return tensors, config


def _folded_bias(adapter: AdapterFile, name: str, spec: AdapterSpec, b: torch.Tensor) -> torch.Tensor:
    """PEFT's ``lora_B.bias``: ``B a + b``, or zeros for an adapter without bias."""
    if not spec.bias:
        return torch.zeros(b.shape[0], dtype=b.dtype)
    a_bias = adapter.tensors[f"{name}.matrix_A.bias"].double()
    b_bias = adapter.tensors[f"{name}.matrix_B.bias"].double()
    if b.dim() > 2:  # conv: B is (out, r / groups, 1...) and each output group reads its own r / groups
        out_channels, per_group = b.shape[0], b.shape[1]
        groups = a_bias.shape[0] // per_group
        blocks = b.double().reshape(groups, out_channels // groups, per_group)
        folded = torch.bmm(blocks, a_bias.reshape(groups, per_group, 1)).reshape(-1)
    else:
        folded = b.double() @ a_bias
    return (folded + b_bias).to(b.dtype)


def _dense_conv_a(name: str, a: torch.Tensor, b: torch.Tensor, geometry: Mapping[str, Any] | None) -> torch.Tensor:
    """Our grouped ``matrix_A`` (r, in / groups, *k) as PEFT's dense ``lora_A`` (r, in, *k)."""
    if geometry is not None:
        if any(d != 1 for d in geometry["dilation"]) or geometry["padding_mode"] != "zeros":
            raise ValueError(
                f"PEFT's conv adapter has no dilation and no padding mode: module '{name}' has dilation "
                f"{tuple(geometry['dilation'])} and padding_mode {geometry['padding_mode']!r}, which PEFT would compute differently"
            )
    r, per_group = a.shape[0], b.shape[1]
    groups = r // per_group
    if groups == 1:
        return a
    in_per_group = a.shape[1]
    dense = a.new_zeros((r, in_per_group * groups, *a.shape[2:]))
    for group in range(groups):
        rows = slice(group * per_group, (group + 1) * per_group)
        dense[rows, group * in_per_group : (group + 1) * in_per_group] = a[rows]
    return dense


def _conv_geometry(model: nn.Module, adapter: AdapterFile) -> dict[str, dict[str, Any]]:
    found = sites(model)
    geometry = {}
    for name, spec in adapter.modules.items():
        if spec.kind != "conv":
            continue
        full = absolute(name, adapter.root)
        module = found[full].module if full in found else None
        conv = module.original_module if isinstance(module, LoRABase) else module
        if conv is not None:
            geometry[name] = {"dilation": tuple(getattr(conv, "dilation", (1,))), "padding_mode": getattr(conv, "padding_mode", "zeros")}
    return geometry


def _for_vllm(
    adapter: AdapterFile, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    specs = adapter.modules
    dora = [name for name, spec in specs.items() if spec.use_dora]
    if dora:
        raise ValueError(
            f"vLLM serves no DoRA adapters (use_dora), but modules {dora[:5]!r} use DoRA; export with "
            f"target='peft', or serve the model with its adapters merged (merge_and_unload)"
        )
    if adapter.trainable:
        raise ValueError(f"vLLM serves no modules_to_save, but the adapter trains {adapter.trainable!r} fully")
    convs = [name for name, spec in specs.items() if spec.kind == "conv"]
    if convs:
        raise ValueError(f"vLLM serves linear and embedding adapters only, got convolutions {convs[:5]!r}")
    biased = [name for name in specs if f"{PREFIX}{name}.lora_B.bias" in tensors and tensors[f"{PREFIX}{name}.lora_B.bias"].any()]
    if biased:
        raise ValueError(f"vLLM serves no LoRA biases, but modules {biased[:5]!r} have non-zero ones; adapt with bias=False")
    largest = max(spec.r for spec in specs.values())
    rank = next((allowed for allowed in VLLM_RANKS if allowed >= largest), None)
    if rank is None:
        raise ValueError(f"vLLM serves ranks up to {VLLM_RANKS[-1]}, got r={largest}")
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        key = PREFIX + name
        embedding = spec.kind == "embedding"
        a_key, b_key = (f"{key}.lora_embedding_A", f"{key}.lora_embedding_B") if embedding else (f"{key}.lora_A.weight", f"{key}.lora_B.weight")
        a, b = tensors[a_key], tensors[b_key]
        out[a_key] = torch.cat([a, a.new_zeros((rank - spec.r, *a.shape[1:]))])  # (rank, in)
        scaled = (b.double() * spec.scaling).to(b.dtype)  # the global scaling is lora_alpha / rank = 1
        out[b_key] = torch.cat([scaled, scaled.new_zeros((scaled.shape[0], rank - spec.r))], dim=1)
    vllm = {
        **config,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "lora_bias": False,
        "modules_to_save": None,
    }
    return out, vllm


def _anchored(name: str) -> str:
    return "^" + re.escape(name)


def _most_common(values: Any) -> Any:
    return Counter(values).most_common(1)[0][0]


# --- import ---------------------------------------------------------------------------------------


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_FILE)
    try:
        config = json.loads(read_bytes(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')!r} adapter; only PEFT LoRA adapters (peft_type 'LORA') can be imported")
    for field, neutral in _UNSUPPORTED.items():
        if config.get(field, neutral) not in (neutral, None, False, {}, []):
            raise ValueError(f"{path} sets {field}={config[field]!r}, a PEFT LoRA variant this package does not implement")
    return config


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key with ``re.match(rf"(.*\\.)?({key})$", name)`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _from_peft(model: nn.Module, prefix: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> AdapterFile:
    stray = [key for key in tensors if not key.startswith(PREFIX)]
    if stray:
        raise ValueError(f"{source} has tensors outside {PREFIX!r}: {stray[:5]!r}")
    names = {key[len(PREFIX) :] for key in tensors}
    suffixes = r"lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
    adapted = sorted({re.sub(rf"\.({suffixes})$", "", key) for key in names if ".lora_" in key})
    use_dora = bool(config.get("use_dora", False))
    found = sites(model)
    saved = [str(name) for name in (config.get("modules_to_save") or [])]
    ours: dict[str, torch.Tensor] = {}
    specs: dict[str, AdapterSpec] = {}
    for name in adapted:
        full = absolute(name, prefix)
        if full not in found:
            raise ValueError(f"{source} adapts module '{name}', which the model does not have")
        module = found[full].module
        original = module.original_module if isinstance(module, LoRABase) else module
        kind = adapter_kind(original, full)
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        key = PREFIX + name
        if kind == "embedding":
            a, b = tensors[f"{key}.lora_embedding_A"].T, tensors[f"{key}.lora_embedding_B"]
        else:
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        if a.shape[0 if kind != "embedding" else 1] != r:
            raise ValueError(f"{source}: module '{name}' has rank {a.shape[0]} in its tensors but r={r} in its config")
        lora_bias = tensors.get(f"{key}.lora_B.bias")
        bias = lora_bias is not None and bool(config.get("lora_bias"))
        if kind == "conv":
            a = _grouped_conv_a(name, a, original, source)
        ours[f"{name}.matrix_A.weight"] = a.contiguous()
        ours[f"{name}.matrix_B.weight"] = b.contiguous()
        if use_dora:
            magnitude = tensors.get(f"{key}.lora_magnitude_vector")
            if magnitude is None:
                raise ValueError(f"{source} sets use_dora=true but has no lora_magnitude_vector for module '{name}'")
            ours[f"{name}.magnitude"] = magnitude.reshape(-1).contiguous()
        if bias:
            assert lora_bias is not None
            ours[f"{name}.matrix_A.bias"] = torch.zeros(a.shape[0], dtype=a.dtype)
            ours[f"{name}.matrix_B.bias"] = lora_bias.contiguous()
        specs[name] = AdapterSpec(
            kind=kind,
            r=int(r),
            alpha=float(alpha),
            bias=bias,
            dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora", False)),
            adapter_dtype=dtype_name(a.dtype),
            use_dora=use_dora,
        )
    others = []
    for key in names:
        if ".lora_" in key:
            continue
        if ".base_layer." in key:  # PEFT saves targeted embeddings' own weights too ("save_embedding_layers")
            _check_base_layer_copy(model, absolute(key.replace(".base_layer.", "."), prefix), tensors[PREFIX + key], source)
            continue
        others.append(key)
    trainable: list[str] = []  # PEFT matches modules_to_save by name suffix
    for module_name in found:
        inner = relative(module_name, prefix)
        if inner and any(inner == s or inner.endswith("." + s) for s in saved) and any(k.startswith(inner + ".") for k in others):
            trainable.append(inner)
    for key in others:
        if not any(key.startswith(name + ".") for name in trainable):
            raise ValueError(f"{source} has tensor '{key}' that belongs to no adapter and no module to save")
        ours[key] = tensors[PREFIX + key]
    if not specs:
        raise ValueError(f"{source} has no LoRA tensors")
    config_fields = LoRAConfig(
        r=_most_common(spec.r for spec in specs.values()),
        alpha=_most_common(spec.alpha for spec in specs.values()),
        bias=any(spec.bias for spec in specs.values()),
        targets=list(specs),
        dropout=_most_common(spec.dropout for spec in specs.values()),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=use_dora,
        trainable=trainable,
    )
    return AdapterFile(
        tensors=ours,
        config=config_fields,
        modules=specs,
        trainable=trainable,
        base_fingerprint="",
        library_version="peft",
        base_dtypes=None,
        root="",
    )


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


def _grouped_conv_a(name: str, a: torch.Tensor, conv: nn.Module, source: str) -> torch.Tensor:
    """PEFT's dense ``lora_A`` (r, in, *k) as our grouped one (r, in / groups, *k), if it is block-diagonal."""
    groups = int(getattr(conv, "groups", 1))
    if any(d != 1 for d in getattr(conv, "dilation", (1,))) or getattr(conv, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"{source}: PEFT's adapter of conv '{name}' ignores its dilation or padding mode; it cannot be imported exactly")
    if groups == 1:
        return a
    r, in_channels = a.shape[0], a.shape[1]
    per_group, in_per_group = r // groups, in_channels // groups
    grouped = a.new_empty((r, in_per_group, *a.shape[2:]))
    for group in range(groups):
        rows = slice(group * per_group, (group + 1) * per_group)
        block = slice(group * in_per_group, (group + 1) * in_per_group)
        outside = a[rows].clone()
        outside[:, block] = 0
        if outside.any():
            raise ValueError(f"{source}: the adapter of grouped conv '{name}' mixes groups, which this package's conv adapter cannot hold")
        grouped[rows] = a[rows, block]
    return grouped

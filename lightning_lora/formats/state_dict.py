"""Merging an adapter file into a plain state dict (a ``.safetensors`` of the base model), without the model.

:func:`merge_state_dict` rebuilds each adapted layer around its base tensors (the kind's
``rebuild_base``), gives it this package's adapter layer with the stored settings and tensors, and
merges with :meth:`~lightning_lora.adapters.LoRABase.merge`: the same code and checks as merging a
model. The base is checked against the adapter's fingerprint first. The ``lightning-lora merge``
command uses it for a state dict that is not a Hugging Face model folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from lightning_lora.adapters.base import LoRABase, base_bias, base_weight, build_adapter
from lightning_lora.adapters.registry import kind_named
from lightning_lora.formats.adapter_file import AdapterFile
from lightning_lora.formats.files import read_bytes
from lightning_lora.formats.fingerprint import dtype_note, fingerprint_matches, fingerprint_tensors
from lightning_lora.naming import absolute, is_inside, relative

# State-dict entries that are buffers of torch's own modules (BatchNorm's running statistics).
_KNOWN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def merge_state_dict(
    tensors: Mapping[str, torch.Tensor],
    adapter: AdapterFile,
    base: str = "the base state dict",
    source: str = "the adapter file",
    check_base: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """A base model's state dict with ``adapter`` merged in, each tensor in its own dtype (or floating-point
    ones in ``dtype``).

    Each adapted layer is rebuilt around its base weight (``nn.Linear``, ``nn.ConvNd``,
    ``nn.Embedding`` or transformers' ``Conv1D``), given the library's adapter layer with the stored
    settings and tensors, and merged with :meth:`~lightning_lora.adapters.LoRABase.merge` (computed in
    float32, refused where a bfloat16 or float16 weight would lose too much of the update); the
    tensors of ``trainable`` modules replace the base's. ``base`` and ``source`` name the two in errors.

    Raises:
        ValueError: if the state dict lacks an adapted layer, a tensor does not fit, or (with
            ``check_base``) the base weights do not match the adapter's fingerprint or cannot be
            checked exactly.
    """
    prefix = _locate(tensors, adapter, base, source)
    if check_base:
        _check_base(tensors, adapter, prefix, base, source)
    owned: set[str] = set()
    merged = {key: _cast(tensor, dtype) for key, tensor in tensors.items()}
    for name, spec in adapter.modules.items():
        full = absolute(name, prefix)
        kind = kind_named(spec.kind)
        weight_key, bias_key = kind.base_keys(full)
        weight = merged[weight_key].clone()  # merged in place: the caller's tensors stay as they are
        bias = merged.get(bias_key) if bias_key is not None else None
        bias = None if bias is None else bias.clone()
        file_tensors = {key[len(name) + 1 :]: tensor for key, tensor in adapter.tensors.items() if key.startswith(f"{name}.")}
        try:
            layer = kind.rebuild_base(weight, bias, file_tensors, spec)
        except ValueError as err:
            raise ValueError(f"{base} does not fit the adapter: '{relative(weight_key, prefix)}': {err}") from err
        lora = build_adapter(layer, spec, name, kind)
        _fill(lora, file_tensors, name, source)
        owned.update(f"{name}.{key}" for key in lora.adapter_params())
        if lora.merge_creates_bias:
            raise ValueError(
                f"{source} cannot be merged into {base}: module '{name}' has an adapter bias but no bias in the "
                f"base, so the merged model would not fit the base's architecture; adapt it with bias=False (or bias='auto')"
            )
        lora.merge()
        merged[weight_key] = base_weight(layer).detach()
        merged_bias = base_bias(layer)
        if merged_bias is not None:
            assert bias_key is not None, "only a layer with a bias key merges a bias"
            merged[bias_key] = merged_bias.detach()
    for name in adapter.trainable:
        stored = {key for key in adapter.tensors if is_inside(key, [name])}
        present = {str(relative(key, prefix)) for key in tensors if is_inside(key, [absolute(name, prefix)])}
        if stored != present:
            raise ValueError(
                f"{source} does not fit {base}: trainable module '{name}' has tensors {sorted(stored)[:5]!r} in the "
                f"adapter file but {sorted(present)[:5]!r} in the base"
            )
        for key in stored:
            full_key = absolute(key, prefix)
            if tuple(adapter.tensors[key].shape) != tuple(tensors[full_key].shape):
                raise ValueError(
                    f"{source} does not fit {base}: tensor '{key}' has shape {tuple(adapter.tensors[key].shape)} in "
                    f"the adapter file but {tuple(tensors[full_key].shape)} in the base"
                )
            merged[full_key] = _cast(adapter.tensors[key], merged[full_key].dtype).clone()
        owned.update(stored)
    unexpected = sorted(set(adapter.tensors) - owned)
    if unexpected:
        raise ValueError(
            f"{source} holds tensors that belong to no adapted or trainable module: {unexpected[:5]!r}"
        )
    return {key: tensor.contiguous() for key, tensor in merged.items()}


def _locate(tensors: Mapping[str, torch.Tensor], adapter: AdapterFile, base: str, source: str) -> str:
    """The prefix under which the adapter's module names are found in the state dict."""
    root = adapter.root  # the module the names are relative to in the model the file was saved from
    candidates = list(dict.fromkeys(["", root]))
    weights = {name: kind_named(spec.kind).base_keys(name)[0] for name, spec in adapter.modules.items()}
    fits = [prefix for prefix in candidates if all(absolute(key, prefix) in tensors for key in weights.values())]
    if not fits:
        missing = [key for key in weights.values() if key not in tensors]
        where = f" (nor under its root {root!r})" if root else ""
        raise ValueError(
            f"{base} does not fit {source}: expected the weights of its adapted modules, but the state dict has no "
            f"{missing[:5]!r}{where}; it has {sorted(tensors)[:5]!r}..."
        )
    if len(fits) > 1:
        raise ValueError(f"{base} fits {source} both as it is and under {root!r}; it cannot say which module is adapted")
    return fits[0]


def _check_base(tensors: Mapping[str, torch.Tensor], adapter: AdapterFile, prefix: str, base: str, source: str) -> None:
    """The library's fingerprint check, over the state dict's tensors named as the model's parameters.

    A state dict does not say which of its tensors are parameters (the fingerprint's) and which are
    buffers: the check passes when its tensors, or those without the recognisable buffers
    (BatchNorm statistics, integer tensors), reproduce the fingerprint exactly.
    """
    named = [
        (inner, tensor)
        for key, tensor in tensors.items()
        if (inner := relative(key, prefix)) is not None and not is_inside(inner, adapter.trainable)
    ]
    buffers = [name for name, tensor in named if name.rsplit(".", 1)[-1] in _KNOWN_BUFFERS or not tensor.is_floating_point()]
    without = [(name, tensor) for name, tensor in named if name not in set(buffers)]
    digest, dtypes = adapter.base_fingerprint, adapter.base_dtypes
    if fingerprint_matches(named, digest, dtypes) or (buffers and fingerprint_matches(without, digest, dtypes)):
        return
    if buffers:
        raise ValueError(
            f"{base} cannot be checked exactly against {source}: it holds tensors that may be "
            f"buffers rather than parameters ({buffers[:3]!r}), and neither with them ({fingerprint_tensors(named)[:12]}) "
            f"nor without them ({fingerprint_tensors(without)[:12]}) do its tensors give the adapter's base fingerprint "
            f"{digest[:12]}; if it is the base the adapter was trained on, pass --no-check-base to merge without the check"
            f".{dtype_note(without, dtypes)}"
        )
    raise ValueError(
        f"{base} is not the base {source} was trained on: base fingerprint {digest[:12]} in the "
        f"adapter file, {fingerprint_tensors(named)[:12]} from the {len(named)} tensors of the base file. Pass the base "
        f"weights it was trained on, or --no-check-base to merge anyway (a state dict holding buffers besides "
        f"parameters cannot be checked exactly).{dtype_note(named, dtypes)}"
    )


def _fill(lora: LoRABase, file_tensors: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """Copy the adapter file's tensors of module ``name`` (names relative to it) into the adapter layer's own parameters."""
    params = lora.adapter_params()
    missing = [f"{name}.{key}" for key in params if key not in file_tensors]
    if missing:
        raise ValueError(f"{source} does not fit its own settings: expected tensors {missing!r}, which it does not hold")
    with torch.no_grad():
        for key, param in params.items():
            tensor = file_tensors[key]
            if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != param.dtype:
                raise ValueError(
                    f"{source} does not fit the base: tensor '{name}.{key}' is {tuple(tensor.shape)} {tensor.dtype} in "
                    f"the file, but {tuple(param.shape)} {param.dtype} for this layer of the base"
                )
            param.copy_(tensor)


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors and the metadata of a ``.safetensors`` state dict (local or fsspec URL).

    Raises:
        ValueError: if the file does not parse as safetensors.
    """
    data = read_bytes(path)
    try:
        tensors = load_tensors(data)
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
    except (SafetensorError, UnicodeDecodeError, json.JSONDecodeError, RuntimeError, TypeError) as err:
        raise ValueError(f"{path} must be a .safetensors file, but it does not parse as one: {' '.join(str(err).split())}") from err
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, ({str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A floating-point ``tensor`` in ``dtype`` (None: its own); others as they are."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

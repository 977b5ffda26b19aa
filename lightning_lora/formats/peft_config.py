"""PEFT adapter folders read as strictly as adapter files: the files, and ``adapter_config.json`` field by field.

A PEFT folder comes from anywhere (the hub, a colleague, another tool), so before any tensor is used:

- the files are regular files (not a FIFO, a device or a folder, which would hang or fail a read),
  the config at most :data:`CONFIG_LIMIT` bytes; a folder with ``adapter_model.bin`` (a pickle,
  never loaded here) gets a message saying how to convert it;
- each field of the config has its type and range: real booleans (``"false"`` is not false),
  positive integer ranks, finite positive alphas whose scaling stays below :data:`MAX_SCALING`, a
  dropout in [0, 1), lists of names, valid regular expressions; ``NaN`` and ``Infinity`` are not JSON;
- PEFT LoRA variants and settings this package does not implement are refused by name.

Each error is one ``ValueError`` or ``TypeError`` naming the file and the field. What the config
says is then checked against the tensors, module by module, as the import reads them
(:func:`check_values`, :func:`check_agrees`, :func:`targeted_without_tensors`): finite floating-point
matrices, every module targeted, biases exactly where ``lora_bias`` says, a variant's tensors only
with its flags, and no targeted module without tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_lora.adapters.registry import variants
from lightning_lora.adapters.variants import Variant
from lightning_lora.formats.files import read_bytes
from lightning_lora.naming import Site, relative
from lightning_lora.patterns import ALL_LINEAR
from lightning_lora.surgery.plan import output_layers, targeted_by_all_linear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"
#: The largest ``adapter_config.json`` read (PEFT's are a few KiB).
CONFIG_LIMIT = 2**20
#: The largest scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) accepted: beyond it the update
#: swamps the layer's output and overflows half-precision activations (PEFT's are 0.5 to 64).
MAX_SCALING = 1e4
#: PEFT LoRA settings this package does not implement, with the value that means "off".
UNSUPPORTED: dict[str, Any] = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "megatron_config": None,
    "loftq_config": {},
    "use_qalora": False,
    "lora_ga_config": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_bdlora": False,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
    "kasa_config": None,
}
_FLAGS = ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode")
_STRINGS = ("task_type", "base_model_name_or_path", "revision", "peft_version")


def read_config(folder: str) -> dict[str, Any]:
    """``folder``'s ``adapter_config.json``, validated (see the module docstring).

    Raises:
        FileNotFoundError: if it is missing. ValueError, TypeError: naming the file and the field.
    """
    path = os.path.join(folder, CONFIG_FILE)
    if "://" not in path:
        check_regular(path, CONFIG_LIMIT)
    data = read_bytes(path)
    if len(data) > CONFIG_LIMIT:
        raise ValueError(f"{path} has {len(data)} bytes, more than a PEFT config holds ({CONFIG_LIMIT})")
    try:
        config = json.loads(data, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    validate(config, path)
    return config


def weights_path(folder: str) -> str:
    """``folder``'s ``adapter_model.safetensors``, a regular file.

    Raises:
        ValueError: if the folder holds the pickled ``adapter_model.bin`` instead (with how to convert
            it), or the weights are not a regular file. FileNotFoundError: if there are none.
    """
    path = os.path.join(folder, WEIGHTS_FILE)
    if "://" in path:
        return path
    pickled = os.path.join(folder, PICKLED_FILE)
    if not os.path.lexists(path) and os.path.lexists(pickled):
        raise ValueError(
            f"{folder} holds {PICKLED_FILE}, a pickle, which this package never loads (loading it can run "
            f"code); if you trust it, convert it once: python -c \"import torch; from safetensors.torch import "
            f"save_file; save_file(torch.load('{pickled}', weights_only=True), '{path}')\""
        )
    check_regular(path, None)
    return path


def check_regular(path: str, limit: int | None) -> None:
    """``path`` is a regular file (links followed) of at most ``limit`` bytes.

    Raises:
        FileNotFoundError: if there is none. ValueError: otherwise.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a folder, a pipe or a device), so it is not read")
    if limit is not None and info.st_size > limit:
        raise ValueError(f"{path} has {info.st_size} bytes, more than a PEFT config holds ({limit})")


def validate(config: Any, path: str) -> None:
    """Check a PEFT LoRA config field by field (see the module docstring).

    Raises:
        ValueError, TypeError: naming ``path`` and the field.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')!r} adapter; only PEFT LoRA adapters (peft_type 'LORA') can be imported")
    for field, neutral in UNSUPPORTED.items():
        if config.get(field, neutral) not in (neutral, None, False, {}, []):
            raise ValueError(f"{path} sets {field}={config[field]!r}, a PEFT LoRA variant this package does not implement")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{path} sets bias={bias!r} (the base layers' own biases trained), which this package does not "
            f"implement; PEFT's default is 'none' (lora_bias is the adapters' own bias)"
        )
    for field in _FLAGS:
        value = config.get(field)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{path}: {field} must be true or false, got {value!r} ({type(value).__name__})")
    for field in _STRINGS:
        value = config.get(field)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{path}: {field} must be a string or null, got {value!r} ({type(value).__name__})")
    r = _rank(config.get("r", 8), f"{path}: r")
    alpha = _alpha(config.get("lora_alpha", 8), f"{path}: lora_alpha")
    rslora = bool(config.get("use_rslora"))
    _check_scaling(alpha, r, rslora, f"{path}: lora_alpha={alpha!r} with r={r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and (not _number(dropout) or not 0 <= dropout < 1):
        raise ValueError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    for field in ("target_modules", "exclude_modules"):
        _names(config.get(field), f"{path}: {field}", text=True)
    for field in ("target_parameters", "modules_to_save"):
        _names(config.get(field), f"{path}: {field}", text=False)
    ranks = _patterns(config.get("rank_pattern"), f"{path}: rank_pattern")
    alphas = _patterns(config.get("alpha_pattern"), f"{path}: alpha_pattern")
    for key, value in ranks.items():
        _check_scaling(alpha, _rank(value, f"{path}: rank_pattern[{key!r}]"), rslora, f"{path}: rank_pattern[{key!r}]={value!r}")
    for key, value in alphas.items():
        _check_scaling(_alpha(value, f"{path}: alpha_pattern[{key!r}]"), min([r, *ranks.values()]), rslora, f"{path}: alpha_pattern[{key!r}]={value!r}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rank(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be a positive integer, got {value!r} ({type(value).__name__})")
    if not 1 <= value <= 2**16:
        raise ValueError(f"{what} must be a positive integer of at most {2**16}, got {value}")
    return value


def _alpha(value: Any, what: str) -> float:
    if not _number(value):
        raise TypeError(f"{what} must be a finite number, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
    return float(value)


def _check_scaling(alpha: float, r: int, rslora: bool, what: str) -> None:
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    if scaling > MAX_SCALING:
        raise ValueError(f"{what} scales the update by {scaling:g}, more than {MAX_SCALING:g}: it would overflow; check the file")


def _names(value: Any, what: str, text: bool) -> None:
    """None, a list of names, or (``text``) one regular expression or ``all-linear``."""
    if value is None:
        return
    if text and isinstance(value, str):
        _regex(value, what)
        return
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        expected = "null, a list of module names or one regular expression" if text else "null or a list of names"
        raise TypeError(f"{what} must be {expected}, got {value!r}")


def _patterns(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a JSON object of pattern -> value, got {value!r}")
    for key in value:
        _regex(key, f"{what} key")
    return value


def _regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {err}") from err


def check_values(own: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """A module's PEFT tensors are floating point, at least 1-d, and finite."""
    for key, tensor in own.items():
        if not tensor.is_floating_point() or tensor.dim() == 0:
            raise ValueError(f"{source}: module '{name}' has {key} of dtype {tensor.dtype} and shape {tuple(tensor.shape)}, not a floating-point matrix")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: module '{name}' has {key} with non-finite values (inf or NaN)")


def targeted_without_tensors(
    model: nn.Module, found: Mapping[str, Site], prefix: str, config: Mapping[str, Any], adapted: set[str]
) -> list[str]:
    """The modules PEFT's ``target_modules`` (less ``exclude_modules``) name that have no tensors in the file."""
    wanted, excluded = config.get("target_modules"), config.get("exclude_modules")
    names = [name for name, site in found.items() if not site.parameter and not targeted(name, excluded)]
    if wanted == ALL_LINEAR:  # PEFT's rule, as this package's: every linear layer but the output layer
        outputs = {relative(name, prefix) for name in output_layers(model)}
        chosen = [name for name in names if targeted_by_all_linear(found[name].module) and name not in outputs]
    else:
        chosen = [name for name in names if targeted(name, wanted)]
    return [name for name in chosen if name not in adapted]


def check_agrees(
    config: Mapping[str, Any], own: Mapping[str, torch.Tensor], name: str, kind: Any, variant: type[Variant] | None, source: str
) -> None:
    """One module's tensors say what the config says: it is targeted, has a bias exactly where
    ``lora_bias`` says so, and a variant's tensors only with that variant's flags.

    Raises:
        ValueError: naming the module, the field and the tensor.
    """
    wanted = config.get("target_parameters") if kind.adapts_parameter else config.get("target_modules")
    if not targeted(name, wanted):
        field = "target_parameters" if kind.adapts_parameter else "target_modules"
        raise ValueError(f"{source} has tensors of module '{name}', which its {field} {wanted!r} does not name")
    lora_bias = bool(config.get("lora_bias"))
    if "lora_B.bias" in own and not lora_bias:
        raise ValueError(f"{source} holds lora_B.bias for module '{name}' but sets lora_bias={config.get('lora_bias')!r}")
    if lora_bias and kind.peft_bias and "lora_B.bias" not in own:
        raise ValueError(f"{source} sets lora_bias=true but holds no lora_B.bias for module '{name}'")
    for other in variants():
        stray = [key for key in other.peft_tensors.values() if key in own]
        if stray and other is not variant:
            raise ValueError(f"{source} holds {stray[0]} for module '{name}' but does not set {flags(other)}")


def targeted(name: str, targets: Any) -> bool:
    """Whether PEFT's ``target_modules`` (or ``target_parameters``) names module ``name``: a regular
    expression matches it whole, a list entry is it or its dotted suffix; ``all-linear`` names any linear."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets == ALL_LINEAR or re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def flags(variant: type[Variant]) -> str:
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in (variant.peft_config or {}).items())

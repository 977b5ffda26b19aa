"""The ``lightning-lora`` console script: inspect, merge, convert and check adapter files from a shell.

Commands (``lightning-lora COMMAND --help`` for each):

- ``inspect PATH``: what an adapter file, a PEFT adapter folder or a Lightning checkpoint holds;
- ``merge --base BASE --adapter FILE --out OUT [--dtype D]``: the base model with the adapter merged
  in, in the base's dtype (or ``D``), as safetensors; a base that is not the one the adapter was
  trained on is refused;
- ``export-peft`` / ``import-peft``: conversions to and from Hugging Face PEFT's format
  (:mod:`lightning_lora.formats.peft`);
- ``check CKPT``: whether a Lightning checkpoint (a file, or a sharded checkpoint's folder) and its
  companion adapter file belong together, and every file of it matches its recorded digest.

This module owns the command line only: argument parsing and printing; the work is the library's
(the merge of a plain state dict is :func:`lightning_lora.formats.state_dict.merge_state_dict`). Errors print
one line, ``lightning-lora: error: <message>``, on stderr and exit with status 1 (argparse's usage
errors keep status 2). transformers is imported only by the commands that build a model with it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from lightning_lora.adapters.spec import dtype_name
from lightning_lora.config import most_common
from lightning_lora.formats.adapter_file import (
    SUFFIX,
    AdapterFile,
    library_version,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lightning_lora.formats.files import overlaps, staged_folder, write_atomic
from lightning_lora.formats.peft_config import read_config, weights_path
from lightning_lora.formats.peft import CONFIG_FILE as PEFT_CONFIG
from lightning_lora.formats.peft import WEIGHTS_FILE as PEFT_WEIGHTS
from lightning_lora.formats.peft import TASK_TYPES, export_peft, import_peft
from lightning_lora.formats.state_dict import merge_state_dict, read_state_dict
from lightning_lora.lightning.checkpoint import (
    CHECKPOINT_KEY,
    METADATA_FILE,
    adapter_path_for,
    check_companion,
    check_loaded_pair,
    read_checkpoint,
    step_of,
)
from lightning_lora.naming import is_inside
from lightning_lora.surgery.merge import merge_and_unload
from lightning_lora.surgery.state import base_named_parameters

PROG = "lightning-lora"
#: ``merge --dtype`` choices.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The PEFT config fields ``inspect`` prints.
PEFT_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "modules_to_save",
)
#: Errors reported as one line with exit status 1 (anything else is a bug and keeps its traceback).
ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OSError,  # FileNotFoundError, and what transformers raises for a folder it cannot load
    RuntimeError,
    SafetensorError,
    pickle.UnpicklingError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Usage errors exit through argparse (status 2, ``--help`` status 0).
    """
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], None] = args.run
    with warnings.catch_warnings(record=True) as caught:  # shown after success; an error prints one line
        try:
            command(args)
        except ERRORS as err:
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return 1
    for warning in caught:
        print(f"{PROG}: warning: {_one_line(warning.message)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-lora`` and its commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, merge, convert and check lightning_lora adapter files.",
        epilog=(
            f"Run '{PROG} COMMAND --help' for the options of a command. Every error is one line on stderr "
            f"and exit status 1 (usage errors: 2). No input is ever an output, and an existing output is "
            f"replaced only with --force, as a whole (a folder is written beside it and renamed into place)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {library_version()}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="show what an adapter file, a PEFT adapter folder or a Lightning checkpoint holds",
        description=(
            "Print an adapter file's settings (the stored LoRAConfig, and each module's kind, r, alpha and "
            "bias where they differ from the most common ones), its adapted and trainable modules, the "
            "parameter count, the bytes of its tensors, the base fingerprint and the library version that "
            f"wrote it. For a PEFT adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}): its LoRA config fields "
            "and the count and bytes of its tensors. For a Lightning checkpoint (read without unpickling "
            "anything but tensors): its step, its LoRA record (adapted modules, base weights left out) and "
            f"its companion adapter file (x.ckpt -> x{SUFFIX}) and whether they belong together."
        ),
    )
    inspect.add_argument("path", metavar="PATH", help=f"an adapter file (*{SUFFIX}), a PEFT adapter folder or a .ckpt")
    inspect.set_defaults(run=run_inspect)

    merge = commands.add_parser(
        "merge",
        help="merge an adapter into its base model and write the result as safetensors",
        description=(
            "Merge the adapter into the base weights (computed in float32) and write the merged model in the "
            "base's dtype, or in --dtype. A Hugging Face model folder (with config.json) is built with "
            "transformers (offline), the adapter loaded and merged, and the model saved with save_pretrained "
            "into the folder --out. A plain .safetensors state dict is merged tensor by tensor and written to "
            "the file --out. The base is refused unless its weights match the fingerprint stored in the "
            "adapter file, and a merge into bfloat16 or float16 weights that would lose more than 10%% of "
            "the update is refused (merge with --dtype float32 then)."
        ),
    )
    merge.add_argument("--base", required=True, metavar="BASE", help="a .safetensors state dict or a Hugging Face model folder")
    merge.add_argument("--adapter", required=True, metavar="FILE", help=f"the adapter file (*{SUFFIX})")
    merge.add_argument(
        "--out", required=True, metavar="OUT", help="where to write: a folder for a Hugging Face base, else a .safetensors file"
    )
    merge.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="the dtype of the merged weights (default: the base's: its config's dtype for a Hugging Face "
        "folder, each tensor's own for a state dict)",
    )
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    merge.add_argument(
        "--no-check-base",
        dest="check_base",
        action="store_false",
        help="merge without comparing the base weights with the adapter's base fingerprint",
    )
    merge.set_defaults(run=run_merge)

    export = commands.add_parser(
        "export-peft",
        help="write an adapter file as a PEFT adapter folder",
        description=(
            f"Write the adapter file as Hugging Face PEFT writes adapters: OUT_DIR/{PEFT_CONFIG} and "
            f"OUT_DIR/{PEFT_WEIGHTS}. Settings PEFT cannot hold exactly are refused."
        ),
    )
    export.add_argument("adapter", metavar="ADAPTER", help=f"the adapter file (*{SUFFIX})")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created if needed)")
    export.add_argument(
        "--target",
        choices=("peft", "vllm"),
        default="peft",
        help="'peft' (default), or 'vllm' for what vLLM serves (one global rank, scaling folded into lora_B)",
    )
    export.add_argument(
        "--base-model-name-or-path",
        metavar="NAME",
        default=None,
        help="the base model's name or path, recorded in adapter_config.json as PEFT does (default: as the "
        "adapter file records it)",
    )
    export.add_argument(
        "--task-type",
        choices=TASK_TYPES,
        default=None,
        help="PEFT's task_type, by which AutoPeftModelFor* loads the base model (default: as the adapter file "
        "records it, from the model's class)",
    )
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    export.set_defaults(run=run_export_peft)

    imported = commands.add_parser(
        "import-peft",
        help="convert a PEFT adapter folder into an adapter file",
        description=(
            "Build the Hugging Face model of --base (offline), load the PEFT LoRA adapter into it and save "
            "it as an adapter file (with the fingerprint of that base, which PEFT adapters do not carry)."
        ),
    )
    imported.add_argument("peft_dir", metavar="PEFT_DIR", help=f"a PEFT adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS})")
    imported.add_argument("out", metavar="OUT", help=f"the adapter file to write (*{SUFFIX})")
    imported.add_argument("--base", required=True, metavar="HF_DIR", help="the Hugging Face model folder the adapter was trained on")
    imported.add_argument("--force", action="store_true", help="replace OUT if it exists")
    imported.set_defaults(run=run_import_peft)

    check = commands.add_parser(
        "check",
        help="check a Lightning checkpoint's bytes and that its companion adapter file belongs to it",
        description=(
            f"Check that every file of CKPT matches the SHA-256 its companion adapter file (x.ckpt -> x{SUFFIX}) "
            "records, and that the companion holds the adapter tensors and the step that the checkpoint records."
        ),
    )
    check.add_argument(
        "ckpt", metavar="CKPT", help="a Lightning checkpoint written with LoRACallback: a .ckpt file or a sharded checkpoint's folder"
    )
    check.set_defaults(run=run_check)
    return parser


# --- inspect --------------------------------------------------------------------------------------


def run_inspect(args: argparse.Namespace) -> None:
    """``lightning-lora inspect PATH``."""
    path = str(args.path)
    if os.path.isdir(path):
        _inspect_peft(path)
        return
    _require_file("PATH", path, f"an adapter file (*{SUFFIX}), a PEFT adapter folder or a Lightning checkpoint")
    if _is_checkpoint(path):
        _inspect_checkpoint(path)
        return
    _inspect_adapter(path, _read_adapter("PATH", path, f"an adapter file (*{SUFFIX}), a PEFT adapter folder or a Lightning checkpoint"))


def _inspect_checkpoint(path: str) -> None:
    try:
        checkpoint = read_checkpoint(path)
    except ValueError as err:
        raise ValueError(f"PATH must be an adapter file, a PEFT adapter folder or a Lightning checkpoint: {err}") from err
    print(f"Lightning checkpoint: {path}")
    print("step: " + " ".join(f"{key}={value}" for key, value in step_of(checkpoint).items()))
    state = checkpoint.get("state_dict")
    state = state if isinstance(state, dict) else {}
    record = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(record, dict):
        print(f"LoRA record: none (not written with LoRACallback or LoRAMixin); {len(state)} state dict entries")
        return
    modules, trainable = record.get("modules", {}), record.get("trainable", [])
    left_out = record.get("base_keys", [])
    print(f"LoRA record: version {record.get('version')}, {len(modules)} adapted modules, trainable modules: {', '.join(trainable) or '-'}")
    print(
        f"state dict: {len(state)} entries; base weights "
        + (f"left out: {len(left_out)} (filled from the base model on load, after its fingerprint is checked)" if left_out else "kept")
    )
    companion = adapter_path_for(path)
    if not os.path.exists(companion):
        print(f"companion adapter file: {companion} (missing; lightning_lora.write_companion regenerates it)")
        return
    try:
        check_loaded_pair(checkpoint, path)
        print(f"companion adapter file: {companion} (belongs to it)")
    except ValueError as err:
        print(f"companion adapter file: {companion} (does not belong to it: {_one_line(err)})")


def _inspect_adapter(path: str, adapter: AdapterFile) -> None:
    print(f"adapter file: {path}")
    print(f"library version: {adapter.library_version}")
    print(f"base fingerprint: {adapter.base_fingerprint[:12]}")
    if adapter.base_dtypes:
        common = adapter.base_dtypes.get("", "float32")
        others = len(adapter.base_dtypes) - ("" in adapter.base_dtypes)
        print(f"base dtypes: {common}" + (f" ({others} weights in other dtypes)" if others else ""))
    if adapter.root:
        print(f"root: {adapter.root} (module names are relative to it)")
    if adapter.checkpoint is not None:
        print("checkpoint: " + " ".join(f"{key}={value}" for key, value in adapter.checkpoint.items()))
    print("config:")
    for key, value in adapter.config.to_dict().items():
        print(f"  {key} = {value!r}")
    specs = {name: spec.to_dict() for name, spec in adapter.modules.items()}
    common_spec = {key: most_common(spec[key] for spec in specs.values()) for key in next(iter(specs.values()), {})}
    if common_spec:
        print("adapter settings: " + " ".join(f"{key}={value}" for key, value in common_spec.items()))
    print(f"adapted modules ({len(specs)}):")
    width = max((len(name) for name in specs), default=0)
    for name, spec in specs.items():
        differing = " ".join(f"{key}={value}" for key, value in spec.items() if value != common_spec[key])
        print(f"  {name:<{width}}  {differing}".rstrip())
    print(f"trainable modules ({len(adapter.trainable)}): {', '.join(adapter.trainable) or '-'}")
    params = {key: tensor.numel() for key, tensor in adapter.tensors.items()}
    in_trainable = sum(count for key, count in params.items() if is_inside(key, adapter.trainable))
    size = sum(tensor.numel() * tensor.element_size() for tensor in adapter.tensors.values())
    print(
        f"tensors: {len(adapter.tensors)}, parameters: {sum(params.values()):,} (adapters "
        f"{sum(params.values()) - in_trainable:,}, trainable modules {in_trainable:,}), bytes: {size:,}"
    )


def _inspect_peft(folder: str) -> None:
    expected = f"a PEFT adapter folder with {PEFT_CONFIG} and {PEFT_WEIGHTS}, or an adapter file"
    if not os.path.isfile(os.path.join(folder, PEFT_CONFIG)):
        raise FileNotFoundError(f"PATH {folder!r} is a folder without {PEFT_CONFIG}; expected {expected}")
    try:  # as strictly as import_peft reads it: the files, then the config field by field
        config = read_config(folder)
        entries = _safetensors_entries(weights_path(folder))
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise type(err)(f"PATH {folder!r} must be {expected}: {err}") from err
    print(f"PEFT adapter: {folder}")
    for key in ("peft_type", "base_model_name_or_path"):
        if key in config:
            print(f"{key}: {config[key]}")
    print("config:")
    for key in PEFT_FIELDS:
        print(f"  {key} = {config[key]!r}" if key in config else f"  {key} = (absent)")
    count = sum(numel for numel, _ in entries.values())
    size = sum(nbytes for _, nbytes in entries.values())
    print(f"tensors: {len(entries)}, parameters: {count:,}, bytes: {size:,}")


def _safetensors_entries(path: str) -> dict[str, tuple[int, int]]:
    """Tensor name -> (element count, bytes), from a safetensors file's header, as safetensors validates it
    (shapes, dtypes and offsets that cover the file), without reading the tensors."""
    entries: dict[str, tuple[int, int]] = {}
    try:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                numel = math.prod(view.get_shape())
                entries[name] = (numel, numel * _DTYPE_BYTES.get(view.get_dtype(), 0))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} must be a safetensors file: {err}") from err
    return entries


#: Bytes per element of safetensors' dtype names.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# --- merge ----------------------------------------------------------------------------------------


def run_merge(args: argparse.Namespace) -> None:
    """``lightning-lora merge --base BASE --adapter FILE --out OUT [--dtype D] [--no-check-base]``."""
    base, adapter_path, out = str(args.base), str(args.adapter), str(args.out)
    dtype = None if args.dtype is None else DTYPES[args.dtype]
    _require_file("--adapter", adapter_path, f"an adapter file (*{SUFFIX})")
    if _is_hf_folder(base):
        if os.path.isfile(out):
            raise ValueError(f"--out must be a folder for a Hugging Face --base (save_pretrained writes into it), got the file {out!r}")
        _check_output("--out", out, args.force, {"--base": base, "--adapter": adapter_path})
        adapter = _read_adapter("--adapter", adapter_path)  # a bad file fails before the model is built
        with _transformers("--base", base) as transformers:
            model, stored = _hf_model(transformers, base, "--base")
            try:
                load_adapter(model, adapter_path, check_base=args.check_base)
            except ValueError as err:  # the library's advice, in the command line's terms
                message = str(err).replace("pass check_base=False to load anyway", "pass --no-check-base to merge anyway")
                raise ValueError(f"--adapter does not fit --base {base}: {message}") from err
            dtype = dtype or stored
            _cast_base(model, dtype)  # merged in float32 into weights of this dtype, with the rounding checked
            merge_and_unload(model)
            save_pretrained: Callable[[str], Any] = getattr(model, "save_pretrained")
            with staged_folder(out) as staging:  # replaces an existing --out as a whole
                save_pretrained(staging)  # safetensors: the default since transformers 4.35, the only format in 5
        print(f"merged {len(adapter.modules)} adapted modules of {adapter_path} into {base}; wrote {out} ({dtype_name(dtype)})")
        return
    if os.path.isdir(base):
        raise ValueError(
            f"--base must be a .safetensors file or a Hugging Face model folder (with config.json), "
            f"got the folder {base!r}, which has no config.json"
        )
    _require_file("--base", base, "a .safetensors state dict or a Hugging Face model folder")
    if os.path.isdir(out):
        raise ValueError(f"--out must be a file path for a .safetensors --base, got the folder {out!r}")
    _check_output("--out", out, args.force, {"--base": base, "--adapter": adapter_path})
    adapter = _read_adapter("--adapter", adapter_path)
    try:
        tensors, metadata = read_state_dict(base)
    except ValueError as err:
        raise ValueError(f"--base must be a .safetensors state dict: {err}") from err
    merged = merge_state_dict(tensors, adapter, f"--base {base}", f"--adapter {adapter_path}", args.check_base, dtype)
    write_atomic(out, save_tensors(merged, metadata=metadata))
    dtypes = sorted({dtype_name(t.dtype) for t in merged.values() if t.is_floating_point()})
    print(f"merged {len(adapter.modules)} adapted modules of {adapter_path} into {base}; wrote {out} ({', '.join(dtypes)})")


def _cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """The floating-point base weights of an adapted ``model`` in ``dtype``; its adapters keep theirs."""
    with torch.no_grad():
        for _, param in base_named_parameters(model):
            if param.is_floating_point():
                param.data = param.data.to(dtype)


# --- PEFT -----------------------------------------------------------------------------------------


def run_export_peft(args: argparse.Namespace) -> None:
    """``lightning-lora export-peft ADAPTER OUT_DIR [--target peft|vllm] [--base-model-name-or-path NAME] [--task-type T]``."""
    adapter, out_dir = str(args.adapter), str(args.out_dir)
    _require_file("ADAPTER", adapter, f"an adapter file (*{SUFFIX})")
    if os.path.isfile(out_dir):
        raise ValueError(f"OUT_DIR must be a folder (created if needed), got the file {out_dir!r}")
    _check_output("OUT_DIR", out_dir, args.force, {"ADAPTER": adapter})
    _read_adapter("ADAPTER", adapter)  # a bad file is named as the argument it came from
    written = export_peft(
        adapter, out_dir, base_model_name_or_path=args.base_model_name_or_path, task_type=args.task_type,
        target=args.target, overwrite=True,  # --force was given for an existing OUT_DIR
    )
    print(f"wrote {args.target} adapter {written} ({PEFT_CONFIG}, {PEFT_WEIGHTS}) from {adapter}")


def run_import_peft(args: argparse.Namespace) -> None:
    """``lightning-lora import-peft PEFT_DIR OUT --base HF_DIR``."""
    peft_dir, out, base = str(args.peft_dir), str(args.out), str(args.base)
    for required in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not os.path.isfile(os.path.join(peft_dir, required)):
            found = f"a folder without {required}" if os.path.isdir(peft_dir) else ("a file" if os.path.exists(peft_dir) else "which does not exist")
            raise FileNotFoundError(f"PEFT_DIR must be a PEFT adapter folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}), got {peft_dir!r}, {found}")
    if os.path.isdir(out):
        raise ValueError(f"OUT must be the adapter file to write (*{SUFFIX}), got the folder {out!r}")
    _check_output("OUT", out, args.force, {"PEFT_DIR": peft_dir, "--base": base})
    if not _is_hf_folder(base):
        raise ValueError(f"--base must be a Hugging Face model folder (with config.json), got {base!r}{_what(base)}")
    with _transformers("--base", base) as transformers:
        model, _ = _hf_model(transformers, base, "--base")
        names = import_peft(model, peft_dir)
        save_adapter(model, out)
    print(f"imported {len(names)} adapted modules from {peft_dir} onto {base}; wrote {out}")


# --- check ----------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> None:
    """``lightning-lora check CKPT``."""
    ckpt = str(args.ckpt)
    if os.path.isdir(ckpt):
        if not os.path.isfile(os.path.join(ckpt, METADATA_FILE)):
            raise ValueError(
                f"CKPT must be a Lightning checkpoint (.ckpt, or a sharded checkpoint's folder), got {ckpt!r}, "
                f"a folder without {METADATA_FILE}"
            )
    else:
        _require_file("CKPT", ckpt, "a Lightning checkpoint (.ckpt)")
        if not _is_checkpoint(ckpt):
            what = "an adapter file" if ckpt.endswith(SUFFIX) else "a file that is not a zip archive (torch.save's format)"
            raise ValueError(
                f"CKPT must be a Lightning checkpoint (.ckpt), got {ckpt!r}, {what}; '{PROG} inspect' shows what a file holds"
            )
    try:
        verified = check_companion(ckpt)
    except ValueError as err:  # a corrupted file, a stale pair, a missing companion, a file that is no checkpoint
        raise ValueError(f"CKPT: {err}") from err
    files = "every file matches its digest" if verified else "its companion records no digests (an older version): bytes not verified"
    print(f"ok: {ckpt} and {adapter_path_for(ckpt)} belong together; {files}")


# --- helpers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _transformers(param: str, folder: str) -> Iterator[Any]:
    """transformers, imported, with its progress bars and info logging off for the duration."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as err:
        raise RuntimeError(
            f"{param} {folder!r} is a Hugging Face model folder, which needs transformers (pip install "
            f"'lightning-lora[hf]'); it cannot be imported: {err}"
        ) from err
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _hf_model(transformers: Any, folder: str, param: str) -> tuple[nn.Module, torch.dtype]:
    """The model of a Hugging Face folder, in float32 (every dtype's values exactly, for the fingerprint), built
    offline from its config's architecture, and the dtype its config says its weights are stored in."""
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        raise ValueError(
            f"{param} {folder!r}: its config.json must name the model class in \"architectures\" (e.g. "
            f"[\"LlamaForCausalLM\"]), got {architectures!r}"
        )
    cls = getattr(transformers, architectures[0], None)
    if cls is None or not callable(getattr(cls, "from_pretrained", None)):
        raise ValueError(
            f"{param} {folder!r}: its config.json names architecture {architectures[0]!r}, which transformers "
            f"{transformers.__version__} does not have"
        )
    major_minor = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    dtype_arg = "dtype" if major_minor >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    stored = getattr(config, dtype_arg, None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    model = cls.from_pretrained(folder, local_files_only=True, **{dtype_arg: torch.float32})
    if not isinstance(model, nn.Module):
        raise TypeError(f"{param} {folder!r}: {architectures[0]}.from_pretrained must return a torch module, got {type(model).__name__}")
    return model, stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def _read_adapter(param: str, path: str, expected: str = f"an adapter file (*{SUFFIX})") -> AdapterFile:
    """:func:`~lightning_lora.adapter_file.read_adapter`, its errors naming the parameter."""
    try:
        return read_adapter(path)
    except ValueError as err:
        raise ValueError(f"{param} must be {expected}: {err}") from err


def _is_checkpoint(path: str) -> bool:
    """Whether a local ``path`` is a zip archive, the format of ``torch.save`` (and of Lightning checkpoints)."""
    return "://" not in path and zipfile.is_zipfile(path)


def _is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _require_file(param: str, path: str, expected: str) -> None:
    """A local ``path`` must be an existing file (URLs are left to the reader)."""
    if "://" in path or os.path.isfile(path):
        return
    raise FileNotFoundError(f"{param} must be {expected}, got {path!r}{_what(path)}")


def _what(path: str) -> str:
    if not os.path.exists(path):
        return ", which does not exist"
    return ", a folder" if os.path.isdir(path) else ""


def _check_output(param: str, out: str, force: bool, inputs: dict[str, str]) -> None:
    """No input is ever an output (not the same path, not inside one, not holding one), and an existing
    output needs ``--force``."""
    if "://" in out:
        return
    for name, path in inputs.items():
        if overlaps(path, out):
            raise ValueError(f"{param} must be apart from {name} (an input is never an output), got {out!r} and {path!r}")
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not force:
        raise ValueError(f"{param} {out!r} exists; pass --force to replace it")


def _one_line(message: object) -> str:
    """``message`` on one line (tracebacks of wrapped errors and multi-line messages collapse)."""
    text = " ".join(str(message).split())
    return text or type(message).__name__


if __name__ == "__main__":
    sys.exit(main())

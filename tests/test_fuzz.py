"""Bounded, deterministic fuzzing of the adapter-file loader.

What this guarantees: for ``MUTATIONS`` corrupted or hand-edited variants of one real adapter file
(generated from ``random.Random(SEED)``, so every run checks the same files), ``load_adapter`` into a
fresh model with the right base weights does exactly one of two things:

(a) it raises ``ValueError`` (the documented error for a bad file) and leaves the model as it was:
    same module types, same ``state_dict`` values and dtypes, same ``requires_grad`` flags, no
    adapters and no LoRA bookkeeping; or
(b) it succeeds and the model's outputs on fixed tokens are bit-identical (``torch.equal``) to
    those of the model loaded from the original file (the mutation did not change the meaning of
    the file, e.g. whitespace in the header padding).

Any other exception (``KeyError``, ``TypeError``, ``OverflowError``, ``RecursionError``,
``MemoryError``, ``SafetensorError``, a Rust panic ...) or a load that silently changes the outputs
is a failure; every failure is collected and reported with its mutation kind and offset.

The mutations are spread over three regions:

* ``header``: bit flips, byte replacements, deletions and insertions inside the JSON header (the
  length prefix kept, or fixed up for deletions and insertions), and structured edits of the parsed
  header that are re-serialised with a correct length prefix: config values, swapped tensor names,
  dtypes, shapes, data offsets, module specs (``r=10**9`` ...), module names, ``trainable``,
  ``base_dtypes``, the format fields, non-string and deeply nested metadata values, removed keys,
  extra and duplicate entries. A structured edit either keeps the stale ``sha256`` (a corrupted
  file: it must be rejected) or is re-signed with a correct digest (a file written by a buggy or
  foreign writer: the checks behind the checksum must reject it, or it must mean the same thing).
  Re-signed edits are chosen so that a correct loader can never legitimately change the outputs
  (no valid-but-different settings such as another alpha of a module).
* ``data``: bit flips, byte replacements, deletions, insertions and truncation in the tensor data.
* ``file``: truncation at random points, appended and prepended bytes, changed length prefixes.

The first mutations are fixed corner cases (``CORNER_CASES``: the edits this test was written to
cover, such as F32 -> I32, ``r=10**9``, a non-finite ``format_version``); the rest are drawn at
random, structured edits dealt from a shuffled deck so that each kind is drawn about equally often.

The test also checks that the run was not vacuous: at least ``MIN_REJECTED`` mutations raised
``ValueError``, every region and every mutation kind was exercised, and re-signing an unchanged
header reproduces the stored digest (so re-signed edits really get past the checksum).
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from conftest import TinyModel, randomize_adapters

from lightning_lora import LoRAConfig, apply_lora, load_adapter, lora_modules, save_adapter

SEED = 0
MUTATIONS = 500
#: The run must reject at least this many mutated files with ValueError, else it proves little.
MIN_REJECTED = 400
#: Every mutation kind must be drawn at least this often.
MIN_PER_KIND = 3
#: Share of structured header edits that are re-signed with a correct sha256.
RESIGN_SHARE = 0.75
#: Relative weights of the header, tensor data and whole-file regions.
REGION_WEIGHTS = [50, 20, 30]
#: Share of header mutations that are structured edits (the rest are byte-level).
STRUCTURED_SHARE = 0.6
CONFIG = LoRAConfig(r=4, alpha=8, targets=["qkv", "fc1", "embed"], trainable=["head"], rank_pattern={"fc1": 2})
DIGEST_KEY = "sha256"
#: Structured edits kept out of the random loop because running them would crash the machine (a
#: giant allocation, say). Each entry is (edit name, reason); the loop never draws these edits.
#: Empty: every edit below is bounded, since the loader refuses ranks above a layer's size.
KNOWN_FAILURES: list[tuple[str, str]] = []

# Bytes that matter in JSON, plus a few that do not.
INTERESTING_BYTES = b'"{}[],:\\ \t\n0123456789-+.eEtfnu\x00\x7f\x80\xff'
JUNK = [None, True, False, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, 10**9, 10**30, -(10**30)]
NON_STRING_JSON = [
    "2", "2.5", "-1", "true", "false", "null", "[]", "{}", '["head"]', '{"a": "b"}', "Infinity",
    "-Infinity", "NaN", "1e400", "-1e400", "1e308", "18446744073709551616", "[[[[[[[[[[1]]]]]]]]]]",
    "9" * 5000,
]


class Raw:
    """JSON text put verbatim into a serialised header (NaN literals, nesting, huge numbers)."""

    def __init__(self, text: str) -> None:
        self.text = text


# --- reading and writing headers ---------------------------------------------------------------


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _assemble(header_text: bytes, tensor_data: bytes) -> bytes:
    return len(header_text).to_bytes(8, "little") + header_text + tensor_data


def _digest(header: dict, tensor_data: bytes) -> str:
    """The documented digest: canonical JSON of the header without the digest, then the tensor data."""
    meta = header.get("__metadata__")
    meta = {k: v for k, v in meta.items() if k != DIGEST_KEY} if isinstance(meta, dict) else meta
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode())
    digest.update(tensor_data)
    return digest.hexdigest()


def _dump(header: dict) -> str:
    raws: list[str] = []

    def default(value):
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@RAW{len(raws) - 1}@@"
        raise TypeError(type(value).__name__)

    text = json.dumps(header, separators=(",", ":"), default=default)
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{index}@@"', raw, 1)
    return text


def _serialise(header: dict, tensor_data: bytes, resign: bool, post=None) -> bytes:
    """The header as JSON (with a correct length prefix, padded to 8 bytes like safetensors)."""
    meta = header.get("__metadata__")
    placeholder = resign and isinstance(meta, dict) and DIGEST_KEY in meta
    if placeholder:
        meta[DIGEST_KEY] = "@@DIGEST@@"
    text = _dump(header)
    if post is not None:
        text = post(text)
    if placeholder:
        try:  # the digest the loader computes: over the header as Python's json reads it
            digest = _digest(json.loads(text), tensor_data)
        except (ValueError, RecursionError):
            digest = "0" * 64  # a header Python cannot read cannot be re-signed
        text = text.replace("@@DIGEST@@", digest)
    encoded = text.encode("utf-8", "surrogatepass")
    encoded += b" " * (-len(encoded) % 8)
    return _assemble(encoded, tensor_data)


# --- structured header edits: each changes ``header`` in place and returns a description ---------


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _meta_json(header: dict, key: str):
    return json.loads(header["__metadata__"][key])


def _set_meta_json(header: dict, key: str, value) -> None:
    header["__metadata__"][key] = json.dumps(value)


def edit_config(header, rng, resign):
    config = _meta_json(header, "config")
    choice = rng.randrange(5)
    if choice == 0:
        value = rng.choice([16, 0.5, 8.0, 0, -8, 1e308, "8", None, True, [8], 10**9])
        config["alpha"] = value
        detail = f"config alpha={value!r}"
    elif choice == 1:
        field = rng.choice(sorted(config))
        value = rng.choice(JUNK)
        config[field] = value
        detail = f"config {field}={value!r}"
    elif choice == 2:
        config["r"] = value = rng.choice([10**9, 10**18, 0, 3])
        detail = f"config r={value!r}"
    elif choice == 3:
        field = rng.choice(sorted(config))
        del config[field]
        detail = f"config without {field}"
    else:
        config["unknown_field"] = 1
        detail = "config with an unknown field"
    _set_meta_json(header, "config", config)
    return detail


def edit_swap_tensor_names(header, rng, resign):
    names = _tensor_names(header)
    shape = {name: header[name]["shape"] for name in names}
    while True:
        a, b = rng.sample(names, 2)
        # a re-signed swap of equal shapes is a valid (different) file: only swap other shapes then
        if not resign or shape[a] != shape[b]:
            break
    header[a], header[b] = header[b], header[a]
    return f"swap tensors {a} <-> {b}"


def edit_dtype(header, rng, resign):
    name = rng.choice(_tensor_names(header))
    value = rng.choice(["I32", "I32", "U32", "F16", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "f32", "", 32])
    header[name]["dtype"] = value
    return f"dtype of {name} -> {value!r}"


def edit_shape(header, rng, resign):
    name = rng.choice(_tensor_names(header))
    shape = header[name]["shape"]
    numel = 1
    for dim in shape:
        numel *= dim
    value = rng.choice(
        [
            list(reversed(shape)),
            [numel],
            shape + [1],
            [shape[0] * 2] + shape[1:],
            [],
            [-1],
            [0],
            [2**62, 0],
            [2**32, 2**32],
            [2**63, 2, 0],
            [numel, 1.5],
            "16",
        ]
    )
    header[name]["shape"] = value
    return f"shape of {name} {shape} -> {value!r}"


def edit_data_offsets(header, rng, resign):
    names = _tensor_names(header)
    name = rng.choice(names)
    start, end = header[name]["data_offsets"]
    if not resign and rng.random() < 0.3:
        size = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names}
        same = [n for n in names if n != name and size[n] == size[name]]
        if same:
            other = rng.choice(same)
            header[name]["data_offsets"], header[other]["data_offsets"] = (
                header[other]["data_offsets"],
                header[name]["data_offsets"],
            )
            return f"data_offsets of {name} <-> {other}"
    value = rng.choice(
        [
            [start, end + 1],
            [start + 1, end],
            [end, start],
            [start, start],
            [0, end],
            [-1, end],
            [start, 2**64],
            [start, 2**63],
            [start, 2**32 + end],
            [start],
            [start, end, 0],
            [str(start), end],
            None,
        ]
    )
    header[name]["data_offsets"] = value
    return f"data_offsets of {name} [{start}, {end}] -> {value!r}"


def edit_module_r(header, rng, resign):
    modules = _meta_json(header, "modules")
    name = rng.choice(sorted(modules))
    value = rng.choice([10**9, 10**9, 10**18, 2**63, 10**100, 0, -4, 1, 3, 32, 2.0, "4", True, None, Raw("1e400")])
    modules[name]["r"] = value
    header["__metadata__"]["modules"] = _dump(modules)
    return f"modules[{name}].r -> {value.text if isinstance(value, Raw) else value!r}"


def edit_module_field(header, rng, resign):
    modules = _meta_json(header, "modules")
    name = rng.choice(sorted(modules))
    spec = modules[name]
    field = rng.choice(["kind", "bias", "dropout", "use_rslora", "adapter_dtype", "alpha", "remove", "extra", "shapes"])
    if field == "remove":
        removed = rng.choice(sorted(spec))
        del spec[removed]
        detail = f"modules[{name}] without {removed}"
    elif field == "extra":
        spec["unknown_field"] = [1, 2]
        detail = f"modules[{name}] with an unknown field"
    elif field == "shapes":
        key = rng.choice(sorted(spec["shapes"]))
        spec["shapes"][key] = value = rng.choice([[1], [], [10**9, 10**9], "x", None])
        detail = f"modules[{name}].shapes[{key}] -> {value!r}"
    else:
        choices = {
            "kind": [k for k in ("linear", "conv", "embedding") if k != spec["kind"]] + ["LINEAR", "", None, 1],
            "bias": [not spec["bias"], None, 1, "true"],
            "dropout": [0.5, 1.0, -0.1, 2, "0", None, Raw("NaN"), Raw("Infinity")],
            "use_rslora": ["yes", 1, None, [False]],
            "adapter_dtype": ["float16", "bfloat16", "float64", "int8", "float", "", None],
            "alpha": [0, -1, None, "8", True, Raw("NaN"), Raw("Infinity"), Raw("1e400")],  # invalid only
        }[field]
        value = rng.choice(choices)
        spec[field] = value
        detail = f"modules[{name}].{field} -> {value.text if isinstance(value, Raw) else value!r}"
    header["__metadata__"]["modules"] = _dump(modules)
    return detail


def edit_module_names(header, rng, resign):
    modules = _meta_json(header, "modules")
    names = sorted(modules)
    choice = rng.randrange(4)
    if choice == 0:
        name = rng.choice(names)
        new = rng.choice(
            ["", "nope", "blocks", "blocks.0", "blocks.0.norm", "blocks.0.attn.proj", "head", "embed.weight",
             "blocks.9.attn.qkv", name + " ", name.upper(), "blocks.0.attn.qkv.original_module"]
        )
        modules[new] = modules.pop(name)
        detail = f"module {name} renamed {new!r}"
    elif choice == 1:
        name = rng.choice(names)
        del modules[name]
        detail = f"module {name} removed"
    elif choice == 2:
        modules["blocks.0.attn.proj"] = dict(modules[rng.choice(names)])
        detail = "module blocks.0.attn.proj added"
    else:
        header["__metadata__"]["modules"] = value = rng.choice(["[]", "null", '"x"', "{", '{"head": 1}', "1e400"])
        return f"modules -> {value!r}"
    header["__metadata__"]["modules"] = _dump(modules)
    return detail


def edit_trainable(header, rng, resign):
    value = rng.choice(
        [[], ["nope"], "head", ["head", "head"], [["head"]], ["blocks.0.attn.qkv"], [1], None, {"head": 1},
         ["head", "embed"], ["blocks.0.norm"], ["head", ""], ["head", "blocks"]]
    )
    _set_meta_json(header, "trainable", value)
    return f"trainable -> {value!r}"


def edit_base_dtypes(header, rng, resign):
    value = rng.choice(
        [{"": "int32"}, {"": 5}, [], "float32", {"": "float16"}, {"head.weight": "bfloat16"}, {"": None},
         {"": "float32", "embed.weight": "float64"}, {"": ["float32"]}]
    )
    _set_meta_json(header, "base_dtypes", value)
    return f"base_dtypes -> {value!r}"


def edit_format(header, rng, resign):
    meta = header["__metadata__"]
    if rng.random() < 0.3:
        meta["format"] = value = rng.choice(["", "lightning_lora.adapterX", "LIGHTNING_LORA.ADAPTER", "safetensors"])
        return f"format -> {value!r}"
    meta["format_version"] = value = rng.choice(
        ["1", "3", "0", "-1", "2.0", " 2", "٢", "9" * 5000, "", "0x2", "1e400", "inf", "nan", "99999999999999999999"]
    )
    return f"format_version -> {value[:20]!r}"


def edit_base_fingerprint(header, rng, resign):
    meta = header["__metadata__"]
    old = meta["base_fingerprint"]
    meta["base_fingerprint"] = value = rng.choice(["", "0" * 64, old[:-1] + ("0" if old[-1] != "0" else "1"), old.upper()])
    return f"base_fingerprint -> {value[:16]!r}"


def edit_meta_non_string(header, rng, resign):
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta) + ["format_version", "format_version"])
    text = rng.choice(NON_STRING_JSON)
    meta[key] = Raw(text)
    return f"metadata {key} -> non-string {text[:40]}"


def edit_deep_nesting(header, rng, resign):
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta))
    depth = rng.choice([64, 200, 1_000, 50_000])
    nested = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
    if rng.random() < 0.5:
        meta[key] = nested  # a string holding deeply nested JSON
        return f"metadata {key} -> string of JSON nested {depth} deep"
    meta[key] = Raw(nested)
    return f"metadata {key} -> JSON nested {depth} deep"


def edit_remove_key(header, rng, resign):
    meta = header["__metadata__"]
    choice = rng.randrange(4)
    if choice == 0:
        del header["__metadata__"]
        return "no __metadata__"
    if choice == 1:
        key = rng.choice(sorted(meta))
        del meta[key]
        return f"metadata without {key}"
    name = rng.choice(_tensor_names(header))
    if choice == 2:
        del header[name]
        return f"no tensor entry {name}"
    field = rng.choice(sorted(header[name]))
    del header[name][field]
    return f"tensor {name} without {field}"


def edit_extra_entry(header, rng, resign):
    end = max(header[name]["data_offsets"][1] for name in _tensor_names(header))
    shape = rng.choice([[0], [2**62, 0], [2**40, 2**40, 0], [0, 2**63], [2**63, 2, 0]])
    name = rng.choice(["extra", "blocks.0.attn.qkv.matrix_C.weight", "__metadata__x", ""])
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}
    return f"extra tensor {name!r} of shape {shape}"


def edit_duplicate_entry(header, rng, resign):
    name = rng.choice(_tensor_names(header))
    altered = dict(header[name])
    altered[rng.choice(["dtype", "shape"])] = rng.choice(["I32", [1]]) if rng.random() < 0.5 else "F16"
    entry = f"{json.dumps(name)}:{json.dumps(altered)},"
    if rng.random() < 0.5:
        return f"duplicate entry {name} before the real one", lambda text: "{" + entry + text[1:]
    key = "__metadata__"
    if rng.random() < 0.5:
        meta = dict(header[key])
        meta["format_version"] = "3"
        entry = f"{json.dumps(key)}:{json.dumps(meta)},"
        return "duplicate __metadata__ (format_version 3) before the real one", lambda text: "{" + entry + text[1:]
    return f"duplicate entry {name} after the real one", lambda text: text[:-1] + "," + entry[:-1] + "}"


STRUCTURED_EDITS = [
    edit_config,
    edit_swap_tensor_names,
    edit_dtype,
    edit_shape,
    edit_data_offsets,
    edit_module_r,
    edit_module_field,
    edit_module_names,
    edit_trainable,
    edit_base_dtypes,
    edit_format,
    edit_base_fingerprint,
    edit_meta_non_string,
    edit_deep_nesting,
    edit_remove_key,
    edit_extra_entry,
    edit_duplicate_entry,
]
RANDOM_EDITS = [edit for edit in STRUCTURED_EDITS if edit.__name__ not in {name for name, _ in KNOWN_FAILURES}]


# --- corner cases: the edits named in the test's brief, each run once before the random ones -----


def _first(header: dict, suffix: str) -> str:
    return next(name for name in _tensor_names(header) if name.endswith(suffix))


def corner_config_alpha(header, rng, resign):
    config = _meta_json(header, "config")
    config["alpha"] = 16
    _set_meta_json(header, "config", config)
    return "config alpha 8 -> 16"


def corner_dtype_i32(header, rng, resign):
    name = _first(header, "matrix_B.weight")
    header[name]["dtype"] = "I32"
    return f"dtype of {name} F32 -> I32"


def corner_dtype_f16(header, rng, resign):
    name = _first(header, "matrix_B.weight")
    header[name]["dtype"] = "F16"
    return f"dtype of {name} F32 -> F16"


def corner_swap_names(header, rng, resign):
    a, b = _first(header, "qkv.matrix_A.weight"), _first(header, "fc1.matrix_A.weight")
    header[a], header[b] = header[b], header[a]
    return f"swap tensors {a} <-> {b}"


def corner_shape_transposed(header, rng, resign):
    name = _first(header, "matrix_A.weight")
    header[name]["shape"] = list(reversed(header[name]["shape"]))
    return f"shape of {name} transposed"


def corner_data_offsets(header, rng, resign):
    name = _first(header, "matrix_A.weight")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 4]
    return f"data_offsets of {name} end + 4"


def corner_module_r_huge(header, rng, resign):
    modules = _meta_json(header, "modules")
    name = next(n for n in modules if n.endswith("qkv"))
    modules[name]["r"] = 10**9
    _set_meta_json(header, "modules", modules)
    return f"modules[{name}].r -> 10**9"


def corner_module_adapter_dtype(header, rng, resign):
    modules = _meta_json(header, "modules")
    name = next(n for n in modules if n.endswith("qkv"))
    modules[name]["adapter_dtype"] = "float16"
    _set_meta_json(header, "modules", modules)
    return f"modules[{name}].adapter_dtype float32 -> float16 (tensors stay F32)"


def corner_format_version_infinity(header, rng, resign):
    header["__metadata__"]["format_version"] = Raw("Infinity")
    return "metadata format_version -> non-string Infinity"


def corner_format_version_1e400(header, rng, resign):
    header["__metadata__"]["format_version"] = Raw("1e400")
    return "metadata format_version -> non-string 1e400"


def corner_config_deeply_nested(header, rng, resign):
    header["__metadata__"]["config"] = "[" * 100_000 + "]" * 100_000
    return "metadata config -> string of JSON nested 100000 deep"


def corner_metadata_deeply_nested(header, rng, resign):
    header["__metadata__"]["trainable"] = Raw("[" * 100_000 + "]" * 100_000)
    return "metadata trainable -> JSON nested 100000 deep"


def corner_remove_modules(header, rng, resign):
    del header["__metadata__"]["modules"]
    return "metadata without modules"


def corner_empty_tensor_huge_dim(header, rng, resign):
    end = max(header[name]["data_offsets"][1] for name in _tensor_names(header))
    header["extra"] = {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [end, end]}
    return "extra tensor 'extra' of shape [0, 2**63] (no bytes)"


def corner_trainable_string(header, rng, resign):
    _set_meta_json(header, "trainable", "head")
    return "trainable -> 'head' (a string, not a list)"


#: (edit, re-signed): run once each, first (less those in KNOWN_FAILURES).
CORNER_CASES = [
    (corner_config_alpha, True),
    (corner_dtype_i32, True),
    (corner_dtype_i32, False),
    (corner_dtype_f16, True),
    (corner_swap_names, True),
    (corner_swap_names, False),
    (corner_shape_transposed, True),
    (corner_data_offsets, True),
    (corner_module_r_huge, True),
    (corner_module_adapter_dtype, True),
    (corner_format_version_infinity, False),
    (corner_format_version_1e400, True),
    (corner_config_deeply_nested, True),
    (corner_metadata_deeply_nested, False),
    (corner_remove_modules, True),
    (corner_empty_tensor_huge_dim, False),
    (corner_empty_tensor_huge_dim, True),
    (corner_trainable_string, True),
]
CORNER_CASES = [(edit, resign) for edit, resign in CORNER_CASES if edit.__name__ not in {name for name, _ in KNOWN_FAILURES}]


# --- byte-level mutations -------------------------------------------------------------------------


def _byte(rng) -> int:
    return rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)


def _bytes(rng) -> bytes:
    return bytes(_byte(rng) for _ in range(rng.randint(1, 8)))


def _raw(data: bytes, kind: str, start: int, end: int, rng) -> tuple[bytes, int, str]:
    """A bit flip, byte replacement, deletion, insertion or truncation at an offset in [start, end)."""
    offset = rng.randrange(start, end)
    if kind == "bitflip":
        bit = rng.randrange(8)
        return data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1 :], offset, f"bit {bit}"
    if kind == "replace":
        value = _byte(rng)
        return data[:offset] + bytes([value]) + data[offset + 1 :], offset, f"byte {value:#04x}"
    if kind == "delete":
        count = rng.randint(1, min(16, end - offset))
        return data[:offset] + data[offset + count :], offset, f"{count} bytes deleted"
    if kind == "insert":
        inserted = _bytes(rng)
        return data[:offset] + inserted + data[offset:], offset, f"{inserted!r} inserted"
    if kind == "truncate":
        return data[:offset], offset, f"truncated to {offset} bytes"
    raise AssertionError(kind)


def _structured(original: bytes, edit, rng, resign: bool) -> tuple[str, str, int, str, bytes]:
    """A structured edit of the parsed header, re-serialised with a correct length prefix."""
    header, tensor_data = _split(original)
    stored_digest = header["__metadata__"][DIGEST_KEY]
    result = edit(header, rng, resign)
    detail, post = result if isinstance(result, tuple) else (result, None)
    meta = header.get("__metadata__")
    if edit is edit_duplicate_entry or (isinstance(meta, dict) and meta.get(DIGEST_KEY, stored_digest) is not stored_digest):
        resign = False  # the point is whether the stale digest still matches, or the edit changed the digest
    data = _serialise(header, tensor_data, resign, post)
    detail += ", re-signed" if resign else ", stale sha256"
    return "header", edit.__name__, 8, detail, data


def _bytewise(original: bytes, region: str, rng) -> tuple[str, str, int, str, bytes]:
    """A byte-level mutation in ``region``: (region, kind, offset, detail, mutated bytes)."""
    length = int.from_bytes(original[:8], "little")
    header_end = 8 + length
    if region == "header":
        kind = rng.choice(["bitflip", "replace", "delete", "insert"])
        data, offset, detail = _raw(original, kind, 8, header_end, rng)
        if kind in ("delete", "insert") and rng.random() < 0.5:
            new_length = length + len(data) - len(original)
            data = new_length.to_bytes(8, "little") + data[8:]
            detail += ", length prefix fixed"
        return region, kind, offset, detail, data
    if region == "data":
        kind = rng.choice(["bitflip", "replace", "delete", "insert", "truncate"])
        data, offset, detail = _raw(original, kind, header_end, len(original), rng)
        return region, kind, offset, detail, data
    kind = rng.choice(["truncate", "append", "prepend", "length_prefix", "prefix_bitflip"])
    if kind == "truncate":
        offset = rng.randrange(0, len(original))
        return region, kind, offset, f"truncated to {offset} bytes", original[:offset]
    if kind == "append":
        extra = _bytes(rng) if rng.random() < 0.7 else bytes(rng.randint(1, 4096))
        return region, kind, len(original), f"{len(extra)} bytes appended", original + extra
    if kind == "prepend":
        extra = _bytes(rng)
        return region, kind, 0, f"{extra!r} prepended", extra + original
    if kind == "prefix_bitflip":
        data, offset, detail = _raw(original, "bitflip", 0, 8, rng)
        return region, kind, offset, detail, data
    value = rng.choice(
        [
            0,
            1,
            length - rng.randint(1, 64),
            length + rng.randint(1, 64),
            rng.randrange(0, 2 * length),
            len(original),
            len(original) - 8,
            2**63,
            2**64 - 1,
            rng.randrange(2**64),
        ]
    )
    value = max(value, 0)
    return region, kind, 0, f"length prefix {length} -> {value}", value.to_bytes(8, "little") + original[8:]


def _mutations(original: bytes):
    """The ``MUTATIONS`` mutated files: the corner cases, then random mutations from ``SEED``.

    Structured edits are dealt from a shuffled deck, so every edit kind is drawn about equally often.
    """
    rng = random.Random(SEED)
    for edit, resign in CORNER_CASES:
        yield _structured(original, edit, rng, resign)
    deck: list = []
    for _ in range(MUTATIONS - len(CORNER_CASES)):
        region = rng.choices(["header", "data", "file"], weights=REGION_WEIGHTS)[0]
        if region == "header" and rng.random() < STRUCTURED_SHARE:
            if not deck:
                deck = list(RANDOM_EDITS)
                rng.shuffle(deck)
            yield _structured(original, deck.pop(), rng, rng.random() < RESIGN_SHARE)
        else:
            yield _bytewise(original, region, rng)


# --- the model ------------------------------------------------------------------------------------


def _fresh(base_state: dict) -> TinyModel:
    model = TinyModel()
    model.load_state_dict(base_state)
    return model


def _snapshot(model: torch.nn.Module):
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {key: value.detach().clone() for key, value in model.state_dict().items()},
        {name: param.requires_grad for name, param in model.named_parameters()},
        sorted(key for key in vars(model) if key.startswith("_lora")),
        model.training,
    )


def _same_snapshot(a, b) -> bool:
    modules_a, state_a, grads_a, attrs_a, training_a = a
    modules_b, state_b, grads_b, attrs_b, training_b = b
    return (
        modules_a == modules_b
        and state_a.keys() == state_b.keys()
        and all(state_a[k].dtype == state_b[k].dtype and torch.equal(state_a[k], state_b[k]) for k in state_a)
        and grads_a == grads_b
        and attrs_a == attrs_b
        and training_a == training_b
    )


@torch.no_grad()
def _outputs(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(tokens)


@pytest.fixture
def adapter_file(tmp_path):
    """(base state, saved file bytes, reference outputs of a fresh model loaded from that file, tokens)."""
    torch.manual_seed(SEED)
    base_state = TinyModel().state_dict()
    model = _fresh(base_state)
    apply_lora(model, CONFIG)
    randomize_adapters(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    path = tmp_path / "original.lora.safetensors"
    save_adapter(model, path)
    tokens = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(SEED))
    reference = _fresh(base_state)
    load_adapter(reference, path)
    expected = _outputs(reference, tokens)
    assert torch.equal(expected, _outputs(model, tokens))
    assert not torch.equal(expected, _outputs(_fresh(base_state), tokens))  # the adapters do something
    return base_state, path.read_bytes(), expected, tokens


def test_resigning_reproduces_the_stored_digest(adapter_file):
    """The test's re-signing must match the library's digest, or re-signed edits test only the checksum."""
    _, original, _, _ = adapter_file
    header, tensor_data = _split(original)
    assert header["__metadata__"][DIGEST_KEY] == _digest(header, tensor_data)


def test_missing_file_raises_file_not_found(adapter_file, tmp_path):
    base_state = adapter_file[0]
    model = _fresh(base_state)
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError):
        load_adapter(model, tmp_path / "missing.lora.safetensors")
    assert _same_snapshot(before, _snapshot(model))


def test_every_mutated_file_is_rejected_or_means_the_same(adapter_file, tmp_path):
    base_state, original, expected, tokens = adapter_file
    path = tmp_path / "mutated.lora.safetensors"
    failures: list[str] = []
    rejected = accepted = unchanged = 0
    per_region: dict[str, int] = {}
    per_kind: dict[str, int] = {}
    mutations = list(_mutations(original))
    assert len(mutations) == MUTATIONS
    for index, (region, kind, offset, detail, data) in enumerate(mutations):
        per_region[region] = per_region.get(region, 0) + 1
        per_kind[kind] = per_kind.get(kind, 0) + 1
        where = f"#{index} {region}/{kind} at offset {offset} ({detail[:160]})"
        if data == original:
            unchanged += 1  # e.g. a byte replaced by itself
            continue
        path.write_bytes(data)
        model = _fresh(base_state)
        before = _snapshot(model)
        try:
            load_adapter(model, path)
        except ValueError:
            rejected += 1
            if lora_modules(model) or not _same_snapshot(before, _snapshot(model)):
                failures.append(f"{where}: ValueError raised but the model was changed")
        except BaseException as err:  # noqa: BLE001 - Rust panics (pyo3 PanicException) derive from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            message = " ".join(str(err).split())[:200]
            failures.append(f"{where}: {type(err).__module__}.{type(err).__name__}: {message}")
        else:
            accepted += 1
            if not torch.equal(_outputs(model, tokens), expected):
                failures.append(f"{where}: loaded without error but the outputs changed")
    summary = f"{rejected} rejected, {accepted} accepted, {unchanged} unchanged; regions {per_region}; kinds {per_kind}"
    assert not failures, f"{len(failures)} of {MUTATIONS} mutations broke the loader ({summary}):\n" + "\n".join(failures)
    assert rejected >= MIN_REJECTED, f"too few mutations were rejected, the run proves little: {summary}"
    assert set(per_region) == {"header", "data", "file"}, summary
    random_kinds = {edit.__name__ for edit in RANDOM_EDITS} | {
        "bitflip", "replace", "delete", "insert", "truncate", "append", "prepend", "length_prefix", "prefix_bitflip"
    }
    too_rare = sorted(kind for kind in random_kinds if per_kind.get(kind, 0) < MIN_PER_KIND)
    assert not too_rare, f"mutation kinds drawn fewer than {MIN_PER_KIND} times: {too_rare} ({summary})"

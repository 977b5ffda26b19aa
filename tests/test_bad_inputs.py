"""The bad-input matrix: every bad input gets one clear error and changes nothing.

Each case names the input, the error type and a fragment of its message. The test runs it, checks
the error, and checks that the model (module types, tensors, flags, modes) and every file in the
working folder are exactly as before. ``docs/reliability.md`` lists the same cases; regenerate its
table with ``python tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TinyModel, randomize_adapters  # noqa: E402
from lightning_models import Classifier, data  # noqa: E402

from lightning_lora import LoRA, LoRACallback, LoRAConfig, apply_lora, load_adapter, load_checkpoint, merge_and_unload, merge_lora, save_adapter, unmerge_lora
from lightning_lora.lightning import check_companion, write_companion
from lightning_lora.lightning.checkpoint import restore_checkpoint  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
CONFIG = LoRAConfig(r=4, alpha=8, targets=["qkv", "fc1"], trainable=["head"])


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    input: str  # what the user did, as they would write it
    error: type[BaseException]
    message: str  # a regular expression the message must match
    run: Callable[[Any], object]  # takes the Workspace


class Workspace:
    """Fresh objects for one case: a plain and an adapted model, an adapter file, a slim checkpoint."""

    def __init__(self, root: Path, lightning: tuple[Path, dict] | None) -> None:
        torch.manual_seed(0)
        self.root = root
        self.plain = TinyModel()
        self.base_state = {k: v.clone() for k, v in self.plain.state_dict().items()}
        self.adapted = TinyModel()
        self.adapted.load_state_dict(self.base_state)
        apply_lora(self.adapted, CONFIG)
        randomize_adapters(self.adapted)
        self.adapter = root / "run.lora.safetensors"
        save_adapter(self.adapted, self.adapter)
        self.lightning = lightning  # (folder with last.ckpt, base state of the Classifier) when needed

    def fresh(self) -> TinyModel:
        model = TinyModel()
        model.load_state_dict(self.base_state)
        return model

    def edited_adapter(self, edit: Callable[[dict], None], name: str) -> Path:
        """A copy of the adapter file whose header JSON was changed by ``edit`` (not re-signed)."""
        data = self.adapter.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        edit(header)
        encoded = json.dumps(header).encode()
        path = self.root / name
        path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])
        self.snapshot()
        return path

    def classifier(self) -> Classifier:
        assert self.lightning is not None
        model = Classifier()
        model.load_state_dict(self.lightning[1])
        return model


def _trainer(root: Path, *callbacks: Any, **kwargs: Any) -> L.Trainer:
    settings = {"max_epochs": 1, "default_root_dir": root, "enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    return L.Trainer(callbacks=list(callbacks), **{**settings, **kwargs})


def _other_alpha(ws: Workspace) -> None:
    model = ws.fresh()
    apply_lora(model, LoRAConfig(**{**CONFIG.to_dict(), "alpha": 2}))
    ws.plain = model
    load_adapter(model, ws.adapter)


CASES: list[Case] = []


def case(id: str, area: str, input: str, error: type[BaseException], message: str) -> Callable:
    def register(run: Callable[[Any], object]) -> Callable:
        CASES.append(Case(id, area, input, error, message, run))
        return run

    return register


# --- config ---------------------------------------------------------------------------------------
for _id, _kwargs, _error, _message in [
    ("config-r-zero", {"r": 0}, ValueError, r"r must be a positive integer, got 0"),
    ("config-r-string", {"r": "8"}, TypeError, r"r must be a positive integer, got '8' \(str\)"),
    ("config-r-float", {"r": 2.5}, TypeError, r"r must be a positive integer, got 2.5 \(float\)"),
    ("config-r-bool", {"r": True}, TypeError, r"r must be a positive integer, got True \(bool\)"),
    ("config-alpha-zero", {"alpha": 0}, ValueError, r"alpha must be a positive finite number, got 0"),
    ("config-alpha-nan", {"alpha": float("nan")}, ValueError, r"alpha must be a positive finite number, got nan"),
    ("config-alpha-inf", {"alpha": float("inf")}, ValueError, r"alpha must be a positive finite number, got inf"),
    ("config-bias-string", {"bias": "yes"}, TypeError, r"bias must be True, False or 'auto', got 'yes'"),
    ("config-targets-string", {"targets": "qkv"}, TypeError, r"targets must be a list of module name patterns, got 'qkv'"),
    ("config-targets-empty", {"targets": []}, ValueError, r"targets must name at least one module pattern, got an empty list"),
    ("config-targets-repeated", {"targets": ["qkv", "qkv"]}, ValueError, r"targets must not repeat a pattern"),
    ("config-targets-empty-name", {"targets": [""]}, TypeError, r"targets must hold non-empty strings, got ''"),
    ("config-exclude-none", {"exclude": [None]}, TypeError, r"exclude must hold non-empty strings, got None"),
    ("config-dropout-negative", {"dropout": -0.1}, ValueError, r"dropout must be a number in \[0, 1\), got -0.1"),
    ("config-dropout-one", {"dropout": 1}, ValueError, r"dropout must be a number in \[0, 1\), got 1"),
    ("config-rank-pattern-zero", {"rank_pattern": {"qkv": 0}}, ValueError, r"rank_pattern\['qkv'\] must be a positive integer, got 0"),
    ("config-rank-pattern-list", {"rank_pattern": ["qkv"]}, TypeError, r"rank_pattern must be a mapping from module pattern to value"),
    ("config-alpha-pattern-negative", {"alpha_pattern": {"qkv": -1}}, ValueError, r"alpha_pattern\['qkv'\] must be a positive finite number"),
    ("config-alpha-pattern-key", {"alpha_pattern": {3: 1.0}}, TypeError, r"alpha_pattern keys must be non-empty strings, got 3"),
    ("config-rslora-string", {"use_rslora": "no"}, TypeError, r"use_rslora must be True or False, got 'no'"),
    ("config-dora-string", {"use_dora": "yes"}, TypeError, r"use_dora must be True or False, got 'yes'"),
    ("config-dora-bias", {"use_dora": True, "bias": True}, ValueError, r"use_dora=True needs bias=False or 'auto': DoRA's update has no bias"),
    ("config-trainable-string", {"trainable": "head"}, TypeError, r"trainable must be a list of module name patterns, got 'head'"),
    ("config-dtype-unknown", {"adapter_dtype": "fp8"}, ValueError, r"adapter_dtype must be None or one of .* got 'fp8'"),
    ("config-quantize-unknown", {"quantize": "int4"}, ValueError, r"quantize must be None or one of \['nf4'\], got 'int4'"),
    ("config-dora-quantize", {"use_dora": True, "quantize": "nf4"}, ValueError, r"use_dora=True cannot be combined with quantize='nf4': DoRA's weight norm needs the base weights in floating point"),
    ("config-targets-bad-regex", {"targets": ["re:(["]}, ValueError, r"targets pattern 're:\(\[' is not a valid regular expression"),
    ("config-exclude-bad-regex", {"exclude": ["re:)"]}, ValueError, r"exclude pattern 're:\)' is not a valid regular expression"),
    ("config-rank-pattern-bad-regex", {"rank_pattern": {"re:[": 2}}, ValueError, r"rank_pattern pattern 're:\[' is not a valid regular expression"),
]:
    case(_id, "config", f"LoRAConfig(**{_kwargs!r})", _error, _message)(lambda ws, kwargs=_kwargs: LoRAConfig(**kwargs))

case("config-from-dict-unknown", "config", "LoRAConfig.from_dict({'rank': 8})", ValueError, r"unknown LoRAConfig fields \['rank'\]")(
    lambda ws: LoRAConfig.from_dict({"rank": 8})
)

# --- target patterns and model surgery ------------------------------------------------------------
for _id, _input, _config, _error, _message in [
    ("apply-typo", "targets=['qvk']", LoRAConfig(targets=["qvk"]), ValueError, r"targets pattern 'qvk' matched no module; closest names: 'blocks.0.attn.qkv'"),
    ("apply-unsupported-type", "targets=['norm'] (LayerNorm)", LoRAConfig(targets=["norm"]), TypeError, r"cannot adapt module 'blocks.0.norm' of type LayerNorm"),
    ("apply-exclude-unmatched", "exclude=['nothing']", LoRAConfig(exclude=["nothing"]), ValueError, r"exclude pattern 'nothing' matched no module"),
    ("apply-exclude-everything", "targets=['qkv'], exclude=['qkv']", LoRAConfig(targets=["qkv"], exclude=["qkv"]), ValueError, r"removed every module matched by targets"),
    ("apply-target-and-trainable", "targets=['head'], trainable=['head']", LoRAConfig(targets=["head"], trainable=["head"]), ValueError, r"matched by both targets and trainable"),
    ("apply-rank-pattern-unmatched", "rank_pattern={'fc9': 2}", LoRAConfig(rank_pattern={"fc9": 2}), ValueError, r"rank_pattern pattern 'fc9' matched no module"),
    ("apply-alpha-pattern-unmatched", "alpha_pattern={'fc9': 2}", LoRAConfig(alpha_pattern={"fc9": 2}), ValueError, r"alpha_pattern pattern 'fc9' matched no module"),
    ("apply-dora-embedding", "targets=['qkv', 'embed'], use_dora=True", LoRAConfig(targets=["qkv", "embed"], use_dora=True), ValueError, r"cannot adapt module 'embed': use_dora=True is supported on nn.Linear and transformers' Conv1D layers only, not on Embedding"),
    ("apply-rank-too-large", "targets=['qkv', 'head'], r=17 (head is 16 -> 3)", LoRAConfig(targets=["qkv", "head"], r=17), ValueError, r"cannot adapt module 'head': r must be at most 16"),
]:
    case(_id, "surgery", f"apply_lora(model, LoRAConfig({_input}))", _error, _message)(lambda ws, config=_config: apply_lora(ws.plain, config))

case("apply-config-dict", "surgery", "apply_lora(model, {'r': 4})", TypeError, r"config must be a LoRAConfig, got dict")(
    lambda ws: apply_lora(ws.plain, {"r": 4})
)
case("apply-other-settings", "surgery", "apply_lora on a model adapted with r=4, now r=8", ValueError, r"module 'blocks.0.attn.qkv' is already adapted with other settings: r=4 \(now 8\)")(
    lambda ws: apply_lora(ws.adapted, LoRAConfig(**{**CONFIG.to_dict(), "r": 8}))
)


@case("apply-lazy", "surgery", "apply_lora(nn.Sequential(nn.LazyLinear(4)), LoRAConfig())", ValueError, r"model has modules whose parameters are not initialised yet \(\['0'\]")
def _(ws):
    ws.plain = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 4))
    apply_lora(ws.plain, LoRAConfig())


@case("apply-lazy-elsewhere", "surgery", "targets=['0'] beside an nn.LazyLinear", ValueError, r"not initialised yet \(\['2'\].*run one forward pass first")
def _(ws):
    ws.plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(4))  # (unchanged: test_naming_and_plan.py)
    apply_lora(ws.plain, LoRAConfig(r=2, targets=["0"]))


@case("apply-attention-out-proj", "surgery", "targets=['out_proj'] of nn.MultiheadAttention", TypeError, r"reads out_proj's weight directly")
def _(ws):
    ws.plain = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2)})
    apply_lora(ws.plain, LoRAConfig(targets=["out_proj"]))


@case("apply-tied", "surgery", "targets on two modules sharing one weight", ValueError, r"share one weight \(tied weights\)")
def _(ws):
    ws.plain = nn.ModuleDict({"embed": nn.Embedding(10, 4), "out": nn.Linear(4, 10, bias=False)})
    ws.plain["out"].weight = ws.plain["embed"].weight
    apply_lora(ws.plain, LoRAConfig(targets=["embed", "out"]))


@case("apply-conv-groups", "surgery", "r=3 on nn.Conv2d(4, 4, 3, groups=2)", ValueError, r"r must be a multiple of the convolution's groups \(2\)")
def _(ws):
    ws.plain = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    apply_lora(ws.plain, LoRAConfig(r=3, targets=["0"]))


case("layer-bad-rank", "layers", "LoRA(nn.Linear(4, 4), r=0)", ValueError, r"r must be a positive integer, got 0")(
    lambda ws: LoRA(nn.Linear(4, 4), r=0)
)


@case("merge-twice", "layers", "layer.merge() on a merged layer", RuntimeError, r"LoRA is already merged; call unmerge\(\) first")
def _(ws):
    layer = ws.adapted.blocks[0].attn["qkv"]
    layer.merge()
    ws.snapshot()
    layer.merge()


case("unmerge-unmerged", "layers", "unmerge_lora(model) on an unmerged model", RuntimeError, r"cannot unmerge: modules \['blocks.0.attn.qkv'")(
    lambda ws: unmerge_lora(ws.adapted)
)


@case("unload-new-bias", "layers", "merge_and_unload of bias=True adapters on bias-free layers", ValueError, r"cannot unload modules \['0'\]: their adapters have a bias")
def _(ws):
    ws.plain = nn.Sequential(nn.Linear(4, 4, bias=False))
    apply_lora(ws.plain, LoRAConfig(r=2, bias=True))
    ws.snapshot()
    merge_and_unload(ws.plain)


@case("merge-bf16-drift", "layers", "merging an update too small for bfloat16 weights", RuntimeError, r"merging would change the update by .*bfloat16 weights cannot hold")
def _(ws):
    ws.plain = nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16))
    apply_lora(ws.plain, LoRAConfig(r=4, alpha=1e-3, bias=False))
    with torch.no_grad():
        ws.plain[0].matrix_B.weight.fill_(1e-3)
    ws.snapshot()
    merge_lora(ws.plain)


# --- adapter files --------------------------------------------------------------------------------
case("file-none", "adapter file", "load_adapter(model, None)", TypeError, r"path must be a file path or URL, got None")(
    lambda ws: load_adapter(ws.plain, None)
)
case("file-missing", "adapter file", "load_adapter(model, 'missing.lora.safetensors')", FileNotFoundError, r"missing.lora.safetensors")(
    lambda ws: load_adapter(ws.plain, ws.root / "missing.lora.safetensors")
)


def _write(ws, name: str, data: bytes) -> Path:
    path = ws.root / name
    path.write_bytes(data)
    ws.snapshot()
    return path


case("file-truncated", "adapter file", "a file cut short", ValueError, r"is truncated or corrupted")(
    lambda ws: load_adapter(ws.plain, _write(ws, "cut.safetensors", ws.adapter.read_bytes()[:-10]))
)
case("file-empty", "adapter file", "an empty file", ValueError, r"is truncated or not a safetensors file \(0 bytes\)")(
    lambda ws: load_adapter(ws.plain, _write(ws, "empty.safetensors", b""))
)
case("file-bit-flip", "adapter file", "one bit flipped in the tensor data", ValueError, r"is corrupted: its header or tensor data does not match the checksum")(
    lambda ws: load_adapter(ws.plain, _write(ws, "flip.safetensors", ws.adapter.read_bytes()[:-1] + bytes([ws.adapter.read_bytes()[-1] ^ 1])))
)
case("file-header-not-json", "adapter file", "a header of garbage bytes", ValueError, r"its header is not JSON")(
    lambda ws: load_adapter(ws.plain, _write(ws, "garbage.safetensors", ws.adapter.read_bytes()[:8] + b"\xff" * 20 + ws.adapter.read_bytes()[28:]))
)


@case("file-pickle", "adapter file", "a torch.save pickle renamed .safetensors", ValueError, r"model.safetensors is")
def _(ws):
    torch.save({"w": torch.zeros(2)}, ws.root / "model.safetensors")
    ws.snapshot()
    load_adapter(ws.plain, ws.root / "model.safetensors")


@case("file-folder", "adapter file", "load_adapter of a folder (a PEFT adapter)", ValueError, r"path must be an adapter file, got the folder .*; a PEFT adapter folder loads with import_peft")
def _(ws):
    (ws.root / "peft").mkdir()
    (ws.root / "peft" / "adapter_config.json").write_text("{}")
    ws.snapshot()
    load_adapter(ws.plain, ws.root / "peft")


@case("file-foreign", "adapter file", "a safetensors file of plain weights", ValueError, r"is not a lightning_lora adapter file")
def _(ws):
    save_file({"w": torch.zeros(2)}, ws.root / "weights.safetensors")
    ws.snapshot()
    load_adapter(ws.plain, ws.root / "weights.safetensors")


def _edit_alpha(header: dict) -> None:
    config = json.loads(header["__metadata__"]["config"])
    header["__metadata__"]["config"] = json.dumps({**config, "alpha": 9.0})


def _swap_names(header: dict) -> None:
    a, b = "blocks.0.attn.qkv.matrix_A.weight", "blocks.1.attn.qkv.matrix_A.weight"
    header[a], header[b] = header[b], header[a]


def _edit_dtype(header: dict) -> None:
    header["blocks.0.attn.qkv.matrix_A.weight"]["dtype"] = "I32"


for _id, _input, _edit in [
    ("file-edited-alpha", "metadata edited: config alpha 8.0 -> 9.0", _edit_alpha),
    ("file-swapped-names", "two tensor names swapped in the header", _swap_names),
    ("file-edited-dtype", "a header dtype edited F32 -> I32", _edit_dtype),
]:
    case(_id, "adapter file", _input, ValueError, r"is corrupted: its header or tensor data does not match the checksum")(
        lambda ws, edit=_edit, name=_id: load_adapter(ws.plain, ws.edited_adapter(edit, f"{name}.safetensors"))
    )

case("file-newer-format", "adapter file", "format_version 99", ValueError, r"adapter format version 99, newer than this lightning_lora supports")(
    lambda ws: load_adapter(ws.plain, ws.edited_adapter(lambda h: h["__metadata__"].update(format_version="99"), "new.safetensors"))
)
case("file-other-base", "adapter file", "load into a model with other base weights", ValueError, r"was trained on different base weights: base fingerprint")(
    lambda ws: load_adapter(TinyModel(), ws.adapter)
)
case("file-other-alpha", "adapter file", "load into a model adapted with alpha=2", ValueError, r"does not fit module 'blocks.0.attn.qkv': alpha=8.0 in the file, 2.0 in the model")(
    _other_alpha
)


@case("file-other-modules", "adapter file", "load into a model adapted on other modules", ValueError, r"adapted in the file but not in the model: \['blocks.0.mlp.fc1'")
def _(ws):
    apply_lora(ws.plain, LoRAConfig(targets=["qkv"]))
    ws.snapshot()
    load_adapter(ws.plain, ws.adapter)


@case("file-merged-model", "adapter file", "load into a model whose adapters are merged", ValueError, r"into a model with merged adapters")
def _(ws):
    merge_lora(ws.adapted)
    ws.snapshot()
    load_adapter(ws.adapted, ws.adapter)


@case("file-lower-precision-base", "adapter file", "load into a bfloat16 copy of the float32 base", ValueError, r"held in another dtype .* bfloat16 now, float32 then")
def _(ws):
    ws.plain = ws.fresh().to(torch.bfloat16)
    ws.snapshot()
    load_adapter(ws.plain, ws.adapter)


case("save-unadapted", "adapter file", "save_adapter of a model without adapters", ValueError, r"model has no LoRA adapters to save")(
    lambda ws: save_adapter(ws.plain, ws.root / "x.lora.safetensors")
)


@case("save-merged", "adapter file", "save_adapter of a merged model", RuntimeError, r"cannot fingerprint base weights while modules .* are merged")
def _(ws):
    merge_lora(ws.adapted)
    ws.snapshot()
    save_adapter(ws.adapted, ws.root / "x.lora.safetensors")


# --- Lightning checkpoints and the callback -------------------------------------------------------
def _last(ws) -> Path:
    assert ws.lightning is not None
    return ws.lightning[0] / "last.ckpt"


@case("ckpt-other-base", "checkpoint", "fit(ckpt_path=slim last.ckpt) on other base weights", ValueError, r"checkpoint was trained on different base weights")
def _(ws):
    ws.plain = Classifier()
    ws.snapshot()
    _trainer(ws.root, LoRACallback(targets=["qkv"]), max_epochs=2).fit(ws.plain, data(), ckpt_path=_last(ws))


@case("ckpt-other-rank", "checkpoint", "resume last.ckpt (r=8) with LoRACallback(r=4)", ValueError, r"checkpoint does not fit module 'net.blocks.0.attn.qkv': r=8 in the file, 4 in the model")
def _(ws):
    ws.plain = ws.classifier()
    ws.snapshot()
    _trainer(ws.root, LoRACallback(targets=["qkv"], r=4), max_epochs=2).fit(ws.plain, data(), ckpt_path=_last(ws))


@case("ckpt-newer-record", "checkpoint", "a LoRA record of version 99", ValueError, r"checkpoint LoRA record has version 99, newer than this lightning_lora supports")
def _(ws):
    ws.plain = ws.classifier()
    ws.snapshot()
    restore_checkpoint({"state_dict": {}, "lora": {"version": 99}}, ws.plain)


@case("ckpt-companion-missing", "checkpoint", "check_companion(x.ckpt) without x.lora.safetensors", ValueError, r"has no companion .* regenerate it with lightning_lora.write_companion")
def _(ws):
    ckpt = ws.root / "alone.ckpt"
    ckpt.write_bytes(_last(ws).read_bytes())
    ws.snapshot()
    check_companion(ckpt)


@case("ckpt-companion-stale", "checkpoint", "check_companion with an older companion beside the checkpoint", ValueError, r"does not belong to .* \(a stale pair")
def _(ws):
    ckpt = ws.root / "pair.ckpt"
    ckpt.write_bytes(_last(ws).read_bytes())
    (ws.root / "pair.lora.safetensors").write_bytes(ws.adapter.read_bytes())  # another run's adapter
    ws.snapshot()
    check_companion(ckpt)


@case("ckpt-plain-loader", "checkpoint", "Classifier.load_from_checkpoint(slim last.ckpt) without LoRAMixin", RuntimeError, r"Unexpected key\(s\) in state_dict: \"\[lightning_lora\] a LoRA checkpoint")
def _(ws):
    Classifier.load_from_checkpoint(_last(ws))


case("ckpt-helper-not-lora", "checkpoint", "lightning_lora.load_checkpoint(model, plain.ckpt)", ValueError, r"plain.ckpt is not a LoRA checkpoint")(
    lambda ws: (torch.save({"state_dict": {}}, ws.root / "plain.ckpt"), ws.snapshot(), load_checkpoint(ws.plain, ws.root / "plain.ckpt"))
)


@case("ckpt-not-lora", "checkpoint", "write_companion of a checkpoint without LoRA record", ValueError, r"is not a LoRA checkpoint")
def _(ws):
    torch.save({"state_dict": {}}, ws.root / "plain.ckpt")
    ws.snapshot()
    write_companion(ws.root / "plain.ckpt", ws.classifier())


for _id, _kwargs, _error, _message in [
    ("callback-log-flag", {"log_grad_norm": "yes"}, TypeError, r"log_grad_norm must be True or False, got 'yes'"),
    ("callback-merge-flag", {"merge_on_end": 1}, TypeError, r"merge_on_end must be True or False, got 1"),
    ("callback-adapter-path-type", {"adapter_path": 3}, TypeError, r"adapter_path must be a path or None, got 3"),
    ("callback-config-type", {"config": {"r": 2}}, TypeError, r"config must be a LoRAConfig, got dict"),
    ("callback-config-and-arguments", {"config": LoRAConfig(), "r": 16}, ValueError, r"pass either config or the separate arguments, not both \(also got \['r'\]\)"),
    ("callback-empty-targets", {"targets": []}, ValueError, r"targets must name at least one module pattern"),
    ("callback-adapter-root-alone", {"adapter_root": "model"}, ValueError, r"adapter_root='model' names where adapter_path's modules are, but adapter_path is None"),
    ("callback-adapter-root-type", {"adapter_path": "a.lora.safetensors", "adapter_root": 1}, TypeError, r"adapter_root must be a module name \(e.g. 'model'\) or None, got 1"),
    ("callback-vllm-dora", {"use_dora": True, "export_peft": "vllm"}, ValueError, r"export_peft='vllm' cannot serve adapters made with use_dora=True: vLLM serves no DoRA adapters"),
    ("callback-vllm-bias", {"bias": True, "export_peft": "vllm"}, ValueError, r"export_peft='vllm' cannot serve adapters made with bias=True: vLLM serves no LoRA biases"),
]:
    case(_id, "callback", f"LoRACallback(**{_kwargs!r})", _error, _message)(lambda ws, kwargs=_kwargs: LoRACallback(**kwargs))


@case("callback-two", "callback", "Trainer(callbacks=[LoRACallback(...), LoRACallback(...)])", RuntimeError, r"more than one stateful callback of type `LoRACallback`")
def _(ws):
    ws.plain = ws.classifier()
    ws.snapshot()
    _trainer(ws.root, LoRACallback(targets=["qkv"]), LoRACallback(targets=["fc1"])).fit(ws.plain, data())


@case("callback-two-added", "callback", "trainer.callbacks.append(LoRACallback(...)) beside another", MisconfigurationException, r"the Trainer has more than one LoRACallback")
def _(ws):
    ws.plain = ws.classifier()
    ws.snapshot()
    trainer = _trainer(ws.root, LoRACallback(targets=["qkv"]))
    trainer.callbacks.append(LoRACallback(targets=["fc1"]))  # past Lightning's own check of stateful callbacks
    trainer.fit(ws.plain, data())


@case("callback-adapter-path-contradicts", "callback", "LoRACallback(r=4, adapter_path=<file trained with r=8>)", ValueError, r"was trained with other settings: r=4 \(file: 8\)")
def _(ws):
    ws.plain = ws.classifier()
    ws.snapshot()
    _trainer(ws.root, LoRACallback(r=4, adapter_path=ws.lightning[0] / "last.lora.safetensors")).validate(ws.plain, data(), verbose=False)


@case("callback-vllm-auto-bias", "callback", "LoRACallback(bias='auto', export_peft='vllm') on layers with biases", MisconfigurationException, r"export_peft='vllm' would fail at the first checkpoint: vLLM serves no LoRA biases")
def _(ws):
    ws.plain = ws.classifier()
    ws.snapshot()  # refused as the model is adapted, before training: the adapters are taken out again
    _trainer(ws.root, LoRACallback(targets=["qkv"], bias="auto", export_peft="vllm"), max_epochs=1).fit(ws.plain, data())


@case("callback-adapter-path-missing", "callback", "LoRACallback(adapter_path='missing.lora.safetensors')", FileNotFoundError, r"missing.lora.safetensors")
def _(ws):
    ws.plain = ws.classifier()
    ws.snapshot()
    _trainer(ws.root, LoRACallback(adapter_path=ws.root / "missing.lora.safetensors")).fit(ws.plain, data())


@case("callback-optimizer-misses-adapters", "callback", "configure_optimizers over the head only", MisconfigurationException, r"the optimizer does not hold 4 of the 4 LoRA parameters")
def _(ws):
    class HeadOnly(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.head.parameters(), lr=0.1)

    ws.plain = HeadOnly()
    ws.snapshot(model_may_change=True)  # the model is adapted before the optimizer is checked
    _trainer(ws.root, LoRACallback(targets=["qkv"])).fit(ws.plain, data())


# --- Hydra overrides -----------------------------------------------------------------------------
def _compose(ws, overrides):
    from test_hydra_configs import composed

    return composed(overrides, ws.root / "hydra")


for _id, _override, _error, _message in [
    ("hydra-r-string", "lora.r=abc", ConfigCompositionException, r"Error merging override lora.r=abc"),
    ("hydra-unknown-key", "lora.rank=8", ConfigCompositionException, r"Could not override 'lora.rank'"),
    ("hydra-rank-pattern-value", "lora.rank_pattern={q_proj:x}", ConfigCompositionException, r"Error merging override lora.rank_pattern=\{q_proj:x\}"),
]:
    case(_id, "hydra", _override, _error, _message)(lambda ws, override=_override: _compose(ws, [override]))

for _id, _override, _message in [
    ("hydra-alpha-negative", "lora.alpha=-1", r"alpha must be a positive finite number, got -1.0"),
    ("hydra-targets-empty", "lora.targets=[]", r"targets must name at least one module pattern"),
    ("hydra-dropout-one", "lora.dropout=1.0", r"dropout must be a number in \[0, 1\), got 1.0"),
    ("hydra-bias-word", "lora.bias=maybe", r"bias must be True, False or 'auto', got 'maybe'"),
    ("hydra-rslora-word", "lora.use_rslora=sometimes", r"use_rslora must be True or False, got 'sometimes'"),
    ("hydra-log-grad-norm-two", "lora.log_grad_norm=2", r"log_grad_norm must be True or False, got 2"),
    ("hydra-merge-on-end-yes", "lora.merge_on_end=yes", r"merge_on_end must be True or False, got 'yes'"),
    ("hydra-dora-vllm", "lora.use_dora=true lora.export_peft=vllm", r"export_peft='vllm' cannot serve adapters made with use_dora=True"),
]:
    case(_id, "hydra", _override, InstantiationException, _message)(
        lambda ws, override=_override: instantiate(_compose(ws, override.split()).lora)
    )


# --- the test -------------------------------------------------------------------------------------
def _model_state(model: nn.Module) -> tuple:
    return (
        [type(m) for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [m.training for m in model.modules()],
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "hydra" not in p.parts}


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """A slim last.ckpt (and companion) of a Classifier with qkv adapters, and its base weights."""
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    model = Classifier()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer(root, LoRACallback(targets=["qkv"]), ModelCheckpoint(dirpath=root, save_last=True)).fit(model, data())
    return root, base


def test_the_matrix_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, lightning_run):
    ws = Workspace(tmp_path, lightning_run)
    lightning_files = _files(lightning_run[0])
    snapshots: list[tuple] = []

    def snapshot(model_may_change: bool = False) -> None:
        snapshots[:] = [(ws.plain, None if model_may_change else _model_state(ws.plain), ws.adapted, _model_state(ws.adapted), _files(tmp_path))]

    ws.snapshot = snapshot
    ws.plain_lightning = ws.classifier
    snapshot()
    with pytest.raises(case.error, match=case.message):
        case.run(ws)
    plain, plain_state, adapted, adapted_state, files = snapshots[0]
    if plain_state is not None and plain is ws.plain:
        _assert_same(_model_state(ws.plain), plain_state)
    _assert_same(_model_state(ws.adapted), adapted_state)
    assert _files(tmp_path) == files, "files in the working folder changed"
    assert _files(lightning_run[0]) == lightning_files, "the checkpoint folder changed"


def _assert_same(now: tuple, before: tuple) -> None:
    types, state, flags, modes = now
    types_before, state_before, flags_before, modes_before = before
    assert types == types_before and flags == flags_before and modes == modes_before
    assert state.keys() == state_before.keys()
    assert all(torch.equal(state[k], state_before[k]) for k in state)


def markdown_table() -> str:
    rows = ["| case | area | input | error |", "|---|---|---|---|"]
    for c in CASES:
        fragment = c.message.replace("\\", "").replace("|", "/")
        rows.append(f"| `{c.id}` | {c.area} | {c.input.replace('|', '/')} | `{c.error.__name__}`: {fragment} |")
    return "\n".join(rows)


def test_reliability_doc_lists_every_case():
    text = DOC.read_text()
    start, end = text.index("<!-- cases:start -->\n"), text.index("<!-- cases:end -->")
    assert text[start + len("<!-- cases:start -->\n") : end].strip() == markdown_table()
    readme = (DOC.parents[1] / "README.md").read_text()
    assert f"- {len(CASES)} bad inputs (" in readme  # the README's count, too


if __name__ == "__main__":
    text = DOC.read_text()
    start, end = text.index("<!-- cases:start -->\n") + len("<!-- cases:start -->\n"), text.index("<!-- cases:end -->")
    DOC.write_text(text[:start] + markdown_table() + "\n" + text[end:])

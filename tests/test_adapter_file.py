import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TinyModel, randomize_adapters
from safetensors.torch import save_file

from lightning_lora import LoRAConfig, apply_lora, load_adapter, lora_modules, lora_state_dict, read_adapter, save_adapter
from lightning_lora.formats import base_fingerprint
from lightning_lora.formats.adapter_file import adapter_bytes
from lightning_lora.formats.fingerprint import SAMPLES_PER_TENSOR

CONFIG = LoRAConfig(r=4, alpha=8, bias="auto", targets=["qkv", "fc1", "embed"], trainable=["head"], rank_pattern={"fc1": 2})


@pytest.fixture
def trained(tmp_path):
    """A base model, its adapted copy with non-zero adapters, and the saved adapter file."""
    base_state = TinyModel().state_dict()
    model = TinyModel()
    model.load_state_dict(base_state)
    apply_lora(model, CONFIG)
    randomize_adapters(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    path = tmp_path / "adapter.lora.safetensors"
    save_adapter(model, path)
    return base_state, model, path


def _fresh(base_state):
    model = TinyModel()
    model.load_state_dict(base_state)
    return model


def test_save_load_reproduces_outputs_exactly(trained, tokens):
    base_state, model, path = trained
    fresh = _fresh(base_state)
    assert load_adapter(fresh, path) == list(lora_modules(model))
    assert torch.equal(fresh(tokens), model(tokens))
    assert fresh.blocks[0].mlp["fc1"].r == 2
    assert fresh.head.weight.requires_grad and not fresh.embed.original_module.weight.requires_grad
    # loading again into the now adapted model works too
    load_adapter(fresh, path)
    assert torch.equal(fresh(tokens), model(tokens))


def test_file_holds_adapters_metadata_and_nothing_else(trained):
    _, model, path = trained
    adapter = read_adapter(path)
    assert set(adapter.tensors) == set(lora_state_dict(model))
    assert adapter.config == CONFIG
    assert adapter.modules["blocks.0.mlp.fc1"].r == 2
    assert adapter.modules["blocks.0.mlp.fc1"] == model.blocks[0].mlp["fc1"].spec
    stored = json.loads(_metadata(path.read_bytes())["modules"])
    assert stored["blocks.0.mlp.fc1"]["shapes"]["matrix_A.weight"] == [2, 16]
    assert adapter.trainable == ["head"]
    assert adapter.base_fingerprint == base_fingerprint(model)
    tensor_bytes = sum(t.numel() * t.element_size() for t in lora_state_dict(model).values())
    assert os.path.getsize(path) <= tensor_bytes + 64 * 1024


def test_fingerprint_is_the_same_before_and_after_adaptation(trained):
    base_state, model, _ = trained
    fresh = _fresh(base_state)
    assert base_fingerprint(fresh, ["head"]) == base_fingerprint(model)
    assert base_fingerprint(fresh) != base_fingerprint(model)  # the head counts as base when not trainable


def test_fingerprint_samples_a_fixed_number_of_values(monkeypatch):
    big = torch.nn.Linear(4096, 1024)
    seen = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if args and args[0] is torch.float64:
            seen.append(self.numel())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    base_fingerprint(big)
    assert seen and set(seen) == {SAMPLES_PER_TENSOR}  # never the 4M weights, for both tensors


def test_different_base_model_is_refused(trained, tokens):
    _, _, path = trained
    other = TinyModel()  # other random weights
    before = other(tokens)
    with pytest.raises(ValueError, match="was trained on different base weights: base fingerprint"):
        load_adapter(other, path)
    assert not lora_modules(other)
    assert torch.equal(other(tokens), before)
    load_adapter(other, path, check_base=False)
    assert lora_modules(other)


def test_rank_mismatch_is_refused(trained, tmp_path):
    base_state, _, path = trained
    model = _fresh(base_state)
    apply_lora(model, LoRAConfig(r=8, targets=["qkv", "fc1", "embed"], trainable=["head"]))
    with pytest.raises(ValueError, match="does not fit module 'embed': r=4 in the file, 8 in the model"):
        load_adapter(model, path)


def test_missing_or_unexpected_modules_are_refused(trained):
    base_state, _, path = trained
    model = _fresh(base_state)
    apply_lora(model, LoRAConfig(r=4, targets=["qkv"]))
    with pytest.raises(ValueError, match=r"adapted in the file but not in the model: \['embed'"):
        load_adapter(model, path)


def test_missing_tensor_is_refused(trained, tmp_path):
    base_state, model, _ = trained
    data = adapter_bytes(model)
    adapter = read_adapter_bytes(data, tmp_path)
    meta = _metadata(data)
    tensors = dict(adapter.tensors)
    del tensors["blocks.0.attn.qkv.matrix_B.bias"]
    path = tmp_path / "missing.safetensors"
    save_file(tensors, path, metadata=meta)
    _fix_checksum(path)
    fresh = _fresh(base_state)
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.0.attn.qkv.matrix_B.bias'\], unexpected tensors \[\]"):
        load_adapter(fresh, path)
    assert not lora_modules(fresh)


def test_shape_mismatch_is_refused(trained, tmp_path):
    base_state, model, _ = trained
    data = adapter_bytes(model)
    tensors = dict(read_adapter_bytes(data, tmp_path).tensors)
    tensors["blocks.0.attn.qkv.matrix_A.weight"] = torch.zeros(4, 15)
    path = tmp_path / "shape.safetensors"
    save_file(tensors, path, metadata=_metadata(data))
    _fix_checksum(path)
    with pytest.raises(ValueError, match=r"tensor 'blocks.0.attn.qkv.matrix_A.weight' has shape \(4, 15\) in the file and \(4, 16\)"):
        load_adapter(_fresh(base_state), path)


def test_truncated_corrupted_and_foreign_files_are_refused(trained, tmp_path):
    base_state, _, path = trained
    data = path.read_bytes()
    cases = {
        "truncated": (data[: len(data) - 10], "is truncated or corrupted"),
        "short": (data[:5], "is truncated or not a safetensors file"),
        "header": (data[:8] + b"\xff" * 20 + data[28:], "its header is not JSON"),
        "flipped": (data[:-1] + bytes([data[-1] ^ 1]), "is corrupted: its header or tensor data does not match the checksum"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        fresh = _fresh(base_state)
        with pytest.raises(ValueError, match=message):
            load_adapter(fresh, bad)
        assert not lora_modules(fresh)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="is not a lightning_lora adapter file"):
        load_adapter(_fresh(base_state), foreign)
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(ValueError, match="model.pt is"):
        load_adapter(_fresh(base_state), pickle)


def test_newer_format_is_refused(trained, tmp_path):
    _, model, _ = trained
    data = adapter_bytes(model)
    meta = {**_metadata(data), "format_version": "99"}
    path = tmp_path / "new.safetensors"
    save_file(dict(read_adapter_bytes(data, tmp_path).tensors), path, metadata=meta)
    with pytest.raises(ValueError, match="adapter format version 99, newer than this lightning_lora supports"):
        read_adapter(path)


def test_save_is_atomic(trained, tmp_path, monkeypatch):
    _, model, path = trained
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.lora.safetensors"]


def test_save_without_adapters_fails(tmp_path):
    with pytest.raises(ValueError, match=r"model has no LoRA adapters to save; call apply_lora"):
        save_adapter(TinyModel(), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_while_merged_fails(trained, tmp_path):
    _, model, _ = trained
    model.blocks[0].attn["qkv"].merge()
    with pytest.raises(RuntimeError, match=r"cannot fingerprint base weights while modules \['blocks.0.attn.qkv'\] are merged"):
        save_adapter(model, tmp_path / "merged.safetensors")


def test_reload_in_a_fresh_process(trained, tmp_path, tokens):
    base_state, model, path = trained
    torch.save(base_state, tmp_path / "base.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    expected = model(tokens)
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from conftest import TinyModel
from lightning_lora import load_adapter
model = TinyModel()
model.load_state_dict(torch.load({str(tmp_path / 'base.pt')!r}))
load_adapter(model, {str(path)!r})
torch.save(model(torch.load({str(tmp_path / 'tokens.pt')!r})), {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def read_adapter_bytes(data, folder):
    path = folder / "scratch.safetensors"
    path.write_bytes(data)
    return read_adapter(path)


def _metadata(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]


def _fix_checksum(path):
    """Re-sign a hand-edited file so that the test reaches the check it is about.

    The digest is the format's: SHA-256 of the header as canonical JSON (sorted keys, no spaces),
    without the digest itself, followed by the tensor data.
    """
    import hashlib

    from safetensors.torch import load

    data = path.read_bytes()
    save_file(load(data), path, metadata={**_metadata(data), "sha256": "0" * 64})
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    del header["__metadata__"]["sha256"]
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(data[8 + length :])
    save_file(load(data), path, metadata={**_metadata(data), "sha256": digest.hexdigest()})


@pytest.mark.parametrize(("setting", "message"), [("alpha", "alpha=8.0 in the file, 4.0 in the model"), ("use_rslora", "use_rslora=False in the file, True in the model")])
def test_loading_into_adapters_with_other_settings_is_refused(trained, tokens, setting, message):
    base_state, model, path = trained
    fresh = _fresh(base_state)
    other = {"alpha": {"alpha": 4}, "use_rslora": {"use_rslora": True}}[setting]
    apply_lora(fresh, LoRAConfig(**{**CONFIG.to_dict(), **other}))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh, path)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_edited_metadata_or_header_is_detected(trained, tmp_path):
    _, _, path = trained
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode()
    config = json.loads(_metadata(data)["config"])
    edits = {
        "alpha": header.replace(json.dumps(json.dumps(config))[1:-1], json.dumps(json.dumps({**config, "alpha": 9.0}))[1:-1]),
        "dtype": header.replace('"dtype":"F32"', '"dtype":"I32"', 1),
    }
    for name, edited in edits.items():
        assert edited != header, name
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data[:8] + edited.encode() + data[8 + length :])
        with pytest.raises(ValueError, match="is corrupted: its header or tensor data does not match the checksum"):
            read_adapter(bad)


def test_adapter_files_respect_the_umask(trained, tmp_path):
    import stat

    _, model, _ = trained
    previous = os.umask(0o022)
    try:
        path = save_adapter(model, tmp_path / "perm.lora.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_bad_paths_and_lazy_or_oversized_targets(tmp_path, tiny_model):
    with pytest.raises(TypeError, match=r"path must be a file path or URL, got None \(NoneType\)"):
        load_adapter(tiny_model, None)
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"model has modules whose parameters are not initialised yet \(\['0'\]"):
        apply_lora(lazy, LoRAConfig())
    assert type(lazy[1]) is torch.nn.Linear
    with pytest.raises(ValueError, match=r"cannot adapt module 'head': r must be at most 16 .* got r=17"):
        apply_lora(tiny_model, LoRAConfig(targets=["head", "qkv"], r=17))
    assert not lora_modules(tiny_model)


def test_claimed_rank_is_checked_against_the_tensors_before_anything_is_built(tmp_path, monkeypatch):
    import lightning_lora.surgery.apply as surgery_module

    model = torch.nn.Sequential(torch.nn.Linear(512, 512))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4))
    path = tmp_path / "bomb.lora.safetensors"
    save_adapter(model, path)
    data = path.read_bytes()
    meta = _metadata(data)
    modules = json.loads(meta["modules"])
    modules["0"]["r"] = 512  # a crafted file: the largest rank the layer allows, over rank-4 tensors
    from safetensors.torch import load

    save_file(load(data), path, metadata={**meta, "modules": json.dumps(modules)})
    _fix_checksum(path)
    built = []
    monkeypatch.setattr(surgery_module, "build_adapter", lambda *args: built.append(args))
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 512))
    fresh.load_state_dict(base)
    with pytest.raises(ValueError, match=r"tensor '0.matrix_A.weight' has shape \(4, 512\) in the file and \(512, 512\) in the model \(from the file's settings, r=512"):
        load_adapter(fresh, path)
    assert built == [] and type(fresh[0]) is torch.nn.Linear


def test_files_and_checkpoint_records_of_format_version_1_still_load(trained, tmp_path, tokens):
    import hashlib

    from safetensors.torch import load

    from lightning_lora.lightning.checkpoint import restore_checkpoint, slim_checkpoint
    from lightning_lora.formats.fingerprint import legacy_fingerprint
    from lightning_lora.surgery.state import base_named_parameters

    base_state, model, path = trained
    data = path.read_bytes()
    meta = {k: v for k, v in _metadata(data).items() if k not in ("sha256", "base_dtypes")}
    meta.update(format_version="1", base_fingerprint=legacy_fingerprint(base_named_parameters(model)))
    old = tmp_path / "v1.lora.safetensors"
    save_file(load(data), old, metadata={**meta, "tensors_sha256": "0" * 64})
    written = old.read_bytes()
    meta["tensors_sha256"] = hashlib.sha256(written[8 + int.from_bytes(written[:8], "little") :]).hexdigest()
    save_file(load(data), old, metadata=meta)
    fresh = _fresh(base_state)
    load_adapter(fresh, old)
    assert torch.equal(fresh(tokens), model(tokens))
    with pytest.raises(ValueError, match="was trained on different base weights"):
        load_adapter(TinyModel(), old)

    checkpoint = {"state_dict": dict(model.state_dict())}
    slim_checkpoint(checkpoint, model)
    record = checkpoint["lora"]
    own = model.state_dict()
    record.update(version=1, base_fingerprint=legacy_fingerprint((k, own[k]) for k in record["base_keys"]))
    del record["base_dtypes"]
    target = _fresh(base_state)
    restore_checkpoint(checkpoint, target)
    target.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(target(tokens), model(tokens))

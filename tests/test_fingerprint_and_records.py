"""Unit tests of base-weight fingerprints and of the LoRA record of a checkpoint, without a Trainer."""

import pytest
import torch
from conftest import TinyModel, randomize_adapters

from lightning_lora import LoRAConfig, apply_lora, lora_state_dict, merge_lora
from lightning_lora.formats.adapter_file import parse_adapter
from lightning_lora.formats.fingerprint import dtype_note, dtypes_of, fingerprint_matches, fingerprint_tensors
from lightning_lora.lightning.checkpoint import (
    CHECKPOINT_KEY,
    MARKER_KEY,
    apply_record,
    prepare_checkpoint,
    restore_checkpoint,
    step_of,
)


def named(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.randn(64, 32, generator=generator).to(dtype)), ("b.bias", torch.randn(7, generator=generator).to(dtype))]


def test_fingerprints_tell_weights_names_and_shapes_apart_and_ignore_order():
    digest = fingerprint_tensors(named())
    assert fingerprint_tensors(list(reversed(named()))) == digest
    assert fingerprint_tensors(named(seed=1)) != digest
    assert fingerprint_tensors([("renamed", named()[0][1]), named()[1]]) != digest
    assert fingerprint_tensors([("a.weight", named()[0][1].reshape(32, 64)), named()[1]]) != digest


def test_a_fingerprint_is_checked_in_the_dtypes_it_recorded():
    bf16 = named(dtype=torch.bfloat16)
    digest, dtypes = fingerprint_tensors(bf16), dtypes_of(bf16)
    assert dtypes == {"": "bfloat16"}
    upcast = [(name, tensor.float()) for name, tensor in bf16]  # a float32 copy of bfloat16 weights matches
    assert fingerprint_matches(upcast, digest, dtypes)
    original = named()  # the float32 weights the bfloat16 ones came from match too, taken in bfloat16
    assert fingerprint_matches(original, digest, dtypes)
    recorded = fingerprint_tensors(original)
    assert not fingerprint_matches(bf16, recorded, dtypes_of(original))  # less precision than recorded
    assert "held in another dtype" in dtype_note(bf16, dtypes_of(original))


def test_sampled_values_are_read_once_however_many_digests_use_them(monkeypatch):
    import lightning_lora.formats.fingerprint as fingerprint_module

    reads = []
    sample = fingerprint_module._sample
    monkeypatch.setattr(fingerprint_module, "_sample", lambda tensor: reads.append(1) or sample(tensor))
    samples = {}
    tensors = named()
    first = fingerprint_tensors(tensors, samples=samples)
    renamed = fingerprint_tensors([(f"model.{name}", tensor) for name, tensor in tensors], samples=samples)
    assert len(reads) == 2 and first == fingerprint_tensors(tensors) and renamed != first


def test_the_record_leaves_out_the_frozen_weights_and_describes_the_adapters():
    model = TinyModel()
    assert prepare_checkpoint(model, {"epoch": 0, "global_step": 0}) is None  # nothing to record without adapters
    apply_lora(model, LoRAConfig(r=2, targets=["qkv"], trainable=["head"]))
    randomize_adapters(model)
    prepared = prepare_checkpoint(model, {"epoch": 1, "global_step": 5})
    record = prepared.record
    frozen = [key for key, p in model.state_dict(keep_vars=True).items() if not p.requires_grad]
    assert record["base_keys"] == frozen and "head.weight" not in frozen
    assert set(record["modules"]) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"} and record["trainable"] == ["head"]
    companion = parse_adapter(prepared.companion({"checkpoint": "0" * 64}), "companion")
    assert companion.checkpoint_files == {"checkpoint": "0" * 64}
    assert companion.checkpoint == {"epoch": 1, "global_step": 5}
    assert set(companion.tensors) == set(lora_state_dict(model))
    assert prepare_checkpoint(model, step_of({}), keep_base_weights=True).record["base_keys"] == []
    merge_lora(model)
    assert prepare_checkpoint(model, step_of({})) is None  # merged weights are not the base


def test_a_record_round_trip_through_a_checkpoint_dict():
    model = TinyModel()
    apply_lora(model, LoRAConfig(targets=["qkv"]))
    randomize_adapters(model)
    checkpoint = {"state_dict": dict(model.state_dict()), "epoch": 2, "global_step": 9}
    assert step_of(checkpoint) == {"epoch": 2, "global_step": 9} and step_of({}) == {"epoch": 0, "global_step": 0}
    apply_record(checkpoint, prepare_checkpoint(model, step_of(checkpoint), companion=False))
    state = checkpoint["state_dict"]
    assert next(iter(state)) == MARKER_KEY and not any(key in state for key in checkpoint[CHECKPOINT_KEY]["base_keys"])
    fresh = TinyModel()
    fresh.load_state_dict({k.replace(".original_module", ""): v for k, v in model.state_dict().items() if "matrix_" not in k})
    restore_checkpoint(checkpoint, fresh)  # adapts the fresh model as recorded and fills the base weights in
    fresh.load_state_dict(checkpoint["state_dict"])
    tokens = torch.randint(0, 32, (2, 5))
    assert torch.equal(fresh(tokens), model(tokens))
    other = TinyModel()
    checkpoint = {"state_dict": dict(model.state_dict()), "epoch": 2, "global_step": 9}
    apply_record(checkpoint, prepare_checkpoint(model, step_of(checkpoint), companion=False))
    with pytest.raises(ValueError, match=r"checkpoint was trained on different base weights"):
        restore_checkpoint(checkpoint, other)
    assert not [m for m in other.modules() if type(m).__name__ == "LoRA"]  # left as it was

"""Quantized base (QLoRA): NF4 base weights stay 4-bit while adapters train, files stay slim and refuse
the wrong base, and merge_and_unload returns a float model."""

import sys

import lightning as L
import pytest
import torch
import torchao.quantization as torchao
from conftest import TinyModel, randomize_adapters
from lightning_models import Classifier, data
from torch import nn

from lightning_lora import (
    LoRACallback,
    LoRAConfig,
    apply_lora,
    load_adapter,
    load_checkpoint,
    lora_modules,
    merge_and_unload,
    merge_lora,
    quantize_base,
    save_adapter,
)
from lightning_lora.lightning.checkpoint import MARKER_KEY, adapter_path_for

NF4Tensor = torchao.NF4Tensor

TARGETS = ["attn.qkv", "mlp.fc1"]
# Every linear layer but the output head: the layers a quantized base holds in 4 bits.
QUANTIZED = [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def _layer(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.original_module if hasattr(module, "original_module") else module


def _nf4_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(getattr(module, "weight", None), NF4Tensor)]


def test_quantize_setting_is_validated():
    with pytest.raises(ValueError, match=r"quantize must be None or one of \['nf4'\], got 'int4'"):
        LoRAConfig(quantize="int4")
    with pytest.raises(ValueError, match=r"method must be one of \['nf4'\], got 'fp4'"):
        quantize_base(TinyModel(), "fp4")
    with pytest.raises(ValueError, match=r"merge_on_end=True cannot merge into a quantized base \(quantize='nf4'\)"):
        LoRACallback(quantize="nf4", merge_on_end=True)


def test_missing_torchao_names_the_extra_and_leaves_the_model_as_it_was(monkeypatch):
    model = TinyModel()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"quantize='nf4' needs torchao >= 0.18 .*lightning-lora\[qlora\]"):
        apply_lora(model, LoRAConfig(targets=TARGETS, quantize="nf4"))
    assert not lora_modules(model) and not _nf4_layers(model)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_the_linear_layers_but_the_head_are_quantized_and_compute_with_their_nf4_values(tokens):
    model = TinyModel()
    reference = TinyModel()
    reference.load_state_dict(model.state_dict())
    unquantized = reference(tokens)
    apply_lora(model, LoRAConfig(targets=TARGETS, quantize="nf4"))
    assert sorted(_nf4_layers(model)) == sorted(f"{name}.original_module" if name.endswith(tuple(TARGETS)) else name for name in QUANTIZED)
    assert not isinstance(model.head.weight, NF4Tensor) and not model.embed.weight.requires_grad
    assert all(not _layer(model, name).weight.requires_grad for name in QUANTIZED)
    with torch.no_grad():  # the reference holds the values the 4-bit codes decode to
        for name in QUANTIZED:
            _layer(reference, name).weight.copy_(_layer(model, name).weight.to(torch.float32))
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=1e-6)
    assert (model(tokens) - unquantized).abs().max() > 1e-3  # 4 bits are not the float weights


def test_layers_that_do_not_split_into_blocks_stay_and_are_named():
    model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 2))  # 80 values: no whole block
    with pytest.warns(UserWarning, match=r"quantize leaves 1 linear layers in their dtype, .* blocks of 64 values: \['0'\]"):
        assert quantize_base(model) == ["2"]
    assert isinstance(model[2].weight, NF4Tensor) and not isinstance(model[0].weight, NF4Tensor)


def test_merge_into_a_quantized_base_is_refused_and_merge_and_unload_returns_a_float_model(tokens):
    model = TinyModel()
    apply_lora(model, LoRAConfig(targets=TARGETS, quantize="nf4", bias=False))
    randomize_adapters(model)
    expected = model(tokens)
    with pytest.raises(RuntimeError, match=r"cannot merge module 'blocks.0.attn.qkv': its base weight is quantized \(nf4\).*merge_and_unload"):
        merge_lora(model)
    assert not any(adapter.merged for adapter in lora_modules(model).values())
    merged = merge_and_unload(model)
    assert not _nf4_layers(merged) and not lora_modules(merged)
    plain = TinyModel()
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(plain(tokens), expected, rtol=1e-5, atol=1e-5)


def test_a_refused_merge_and_unload_leaves_the_base_quantized(tokens):
    model = TinyModel().to(torch.bfloat16)
    apply_lora(model, LoRAConfig(targets=TARGETS, quantize="nf4", bias=False))
    randomize_adapters(model, scale=1e-6)  # too small an update for bfloat16 weights to hold
    expected = model(tokens)
    with pytest.raises(RuntimeError, match=r"cannot merge module 'blocks.0.attn.qkv': merging would change the update"):
        merge_and_unload(model)
    assert len(_nf4_layers(model)) == len(QUANTIZED) and len(lora_modules(model)) == 4
    assert torch.equal(model(tokens), expected)


def test_adapter_file_is_slim_and_refuses_an_unquantized_base(tmp_path, tokens):
    model = TinyModel()
    pretrained = {key: value.clone() for key, value in model.state_dict().items()}
    apply_lora(model, LoRAConfig(targets=TARGETS, quantize="nf4"))
    randomize_adapters(model)
    path = save_adapter(model, tmp_path / "q.lora.safetensors")
    adapter_bytes = sum(p.numel() * p.element_size() for a in lora_modules(model).values() for p in a.adapter_params().values())
    assert (tmp_path / "q.lora.safetensors").stat().st_size < adapter_bytes + 64 * 1024

    unquantized = TinyModel()
    unquantized.load_state_dict(pretrained)
    with pytest.raises(ValueError, match=r"different base weights.*the file's base was quantized and 8 of this model's base weights are not .*quantize_base\(model, 'nf4'\)"):
        load_adapter(unquantized, path)
    assert not lora_modules(unquantized)
    load_adapter(unquantized, path, check_base=False)  # e.g. to merge into the full-precision base

    quantized = TinyModel()
    quantized.load_state_dict(pretrained)
    quantize_base(quantized)
    load_adapter(quantized, path)
    assert torch.equal(quantized(tokens), model(tokens))


def test_a_quantized_model_refuses_adapters_trained_on_the_unquantized_base(tmp_path):
    model = TinyModel()
    pretrained = {key: value.clone() for key, value in model.state_dict().items()}
    apply_lora(model, LoRAConfig(targets=TARGETS))
    path = save_adapter(model, tmp_path / "plain.lora.safetensors")
    quantized = TinyModel()
    quantized.load_state_dict(pretrained)
    quantize_base(quantized)
    with pytest.raises(ValueError, match=r"8 of this model's base weights are quantized and were not .*load the base weights unquantized"):
        load_adapter(quantized, path)


def test_training_on_an_nf4_base_keeps_it_nf4_and_the_adapter_file_reproduces_the_outputs(tmp_path):
    torch.manual_seed(0)
    module = Classifier(lr=3e-2)
    pretrained = {key: value.clone() for key, value in module.state_dict().items()}
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=4,
        callbacks=[LoRACallback(r=4, alpha=8, targets=TARGETS, quantize="nf4"), checkpoints],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    batches = data()
    first_loss = trainer.validate(module, batches, verbose=False)[0]["val_loss"]
    assert sorted(_nf4_layers(module.net)) == sorted(
        f"{name}.original_module" if name.endswith(tuple(TARGETS)) else name for name in QUANTIZED
    )
    stored = {name: _layer(module.net, name).weight.quantized_data.clone() for name in QUANTIZED}
    trainer.fit(module, batches, batches)
    last_loss = trainer.validate(module, batches, verbose=False)[0]["val_loss"]
    assert last_loss < 0.8 * first_loss
    for name in QUANTIZED:  # still NF4, and the very same 4-bit codes
        weight = _layer(module.net, name).weight
        assert isinstance(weight, NF4Tensor) and torch.equal(weight.quantized_data, stored[name])

    checkpoint = torch.load(checkpoints.last_model_path, weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if key != MARKER_KEY and "matrix_" not in key]
    fresh = Classifier()
    fresh.load_state_dict(pretrained)
    quantize_base(fresh)
    load_adapter(fresh, adapter_path_for(checkpoints.last_model_path))
    tokens = next(iter(batches))[0]
    module.eval()
    fresh.eval()
    expected = module(tokens)
    assert torch.equal(fresh(tokens), expected)

    resumed = Classifier()  # a LoRACallback starting from the adapter file quantizes the base first
    resumed.load_state_dict(pretrained)
    callback = LoRACallback(adapter_path=adapter_path_for(checkpoints.last_model_path))
    L.Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False, enable_progress_bar=False).validate(resumed, batches, verbose=False)
    assert callback.config.quantize == "nf4" and sorted(_nf4_layers(resumed.net)) == sorted(_nf4_layers(module.net))
    assert torch.equal(resumed.eval()(tokens), expected)

    unquantized = Classifier()  # the slim checkpoint: no base weights, fingerprint of the NF4 base
    unquantized.load_state_dict(pretrained)
    with pytest.raises(ValueError, match=r"checkpoint was trained on different base weights.*quantize_base\(model, 'nf4'\)"):
        load_checkpoint(unquantized, checkpoints.last_model_path)
    quantize_base(unquantized)
    load_checkpoint(unquantized, checkpoints.last_model_path)
    assert torch.equal(unquantized.eval()(tokens), expected)



class _Linear4bit(nn.Linear):
    """Stands for bitsandbytes' Linear4bit where bitsandbytes is not installed."""


def test_bitsandbytes_4bit_layers_are_refused_with_the_way_out(monkeypatch):
    # recognised by module and class name, as bitsandbytes is never imported by the package
    monkeypatch.setitem(sys.modules, "bitsandbytes.nn", type(sys)("bitsandbytes.nn"))
    monkeypatch.setattr(sys.modules["bitsandbytes.nn"], "Linear4bit", _Linear4bit, raising=False)
    model = nn.Sequential(_Linear4bit(64, 128, bias=False), nn.ReLU(), nn.Linear(128, 2))
    with pytest.raises(TypeError, match=r"cannot adapt module '0' of type \w+: bitsandbytes' 4-bit layers .*quantize='nf4'"):
        apply_lora(model, LoRAConfig(targets=["0"]))
    assert not lora_modules(model)


def test_dora_on_an_already_quantized_base_is_refused():
    model = TinyModel()
    quantize_base(model)
    before = {k: v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"use_dora=True needs a floating-point base weight, got one quantized \(nf4\)"):
        apply_lora(model, LoRAConfig(targets=["qkv"], use_dora=True))
    assert not lora_modules(model) and model.state_dict().keys() == before.keys()


def test_deepcopy_of_an_nf4_model_copies_the_stored_codes_exactly():
    import copy

    from lightning_lora.quantize import quantized_format, stored_parts

    torch.manual_seed(0)  # 64 x 192 weights: 192 blocks, which 256 does not divide (torchao's own copy fails)
    model = nn.Sequential(nn.Linear(64, 192), nn.ReLU(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 8))
    apply_lora(model, LoRAConfig(r=4, targets=["0", "2"], quantize="nf4", adapter_dtype="float32"))
    randomize_adapters(model)
    copied = copy.deepcopy(model)
    x = torch.randn(3, 64)
    assert torch.equal(copied(x), model(x))
    pairs = [(p, q) for p, q in zip(model.parameters(), copied.parameters()) if quantized_format(p)]
    assert len(pairs) == 2
    for original, copy_ in pairs:
        assert isinstance(copy_, nn.Parameter) and not copy_.requires_grad and quantized_format(copy_) == "nf4"
        for a, b in zip(stored_parts(original).values(), stored_parts(copy_).values()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # the same codes, in new storage


@pytest.mark.parametrize("averaging", ["WeightAveraging", "StochasticWeightAveraging"])
def test_weight_averaging_over_an_nf4_base_is_refused_before_training(averaging, tmp_path):
    from lightning.pytorch import callbacks

    model = Classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    callback = callbacks.WeightAveraging() if averaging == "WeightAveraging" else callbacks.StochasticWeightAveraging(swa_lrs=0.01)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[LoRACallback(targets=["all-linear"], quantize="nf4", adapter_dtype="float32"), callback])
    with pytest.raises(Exception, match=rf"quantize='nf4' cannot be combined with {averaging}: torch's AveragedModel averages every parameter"):
        trainer.fit(model, data())
    assert not lora_modules(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

"""DoRA against PEFT's own DoRA: outputs and gradients on equal weights, merged models, the PEFT format both ways."""

import json

import peft
import pytest
import torch
from hf_models import DORA_MODELS
from hf_models import logits as hf_logits
from safetensors.torch import load_file, save_file

from lightning_lora import LoRAConfig, apply_lora, export_peft, import_peft, lora_modules, merge_and_unload
from lightning_lora.tasks import task_type

TOLERANCE = 1e-5
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
MODELS = DORA_MODELS


def logits(model, tokens=TOKENS):
    return hf_logits(model, tokens)


def pair(name, dropout=0.0):
    """(factory, base state, ours, PEFT's): the same base and the same non-zero DoRA weights."""
    factory, targets = MODELS[name]
    torch.manual_seed(0)
    base = factory()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = factory()
    ours.load_state_dict(state)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=targets, use_dora=True, dropout=dropout))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, lora_dropout=dropout,
                             task_type=task_type(base))  # both train BERT's new classifier
    theirs = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module_name, adapter in lora_modules(ours).items():
            layer = theirs.base_model.model.get_submodule(module_name)
            a, b, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(adapter.magnitude, m, rtol=TOLERANCE, atol=0)  # both start at ||W||
            a.copy_(torch.randn(a.shape, generator=generator) * 0.2)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.2)
            m.mul_(1 + 0.2 * torch.rand(m.shape, generator=generator))
            adapter.matrix_A.weight.copy_(a)
            adapter.matrix_B.weight.copy_(b)
            adapter.magnitude.copy_(m)
    return factory, state, ours, theirs


def peft_params(theirs, module_name):
    layer = theirs.base_model.model.get_submodule(module_name)
    return {
        "matrix_A.weight": layer.lora_A["default"].weight,
        "matrix_B.weight": layer.lora_B["default"].weight,
        "magnitude": layer.lora_magnitude_vector["default"].weight,
    }


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["eval", "train_dropout"])
def test_outputs_and_gradients_equal_peft_dora(name, mode):
    dropout = 0.1 if mode == "train_dropout" else 0.0
    _, _, ours, theirs = pair(name, dropout)
    if mode == "train_dropout":
        ours.train()
        theirs.train()
    torch.manual_seed(5)  # the same dropout masks: both draw them in the same order
    out = logits(ours)
    torch.manual_seed(5)
    expected = logits(theirs)
    torch.testing.assert_close(out, expected, rtol=TOLERANCE, atol=TOLERANCE)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * target).sum().backward()
    (expected * target).sum().backward()
    for module_name, adapter in lora_modules(ours).items():
        reference = peft_params(theirs, module_name)
        for key, param in adapter.adapter_params().items():
            assert param.grad is not None and param.grad.abs().sum() > 0, (module_name, key)
            torch.testing.assert_close(param.grad, reference[key].grad, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", MODELS)
def test_merged_models_equal_peft_merged_models(name):
    _, _, ours, theirs = pair(name)
    with torch.no_grad():
        merged_peft = theirs.merge_and_unload()
        merged_ours = merge_and_unload(ours)
        torch.testing.assert_close(logits(merged_ours), logits(merged_peft), rtol=TOLERANCE, atol=TOLERANCE)


def test_export_to_peft_loads_in_peft_with_its_keys_and_outputs(tmp_path):
    factory, state, ours, theirs = pair("bert")
    export_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["lora_bias"] is False
    base = factory()
    base.load_state_dict(state)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), logits(ours), rtol=TOLERANCE, atol=TOLERANCE)
    written = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    theirs.save_pretrained(tmp_path / "theirs")
    expected = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(written) == set(expected) and any(key.endswith(".lora_magnitude_vector") for key in written)
    assert all(written[key].shape == expected[key].shape for key in written)


@pytest.mark.parametrize("name", MODELS)
def test_peft_save_pretrained_imports_with_peft_outputs(name, tmp_path):
    factory, state, _, theirs = pair(name)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = factory()
    ours.load_state_dict(state)
    names = import_peft(ours, tmp_path / "theirs")
    assert names and all(adapter.use_dora for adapter in lora_modules(ours).values())
    with torch.no_grad():
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=TOLERANCE, atol=TOLERANCE)


def test_a_peft_dora_adapter_without_magnitudes_is_refused(tmp_path):
    factory, state, _, theirs = pair("llama")
    theirs.save_pretrained(tmp_path / "theirs")
    weights = tmp_path / "theirs" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "magnitude" not in k}, weights)
    model = factory()
    model.load_state_dict(state)
    before = str(model)
    with pytest.raises(ValueError, match=r"sets use_dora=true but has no lora_magnitude_vector for module 'model.layers.0.mlp.down_proj'"):
        import_peft(model, tmp_path / "theirs")
    assert str(model) == before


"""LoRA on the fused 3-D expert weights of transformers v5 MoE models (Qwen3-MoE, Mixtral, gpt-oss from configs).

Against PEFT's ``target_parameters``: the same per-expert update, scaling, trainable parameter count,
outputs and gradients (float32, 1e-5), and PEFT's own file layout both ways.
"""

import json
import warnings

import peft
import pytest
import torch
from hf_models import MOE_MODELS, qwen3_moe
from safetensors.torch import load_file
from vllm_loader import read_with_vllm

from lightning_lora import (
    LoRAConfig,
    apply_lora,
    disable_adapters,
    export_peft,
    import_peft,
    load_adapter,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lightning_lora.adapters import ExpertsContainer, LoRAExperts

TOLERANCE = 1e-5
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
TARGETS = ["q_proj", *EXPERTS]
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
# a per-parameter rank and alpha, as PEFT's patterns give them (matched against module.parameter)
PATTERNS = {"rank_pattern": {"layers.1.mlp.experts.down_proj": 2}, "alpha_pattern": {"layers.0.mlp.experts.gate_up_proj": 4}}


def logits(model):
    return model(input_ids=TOKENS).logits


def randomize(model, seed=1):
    """Non-zero adapters, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            for param in adapter.adapter_params().values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def pair(name):
    """(base state, ours, PEFT's): equal base weights and equal adapters."""
    torch.manual_seed(0)
    base = MOE_MODELS[name]()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    ours = MOE_MODELS[name]()
    ours.load_state_dict(state)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, bias=False, targets=TARGETS, **PATTERNS))
    randomize(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, **PATTERNS)
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for adapter_name, (a, b) in peft_factors(theirs, ours).items():
            adapter = lora_modules(ours)[adapter_name]
            a.copy_(adapter.matrix_A.weight)
            b.copy_(adapter.matrix_B.weight)
    return state, ours, theirs


def peft_factors(theirs, ours):
    """Our adapter name -> PEFT's (lora_A, lora_B) weights: gate_up_proj's wrapper sits under experts.base_layer."""
    found = {}
    for name in lora_modules(ours):
        owner, _, parameter = name.rpartition(".")
        path = f"{owner}.base_layer" if parameter == "gate_up_proj" else owner if parameter == "down_proj" else name
        layer = theirs.base_model.model.get_submodule(path)
        found[name] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    return found


@pytest.mark.parametrize("name", MOE_MODELS)
def test_expert_weights_are_targets_with_one_adapter_per_expert_read_from_the_models_layout(name):
    torch.manual_seed(0)
    model = MOE_MODELS[name]()
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, bias=False, targets=TARGETS))
    assert names == [
        f"model.layers.{i}.{module}" for i in (0, 1) for module in ("self_attn.q_proj", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    ]
    container = model.model.layers[0].mlp.experts
    assert isinstance(container, ExpertsContainer)
    gate_up = lora_modules(model)["model.layers.0.mlp.experts.gate_up_proj"]
    assert isinstance(gate_up, LoRAExperts) and gate_up.kind == ("experts_transposed" if name == "gpt_oss" else "experts")
    experts, hidden, intermediate = 4, 32, 24
    assert gate_up.matrix_A.weight.shape == (4 * experts, hidden) and gate_up.matrix_B.weight.shape == (2 * intermediate, 4 * experts)
    assert not container.original_module.gate_up_proj.requires_grad
    assert all(not p.requires_grad for n, p in model.named_parameters() if "_bias" in n)  # expert biases stay frozen
    theirs = peft.get_peft_model(MOE_MODELS[name](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS))
    assert sum(p.numel() for p in lora_parameters(model)) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_a_fresh_adapter_computes_the_model_bit_for_bit(name):
    torch.manual_seed(0)
    model = MOE_MODELS[name]()
    with torch.no_grad():
        expected = logits(model)
    apply_lora(model, LoRAConfig(targets=EXPERTS))
    assert torch.equal(logits(model), expected)  # grad mode
    with torch.no_grad():
        assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_outputs_and_gradients_equal_pefts_target_parameters(name):
    _, ours, theirs = pair(name)
    out, expected = logits(ours), logits(theirs)
    torch.testing.assert_close(out, expected, rtol=TOLERANCE, atol=TOLERANCE)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for adapter_name, (a, b) in peft_factors(theirs, ours).items():
        adapter = lora_modules(ours)[adapter_name]
        scale = max(a.grad.abs().max(), b.grad.abs().max())
        torch.testing.assert_close(adapter.matrix_A.weight.grad / scale, a.grad / scale, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(adapter.matrix_B.weight.grad / scale, b.grad / scale, rtol=0, atol=TOLERANCE)
    assert lora_modules(ours)["model.layers.1.mlp.experts.down_proj"].r == 2
    assert lora_modules(ours)["model.layers.0.mlp.experts.gate_up_proj"].scaling == 4 / 4


def test_the_update_is_computed_without_a_per_expert_delta_weight():
    _, ours, _ = pair("qwen3_moe")
    ours.train()
    weight = ours.model.layers[0].mlp.experts.original_module.gate_up_proj
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits(ours).sum().backward()
    weight_sized = [t for t in saved if t.numel() >= weight.numel()]
    bases = {p.data_ptr() for n, p in ours.named_parameters() if "experts.original_module" in n}
    assert weight_sized and all(t.data_ptr() in bases for t in weight_sized)  # only the frozen expert weights themselves


@pytest.mark.parametrize("name", MOE_MODELS)
def test_merge_in_float32_unmerge_bit_exact_and_unload_to_the_plain_model(name):
    state, ours, _ = pair(name)
    with torch.no_grad():
        adapted = logits(ours)
        merge_lora(ours)
        torch.testing.assert_close(logits(ours), adapted, rtol=TOLERANCE, atol=TOLERANCE)
        unmerge_lora(ours)
        restored = {k.replace(".original_module", ""): v for k, v in ours.state_dict().items() if "matrix_" not in k}
        assert all(torch.equal(restored[key], value) for key, value in state.items())
        assert torch.equal(logits(ours), adapted)
        plain = merge_and_unload(ours)
        assert type(plain.model.layers[0].mlp.experts).__name__.endswith("Experts")
        torch.testing.assert_close(logits(plain), adapted, rtol=TOLERANCE, atol=TOLERANCE)
        torch.manual_seed(0)
        fresh = MOE_MODELS[name]()
        fresh.load_state_dict(plain.state_dict(), strict=True)


def test_adapter_files_and_the_base_fingerprint_cover_expert_weights(tmp_path):
    state, ours, _ = pair("qwen3_moe")
    save_adapter(ours, tmp_path / "moe.lora.safetensors")
    stored = load_file(tmp_path / "moe.lora.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj.matrix_A.weight" in stored
    torch.manual_seed(0)
    fresh = qwen3_moe()
    fresh.load_state_dict(state)
    load_adapter(fresh, tmp_path / "moe.lora.safetensors")
    with torch.no_grad():
        assert torch.equal(logits(fresh), logits(ours))
    other = qwen3_moe()
    other.load_state_dict(state)
    with torch.no_grad():
        other.model.layers[1].mlp.experts.down_proj.mul_(1.5)  # only an expert weight differs
    with pytest.raises(ValueError, match=r"was trained on different base weights"):
        load_adapter(other, tmp_path / "moe.lora.safetensors")
    assert not lora_modules(other)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_export_loads_in_peft_with_its_own_keys_and_logits(name, tmp_path):
    state, ours, theirs = pair(name)
    export_peft(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written, expected = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(n for n in lora_modules(ours) if "experts" in n)
    torch.manual_seed(0)
    fresh = MOE_MODELS[name]()
    fresh.load_state_dict(state)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), logits(ours), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_import_of_pefts_own_expert_adapters(name, tmp_path):
    state, ours, theirs = pair(name)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    fresh = MOE_MODELS[name]()
    fresh.load_state_dict(state)
    assert import_peft(fresh, tmp_path / "theirs") == list(lora_modules(ours))
    assert all(torch.equal(lora_state_dict(fresh)[k], v) for k, v in lora_state_dict(ours).items())
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh), logits(theirs), rtol=TOLERANCE, atol=TOLERANCE)


def test_vllm_export_pairs_expert_weights_and_pads_each_experts_rank(tmp_path):
    torch.manual_seed(0)
    base = qwen3_moe()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    apply_lora(base, LoRAConfig(r=4, alpha=8, bias=False, targets=["q_proj", "experts.gate_up_proj"]))
    randomize(base)
    export_peft(base, tmp_path / "vllm", target="vllm")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    assert config["r"] == config["lora_alpha"] == 8
    down = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"  # the untrained down_proj, zeros
    assert tensors[down].shape == (32, 8 * 4) and not tensors[down].any()
    assert tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (8 * 4, 32)
    torch.manual_seed(0)
    fresh = qwen3_moe()
    fresh.load_state_dict(state)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "vllm").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), logits(base), rtol=TOLERANCE, atol=TOLERANCE)


def test_vllm_reads_the_expert_export_with_its_own_loader(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = qwen3_moe()
    apply_lora(model, LoRAConfig(r=4, alpha=8, bias=False, targets=TARGETS, rank_pattern={"layers.1.mlp.experts.down_proj": 2}))
    randomize(model)
    export_peft(model, tmp_path, target="vllm")
    loaded = read_with_vllm(tmp_path, {"q_proj", "k_proj", "v_proj", "o_proj", "experts"}, monkeypatch)
    for name, adapter in lora_modules(model).items():
        owner, _, parameter = name.rpartition(".")
        a, b, scaling = loaded[f"{owner}.base_layer" if parameter == "gate_up_proj" else owner if parameter == "down_proj" else name]
        if isinstance(adapter, LoRAExperts):  # vLLM reads A as (experts, rank, in) and B as (out, rank, experts)
            a = a.reshape(adapter.num_experts, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, adapter.num_experts)
            torch.testing.assert_close(scaling * torch.einsum("ore,eri->eoi", b, a), adapter.delta_weight(), rtol=TOLERANCE, atol=TOLERANCE)
        else:
            torch.testing.assert_close(scaling * b @ a, adapter.delta_weight(), rtol=TOLERANCE, atol=TOLERANCE)


def test_all_linear_warns_once_when_most_weights_stay_frozen_in_experts():
    torch.manual_seed(0)
    model = qwen3_moe()
    with pytest.warns(UserWarning, match=r"targets 'all-linear' adapt linear layers only \(as PEFT's\), and leave 4 expert weights "
                                         r"frozen .*% of the model's weights; add \['experts.down_proj', 'experts.gate_up_proj'\]"):
        apply_lora(model, LoRAConfig(targets=["all-linear"]))
    assert not [n for n in lora_modules(model) if "experts" in n]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(qwen3_moe(), LoRAConfig(targets=["all-linear", *EXPERTS]))  # nothing left out: no warning


def test_refusals_name_what_expert_weights_cannot_take():
    cases = [
        (LoRAConfig(targets=EXPERTS, bias=True), ValueError, r"cannot adapt module 'model.layers.0.mlp.experts.gate_up_proj': expert weights take adapters without bias"),
        (LoRAConfig(targets=EXPERTS, dropout=0.1), ValueError, r"expert weights take adapters without dropout \(as PEFT's target_parameters\), got dropout=0.1"),
        (LoRAConfig(targets=EXPERTS, use_dora=True), ValueError, r"use_dora=True is supported on nn.Linear and transformers' Conv1D layers only, not on ExpertsWeight"),
        (LoRAConfig(targets=EXPERTS, quantize="nf4"), ValueError, r"quantize='nf4' holds linear layers in 4 bits, not expert weights"),
        (LoRAConfig(targets=["experts.gate_proj"]), ValueError, r"targets pattern 'experts.gate_proj' matched no module; closest names: .*gate_up_proj"),
    ]
    for config, error, message in cases:
        torch.manual_seed(0)
        model = qwen3_moe()
        before = dict(model.state_dict())
        with pytest.raises(error, match=message):
            apply_lora(model, config)
        assert not lora_modules(model) and dict(model.state_dict()).keys() == before.keys()


def test_disable_adapters_runs_the_experts_alone():
    torch.manual_seed(0)
    model = qwen3_moe()
    with torch.no_grad():
        base = logits(model)
    apply_lora(model, LoRAConfig(targets=EXPERTS))
    randomize(model)
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(logits(model), base)
    with torch.no_grad():
        assert not torch.equal(logits(model), base)

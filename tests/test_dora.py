"""DoRA: identity at init, exact merge, the norm cache, files, checkpoints, refusals (PEFT itself: test_dora_peft.py)."""

import lightning as L
import pytest
import torch
from hf_models import DORA_MODELS, gpt2, llama
from hf_models import logits as hf_logits
from lightning_models import Classifier, data
from safetensors.torch import load_file
from torch import nn

import lightning_lora.adapters.dora as dora_module
from lightning_lora import (
    LoRA,
    LoRACallback,
    LoRAConfig,
    apply_lora,
    export_peft,
    load_adapter,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lightning_lora.adapters import AdapterSpec, LoRAConv, LoRAEmbedding

TOLERANCE = 1e-5
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


MODELS = DORA_MODELS


def logits(model, tokens=TOKENS):
    return hf_logits(model, tokens)


def trained(name, dropout=0.0):
    """(factory, base state, ours): a base model and a copy adapted with non-zero DoRA weights (as after training)."""
    factory, targets = MODELS[name]
    torch.manual_seed(0)
    base = factory()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = factory()
    ours.load_state_dict(state)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=targets, use_dora=True, dropout=dropout))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in lora_modules(ours).values():
            for key, param in adapter.adapter_params().items():
                if key == "magnitude":
                    param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return factory, state, ours


@pytest.mark.parametrize("name", MODELS)
def test_a_fresh_dora_adapter_computes_the_base_model_bit_for_bit(name):
    factory, targets = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    expected = logits(model).detach()
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=targets, use_dora=True))
    assert all(adapter.use_dora and not adapter.has_bias for adapter in lora_modules(model).values())
    assert torch.equal(logits(model), expected)  # grad mode: the autograd node
    with torch.no_grad():
        assert torch.equal(logits(model), expected)


def test_a_bias_free_linear_is_exact_at_init_too():
    torch.manual_seed(0)
    linear = nn.Linear(24, 12, bias=False)
    x = torch.randn(3, 5, 24)
    layer = LoRA(linear, bias=False, r=4, alpha=8, use_dora=True)
    assert torch.equal(layer(x), linear(x))
    torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(linear.weight, dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unmerge_are_exact_and_merged_equals_unmerged(name):
    _, state, ours = trained(name)
    with torch.no_grad():
        unmerged = logits(ours)
        merge_lora(ours)
        torch.testing.assert_close(logits(ours), unmerged, rtol=TOLERANCE, atol=TOLERANCE)
        unmerge_lora(ours)
        after = {k.replace(".original_module", ""): v for k, v in ours.state_dict().items()}
        assert all(torch.equal(after[key], value) for key, value in state.items())  # the base, bit for bit
        assert torch.equal(logits(ours), unmerged)
        merged_ours = merge_and_unload(ours)
        assert type(merged_ours.get_submodule(next(iter(state)).rpartition(".")[0])) is not LoRA
        torch.testing.assert_close(logits(merged_ours), unmerged, rtol=TOLERANCE, atol=TOLERANCE)


def test_backward_saves_no_weight_sized_tensor_besides_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    layer = LoRA(linear, bias=False, r=4, use_dora=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(torch.randn(6, 48, requires_grad=True))
    weight_sized = [t for t in saved if t.numel() >= linear.weight.numel()]
    assert [t.data_ptr() for t in weight_sized] == [linear.weight.data_ptr()]  # the frozen weight itself
    out.sum().backward()


def test_the_norm_is_kept_while_the_weights_are_unchanged_and_follows_every_change(monkeypatch):
    torch.manual_seed(0)
    layer = LoRA(nn.Linear(16, 8), bias=False, r=2, use_dora=True)
    calls = []
    compute = dora_module.weight_norm
    monkeypatch.setattr(dora_module, "weight_norm", lambda *args: calls.append(1) or compute(*args))
    x = torch.randn(4, 16)
    first = layer(x)  # grad mode: computed
    with torch.no_grad():
        assert torch.equal(layer(x), first) and torch.equal(layer(x), first)
    assert len(calls) == 1  # no grad, nothing changed: not computed again
    optimizer = torch.optim.AdamW(layer.adapter_params().values(), lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        stepped = layer(x)
        fresh = LoRA(nn.Linear(16, 8), bias=False, r=2, use_dora=True)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(stepped, fresh(x))  # recomputed after the step, as a layer without history
        layer.matrix_B.weight.copy_(torch.zeros_like(layer.matrix_B.weight))
        torch.testing.assert_close(layer.variant.weight_norm(), torch.linalg.vector_norm(layer.original_module.weight, dim=1))


def test_adapter_file_round_trip_and_old_files_read_as_plain_lora(tmp_path):
    factory, state, ours = trained("gpt2")
    path = save_adapter(ours, tmp_path / "dora.lora.safetensors")
    fresh = factory()
    fresh.load_state_dict(state)
    load_adapter(fresh, path)
    assert all(adapter.use_dora for adapter in lora_modules(fresh).values())
    with torch.no_grad():
        assert torch.equal(logits(fresh), logits(ours))
    assert any(key.endswith(".magnitude") for key in load_file(path))
    old = {"kind": "linear", "r": 4, "alpha": 8.0, "bias": False, "dropout": 0.0, "use_rslora": False, "adapter_dtype": "float32"}
    assert AdapterSpec.from_dict(old).use_dora is False


def test_a_dora_file_does_not_load_into_plain_adapters_and_back(tmp_path):
    factory, state, ours = trained("llama")
    dora_path = save_adapter(ours, tmp_path / "dora.lora.safetensors")
    plain = factory()
    plain.load_state_dict(state)
    apply_lora(plain, LoRAConfig(r=4, alpha=8, targets=MODELS["llama"][1]))
    with pytest.raises(ValueError, match=r"does not fit module '.*q_proj': use_dora=True in the file, False in the model"):
        load_adapter(plain, dora_path)
    plain_path = save_adapter(plain, tmp_path / "plain.lora.safetensors")
    with pytest.raises(ValueError, match=r"use_dora=False in the file, True in the model"):
        load_adapter(ours, plain_path)


def test_slim_checkpoints_carry_the_magnitude(tmp_path):
    model = Classifier()
    run = L.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                    logger=False, callbacks=[LoRACallback(targets=["qkv"], use_dora=True)])
    run.fit(model, data())
    run.save_checkpoint(tmp_path / "slim.ckpt")
    assert all(adapter.use_dora for adapter in lora_modules(model).values())
    stored = torch.load(tmp_path / "slim.ckpt", weights_only=True)["state_dict"]
    magnitudes = [key for key in stored if key.endswith(".magnitude")]
    assert magnitudes and all(torch.equal(stored[key], model.state_dict()[key]) for key in magnitudes)
    assert not any(key.endswith("original_module.weight") for key in stored)


def test_training_with_dora_changes_the_magnitude_and_lowers_the_loss():
    torch.manual_seed(0)
    model = llama().train()
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], use_dora=True))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    before = {k: v.clone() for k, v in lora_state_dict(model).items() if k.endswith("magnitude")}
    losses = []
    for _ in range(5):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = lora_state_dict(model)
    assert all(not torch.equal(after[key], value) for key, value in before.items())


# --- errors ------------------------------------------------------------------------------------


def test_dora_with_an_adapter_bias_is_refused():
    with pytest.raises(ValueError, match=r"use_dora=True needs bias=False or 'auto': DoRA's update has no bias \(as in PEFT\), got bias=True"):
        LoRAConfig(use_dora=True, bias=True)
    with pytest.raises(ValueError, match=r"use_dora=True needs bias=False or 'auto': DoRA's update has no bias \(as in PEFT\), got bias=True"):
        AdapterSpec(kind="linear", r=2, alpha=1.0, bias=True, dropout=0.0, use_rslora=False, adapter_dtype="float32",
                    variant="dora")
    with pytest.raises(ValueError, match=r"use_dora=True needs bias=False or 'auto': .* got bias=True"):
        LoRA(nn.Linear(8, 8), use_dora=True)
    with pytest.raises(TypeError, match=r"use_dora must be True or False, got 'yes'"):
        LoRAConfig(use_dora="yes")


@pytest.mark.parametrize(
    ("make", "layer_type"),
    [(lambda: LoRAConv(nn.Conv2d(4, 6, 3), bias=False, use_dora=True), "Conv2d"),
     (lambda: LoRAEmbedding(nn.Embedding(10, 6), bias=False, use_dora=True), "Embedding")],
)
def test_dora_on_convolutions_and_embeddings_is_refused(make, layer_type):
    with pytest.raises(ValueError, match=rf"use_dora=True is supported on nn.Linear and transformers' Conv1D layers only, "
                                         rf"not on {layer_type}; leave this layer out of the targets or set use_dora=False"):
        make()


def test_apply_lora_names_the_module_dora_cannot_adapt_and_leaves_the_model_unchanged():
    model = gpt2()
    before = str(model)
    with pytest.raises(ValueError, match=r"cannot adapt module 'transformer.wte': use_dora=True is supported on nn.Linear"):
        apply_lora(model, LoRAConfig(targets=["c_attn", "wte"], use_dora=True))
    assert str(model) == before


def test_vllm_export_of_dora_is_refused(tmp_path):
    _, _, ours = trained("llama")
    with pytest.raises(ValueError, match=r"vLLM serves no DoRA adapters \(use_dora\), but modules \[.*q_proj.*\] use "
                                         r"DoRA; export with target='peft', or serve the model with its adapters merged"):
        export_peft(ours, tmp_path / "vllm", target="vllm")
    assert not (tmp_path / "vllm").exists()


def test_export_of_mixed_dora_and_plain_adapters_is_refused(tmp_path):
    model = llama()
    apply_lora(model, LoRAConfig(targets=["q_proj"], use_dora=True))
    apply_lora(model, LoRAConfig(targets=["v_proj"]))
    with pytest.raises(ValueError, match="PEFT has one use_dora for all modules, but the adapter mixes DoRA and plain LoRA modules"):
        export_peft(model, tmp_path / "peft")




@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_dora_inside_and_on_tensors_of_inference_mode_equals_no_grad(name, tmp_path):
    factory, state, ours = trained(name)
    targets = MODELS[name][1]
    path = tmp_path / "dora.lora.safetensors"
    save_adapter(ours, path)
    results = {}
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():  # as a serving process loads an adapter
            model = factory()
            model.load_state_dict(state)
            load_adapter(model, path)
            loaded = logits(model)
            merge_lora(model)
            merged = logits(model)
        with mode():
            made = factory()  # weights created under the mode, adapted outside it
            made.load_state_dict(state)
        apply_lora(made, LoRAConfig(r=4, alpha=8, targets=targets, use_dora=True))
        with mode():
            fresh = logits(made)
            fresh_again = logits(made)  # the cached norm of no-grad mode, recomputed for inference tensors
            inner = factory()
            inner.load_state_dict(state)
            apply_lora(inner, LoRAConfig(r=4, alpha=8, targets=targets, use_dora=True))
            adapted_inside = logits(inner)
        results[mode] = [t.clone() for t in (loaded, merged, fresh, fresh_again, adapted_inside)]
    assert all(torch.equal(a, b) for a, b in zip(results[torch.no_grad], results[torch.inference_mode]))
    assert torch.equal(results[torch.no_grad][2], results[torch.no_grad][3])
    torch.testing.assert_close(results[torch.no_grad][0], results[torch.no_grad][1], atol=TOLERANCE, rtol=TOLERANCE)


def test_training_a_dora_layer_over_a_weight_made_in_inference_mode():
    torch.manual_seed(0)
    with torch.inference_mode():
        linear = nn.Linear(16, 8)
    layer = LoRA(linear, bias=False, r=2, use_dora=True)
    layer(torch.randn(4, 16)).square().sum().backward()  # the input needs no gradient: the weight is not saved
    assert layer.magnitude.grad is not None and layer.matrix_A.weight.grad is not None


def _with_dead_rows(dtype=torch.float32):
    """A linear layer with a zero row (a dead unit) and a row whose norm underflows float32."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight[2].zero_()
        linear.weight[5].fill_(1e-30)  # its square underflows float32: norm 0 too
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_direction_are_no_nan_at_init_forward_backward_and_merge(dtype):
    base = _with_dead_rows(dtype)
    layer = LoRA(base, bias=False, r=2, alpha=4, use_dora=True)
    x = torch.randn(5, 16, dtype=dtype)
    with torch.no_grad():
        expected = base(x)
    assert torch.equal(layer(x), expected) or dtype == torch.bfloat16 and torch.allclose(layer(x), expected, atol=1e-28)
    optimizer = torch.optim.AdamW(layer.adapter_params().values(), lr=0.1)
    for _ in range(3):  # training: gradients and steps stay finite, and the dead row stays as the base's
        optimizer.zero_grad()
        out = layer(x)
        assert torch.isfinite(out).all()
        out.square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.adapter_params().values())
        optimizer.step()
    with torch.no_grad():
        adapted = layer(x)
        assert torch.equal(adapted[:, 2], base.bias[2].expand(5))  # the dead unit still outputs its bias
        weight = base.weight.clone()
        layer.merge()
        assert torch.isfinite(base.weight).all()
        torch.testing.assert_close(layer(x), adapted, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
        layer.unmerge()
        assert torch.equal(base.weight, weight)


def test_a_zero_initialised_layer_is_the_identity_and_trains_no_nan():
    base = nn.Linear(8, 4)
    nn.init.zeros_(base.weight)
    layer = LoRA(base, bias=False, r=2, use_dora=True)
    x = torch.randn(3, 8, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, base(x))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.magnitude.grad).all()


def test_peft_export_of_rows_without_direction_is_refused(tmp_path):
    model = nn.Sequential(_with_dead_rows(), nn.ReLU(), nn.Linear(8, 2))
    apply_lora(model, LoRAConfig(r=2, targets=["0"], use_dora=True))
    with pytest.raises(ValueError, match=r"cannot export DoRA module '0' to PEFT: its rows \[2, 5\] have magnitude 0 .* 0 / 0 = NaN"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_merge_never_writes_a_non_finite_value():
    layer = LoRA(nn.Linear(8, 4), bias=False, r=2)
    with torch.no_grad():
        layer.matrix_B.weight[1, 0] = float("inf")
    weight = layer.original_module.weight.clone()
    with pytest.raises(RuntimeError, match=r"merging would write non-finite values \(at \[\[1, "):
        layer.merge()
    assert torch.equal(layer.original_module.weight, weight) and not layer.merged

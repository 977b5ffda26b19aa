"""Round trips against the real PEFT library on BERT-, GPT-2- and Llama-shaped models built from configs.

ours -> PEFT: ``PeftModel.from_pretrained`` gives the same logits, with exactly PEFT's own key set;
PEFT -> ours: ``import_peft`` gives PEFT's logits; ours -> PEFT -> ours: the same tensors again.
"""

import json

import lightning as L
import peft
import pytest
import torch
from hf_models import bert, gpt2, llama
from vllm_loader import load_with_vllm, read_with_vllm

from lightning_lora import (
    LoRAConfig,
    apply_lora,
    export_peft,
    import_peft,
    load_adapter,
    lora_modules,
    lora_state_dict,
    save_adapter,
)
from lightning_lora.surgery.state import trainable_modules

TOLERANCE = 1e-5
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


# (model factory, our config, what PEFT's own config for the same adapters would be)
CASES = {
    "bert": (bert, LoRAConfig(r=4, alpha=8, targets=["query", "value", "word_embeddings"], bias=False,
                              rank_pattern={"layer.1.attention.self.query": 2}, trainable=["classifier"])),
    "bert-bias-rslora": (bert, LoRAConfig(r=4, alpha=8, targets=["query", "value"], bias="auto", use_rslora=True,
                                          alpha_pattern={"layer.0.attention.self.value": 3.0})),
    "gpt2": (gpt2, LoRAConfig(r=4, alpha=16, targets=["c_attn", "c_fc"], bias="auto", rank_pattern={"h.1.attn.c_attn": 8})),
    "gpt2-embedding": (gpt2, LoRAConfig(r=4, alpha=16, targets=["c_attn", "wte"], bias=False)),
    "llama": (llama, LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "embed_tokens"],
                                alpha_pattern={"layers.1.self_attn.v_proj": 4.0})),
}


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def trained(name):
    factory, config = CASES[name]
    torch.manual_seed(0)
    model = factory()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, config)
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            for param in adapter.adapter_params().values():
                param.normal_(0, 0.2)
        for module in trainable_modules(model).values():  # given, or BERT's new classifier
            for param in module.parameters():
                param.add_(0.1)
    model.eval()
    return factory, base, model


def fresh(factory, base):
    model = factory()
    model.load_state_dict(base)
    return model.eval()


@pytest.mark.parametrize("name", CASES)
def test_ours_to_peft_gives_the_same_logits_and_peft_keys(name, tmp_path):
    factory, base, model = trained(name)
    export_peft(model, tmp_path / "peft", base_model_name_or_path="tiny")
    config = peft.LoraConfig.from_pretrained(tmp_path / "peft")
    assert config.peft_type == peft.PeftType.LORA and config.base_model_name_or_path == "tiny"
    loaded = peft.PeftModel.from_pretrained(fresh(factory, base), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=TOLERANCE, atol=TOLERANCE)
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    expected = peft.get_peft_model_state_dict(loaded)
    assert set(ours) == set(expected)
    assert all(ours[key].shape == expected[key].shape for key in ours)


@pytest.mark.parametrize("name", CASES)
def test_ours_to_peft_to_ours_reproduces_the_tensors(name, tmp_path):
    factory, base, model = trained(name)
    export_peft(model, tmp_path / "peft")
    back = fresh(factory, base)
    assert sorted(import_peft(back, tmp_path / "peft")) == sorted(lora_modules(model))
    torch.testing.assert_close(logits(back), logits(model), rtol=TOLERANCE, atol=TOLERANCE)
    original, again = lora_state_dict(model, include_trainable=False), lora_state_dict(back, include_trainable=False)
    for key, tensor in original.items():  # A's bias is folded into B's on the way: compare the products
        if "bias" not in key:
            assert torch.equal(again[key], tensor), key
    for module_name, adapter in lora_modules(model).items():
        torch.testing.assert_close(lora_modules(back)[module_name].delta_weight(), adapter.delta_weight())


PEFT_CONFIGS = {
    "bert": (bert, dict(target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"])),
    "bert-lora-bias": (bert, dict(target_modules=["query", "value"], lora_bias=True)),
    "gpt2": (gpt2, dict(target_modules=["c_attn", "c_proj", "wte"], use_rslora=True)),
    "llama": (llama, dict(target_modules=["q_proj", "down_proj", "embed_tokens"], rank_pattern={"^model.layers.0.self_attn.q_proj": 2})),
}


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_to_ours_gives_peft_logits(name, tmp_path):
    factory, settings = PEFT_CONFIGS[name]
    torch.manual_seed(1)
    base_model = factory()
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **settings)
    peft_model = peft.get_peft_model(base_model, config).eval()
    if name == "bert-lora-bias":
        with torch.no_grad():
            for module in peft_model.modules():
                if isinstance(module, peft.tuners.lora.Linear):
                    module.lora_B["default"].bias.normal_()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = fresh(factory, base)
    import_peft(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=TOLERANCE, atol=TOLERANCE)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.plain = torch.nn.Conv2d(6, 4, 1)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):  # (B, 4, 8, 8) -> (B, 3)
        return self.head(self.plain(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("bias", [False, True])
def test_conv_adapters_both_ways(tmp_path, bias):
    torch.manual_seed(0)
    model = ConvNet().eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["conv", "plain"], bias=bias))
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            for param in adapter.adapter_params().values():
                param.normal_(0, 0.3)
    x = torch.randn(2, 4, 8, 8)
    export_peft(model, tmp_path / "peft")
    plain = ConvNet().eval()
    plain.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=TOLERANCE, atol=TOLERANCE)
    back = ConvNet().eval()
    back.load_state_dict(base)
    import_peft(back, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=TOLERANCE, atol=TOLERANCE)
    dilated = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, dilation=2))
    apply_lora(dilated, LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(ValueError, match=r"PEFT's conv adapter has no dilation and no padding mode: module '0' has dilation \(2, 2\)"):
        export_peft(dilated, tmp_path / "dilated")


def test_vllm_target_folds_scales_and_pads_ranks_exactly(tmp_path):
    factory, base, model = trained("llama")
    export_peft(model, tmp_path / "vllm", target="vllm")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (8, 8, {}, {})
    loaded = peft.PeftModel.from_pretrained(fresh(factory, base), tmp_path / "vllm").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=TOLERANCE, atol=TOLERANCE)
    torch.manual_seed(0)
    two = bert()
    apply_lora(two, LoRAConfig(targets=["query"], trainable=["classifier", "bert.pooler"]))
    with pytest.raises(ValueError, match=r"vLLM serves one fully trained module, a classification head named 'classifier' "
                                         r"or 'score' \(a weight and a bias\), but modules \['bert.pooler', 'classifier'\]"):
        export_peft(two, tmp_path / "bad", target="vllm")
    assert not (tmp_path / "bad").exists()


def test_vllm_serves_a_classification_head(tmp_path, monkeypatch):
    factory, base, model = trained("bert")  # query, value and word_embeddings adapted, the classifier trained
    export_peft(model, tmp_path, target="vllm")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["modules_to_save"], config["task_type"]) == (["classifier"], "SEQ_CLS")
    loaded = peft.PeftModel.from_pretrained(fresh(factory, base), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=TOLERANCE, atol=TOLERANCE)
    served = load_with_vllm(tmp_path, {"query", "value", "word_embeddings"}, monkeypatch)
    head = served.modules_to_save["classifier"]
    assert torch.equal(head.weight, model.classifier.weight) and torch.equal(head.bias, model.classifier.bias)


def test_vllm_reads_dense_exports_with_its_own_loader(tmp_path, monkeypatch):
    _, _, model = trained("llama")
    export_peft(model, tmp_path, target="vllm")
    expected = {"embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    loaded = read_with_vllm(tmp_path, expected, monkeypatch)
    adapters = lora_modules(model)
    assert set(loaded) == set(adapters) and any(a.kind == "embedding" for a in adapters.values())
    for name, adapter in adapters.items():
        a, b, scaling = loaded[name]
        delta = scaling * b @ a  # (out, in); an embedding's is (dim, vocab), the transpose of its table's
        torch.testing.assert_close(delta.T if adapter.kind == "embedding" else delta, adapter.delta_weight(),
                                   rtol=TOLERANCE, atol=TOLERANCE)


def test_refusals(tmp_path):
    _, _, model = trained("llama")
    with pytest.raises(ValueError, match=r"target must be one of \['peft', 'vllm'\], got 'onnx'"):
        export_peft(model, tmp_path / "x", target="onnx")
    torch.manual_seed(0)
    biased = gpt2()
    apply_lora(biased, LoRAConfig(targets=["c_attn", "wte"], bias="auto"))
    with pytest.raises(ValueError, match=r"PEFT cannot combine adapter biases \(lora_bias\) with embedding adapters \['transformer.wte'\]"):
        export_peft(biased, tmp_path / "y")
    assert not (tmp_path / "y").exists()
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match=r"is a 'IA3' adapter; only PEFT LoRA adapters"):
        import_peft(llama(), tmp_path / "ia3")
    (tmp_path / "qalora").mkdir()
    (tmp_path / "qalora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_qalora": True}))
    with pytest.raises(ValueError, match=r"sets use_qalora=True, a PEFT LoRA variant this package does not implement"):
        import_peft(llama(), tmp_path / "qalora")


class Wrapper(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)


def test_an_adapter_trained_in_a_lightning_module_loads_into_the_bare_model(tmp_path):
    torch.manual_seed(0)
    bare = llama()
    base = {k: v.clone() for k, v in bare.state_dict().items()}
    wrapper = Wrapper(bare)
    apply_lora(wrapper, LoRAConfig(targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for adapter in lora_modules(wrapper).values():
            adapter.matrix_B.weight.normal_()
    save_adapter(wrapper, tmp_path / "a.lora.safetensors")  # names relative to wrapper.model
    plain = llama()
    plain.load_state_dict(base)
    load_adapter(plain.eval(), tmp_path / "a.lora.safetensors")  # one call
    torch.testing.assert_close(logits(plain), logits(wrapper.model.eval()), rtol=TOLERANCE, atol=TOLERANCE)
    again = Wrapper(llama())
    again.model.load_state_dict(base)
    load_adapter(again, tmp_path / "a.lora.safetensors")  # and back into a wrapper
    assert set(lora_modules(again)) == set(lora_modules(wrapper))


def test_gpt2_conv1d_merges_unmerges_exactly_and_unloads_into_gpt2(tmp_path):
    from lightning_lora import merge_and_unload, merge_lora, unmerge_lora
    from lightning_lora.adapters import LoRAConv1D

    torch.manual_seed(0)
    model = gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head" not in apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["all-linear"]))  # PEFT's meaning
    assert all(isinstance(a, LoRAConv1D) for a in lora_modules(model).values())
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            adapter.matrix_B.weight.normal_(0, 0.1)
    expected = logits(model)
    merge_lora(model)
    torch.testing.assert_close(logits(model), expected, rtol=TOLERANCE, atol=TOLERANCE)
    unmerge_lora(model)
    state = {k.replace(".original_module", ""): v for k, v in model.state_dict().items() if "matrix_" not in k}
    assert all(torch.equal(state[k], base[k]) for k in base)  # bit for bit
    merged = merge_and_unload(model)
    plain = gpt2()
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(logits(plain), expected, rtol=TOLERANCE, atol=TOLERANCE)


class LitLlama(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = llama()

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_callback_companions_of_a_wrapped_transformers_model_check_and_load_into_the_bare_model(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora import LoRACallback
    from lightning_lora.lightning import check_companion

    torch.manual_seed(0)
    lit = LitLlama()
    base = {k: v.clone() for k, v in lit.model.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randint(0, 64, (8, 7))), batch_size=4)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
              callbacks=[LoRACallback(targets=["q_proj", "v_proj"], export_peft="peft"), saver]).fit(lit, loader)
    check_companion(tmp_path / "last.ckpt")
    bare = llama()
    bare.load_state_dict(base)
    load_adapter(bare.eval(), tmp_path / "last.lora.safetensors")  # names relative to lit.model
    torch.testing.assert_close(logits(bare), logits(lit.model.eval()), rtol=TOLERANCE, atol=TOLERANCE)
    served = peft.PeftModel.from_pretrained(fresh(llama, base), tmp_path / "last.peft").eval()
    torch.testing.assert_close(logits(served), logits(lit.model), rtol=TOLERANCE, atol=TOLERANCE)

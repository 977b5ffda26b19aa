"""Fine-tuning transformers models as PEFT users expect: PEFT's defaults, task heads trained and kept, exports
that AutoPeftModel loads, continuing from a PEFT folder, and vLLM exports refused before training."""

import inspect
import json

import lightning as L
import peft
import pytest
import torch
import transformers
from hf_models import bert, gpt2, llama, qwen2
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import (
    LoRA,
    LoRACallback,
    LoRAConfig,
    LoRAMixin,
    apply_lora,
    export_peft,
    load_adapter,
    lora_modules,
    read_adapter,
    save_adapter,
)
from lightning_lora.lightning import adaptation
from lightning_lora.surgery.state import trainable_modules

TOLERANCE = 1e-5
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def data(n=16):
    tokens = torch.randint(0, 64, (n, 7), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=8)


class Lit(L.LightningModule):
    """A LightningModule holding a transformers model under any attribute (``model`` by default)."""

    def __init__(self, model, attribute="model"):
        super().__init__()
        self.attribute = attribute
        setattr(self, attribute, model)
        self.steps = 0

    @property
    def net(self):
        return getattr(self, self.attribute)

    def _loss(self, batch):
        tokens, labels = batch
        classifies = type(self.net).__name__.endswith("ForSequenceClassification")
        return self.net(input_ids=tokens, labels=labels if classifies else tokens).loss

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def fit(module, callback, tmp_path, *callbacks):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback, *callbacks])
    trainer.fit(module, data())
    return trainer


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomized(model):
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            for param in adapter.adapter_params().values():
                param.normal_(0, 0.2)
        for module in trainable_modules(model).values():
            for param in module.parameters():
                param.add_(0.1)
    return model.eval()


# --- defaults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory, targets", [(gpt2, ["c_attn", "c_fc"]), (qwen2, ["q_proj", "v_proj"]), (llama, ["all-linear"])])
def test_the_defaults_train_what_peft_defaults_train(factory, targets):
    torch.manual_seed(0)
    ours, theirs = factory(), factory()
    apply_lora(ours, LoRAConfig(targets=targets))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(target_modules="all-linear" if targets == ["all-linear"] else targets))
    assert trainable_count(ours) == trainable_count(theirs)  # no adapter biases, r=8, as PEFT
    assert all(adapter.r == 8 and adapter.scaling == 2.0 and not adapter.has_bias for adapter in lora_modules(ours).values())
    assert LoRACallback().config == LoRAConfig() and (LoRAConfig().r, LoRAConfig().alpha, LoRAConfig().bias) == (8, 16.0, False)
    parameters = list(inspect.signature(LoRA).parameters.values())[:4]
    assert [(p.name, p.default) for p in parameters][1:] == [("bias", True), ("alpha", 1), ("r", 4)]  # the layer's own signature


# --- task heads -------------------------------------------------------------------------------------


def summaries(monkeypatch):
    """The fit-start summaries LoRACallback prints (whatever logging other tests configured)."""
    printed = []
    monkeypatch.setattr(adaptation, "rank_zero_info", lambda text: printed.append(text))
    return printed


def test_a_classification_head_is_trained_by_default_named_in_the_summary_and_exported(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lit = Lit(bert())
    base = {k: v.clone() for k, v in lit.model.state_dict().items()}
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    printed = summaries(monkeypatch)
    fit(lit, LoRACallback(targets=["query", "value"], export_peft="peft"), tmp_path, saver)
    assert "trained fully: model.classifier (the new task head of BertForSequenceClassification, as PEFT's task_type" in printed[0]
    assert not torch.equal(lit.model.classifier.weight, base["classifier.weight"])  # trained
    assert torch.equal(lit.model.bert.pooler.dense.weight, base["bert.pooler.dense.weight"])  # frozen
    theirs = peft.get_peft_model(bert(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    assert trainable_count(lit) == trainable_count(theirs)

    folder = tmp_path / "last.peft"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    fresh = bert()
    fresh.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(fresh, folder).eval()
    torch.testing.assert_close(logits(loaded), logits(lit.model.eval()), rtol=TOLERANCE, atol=TOLERANCE)


def test_trainable_overrides_the_task_head(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lit = Lit(bert())
    head = lit.model.classifier.weight.clone()
    printed = summaries(monkeypatch)
    fit(lit, LoRACallback(targets=["query", "value"], trainable=[]), tmp_path)
    assert torch.equal(lit.model.classifier.weight, head) and "trained fully" not in printed[0]
    pooled = Lit(bert())
    apply_lora(pooled, LoRAConfig(targets=["query"], trainable=["bert.pooler"]))
    assert list(trainable_modules(pooled)) == ["model.bert.pooler"]  # given: only what is named
    adapted_head = bert()
    apply_lora(adapted_head, LoRAConfig(targets=["query", "classifier"]))  # a head the targets adapt is not also trained
    assert "classifier" in lora_modules(adapted_head) and not trainable_modules(adapted_head)


def test_saving_and_exporting_from_the_inner_model_keep_the_head(tmp_path):
    torch.manual_seed(0)
    lit = Lit(bert())
    base = {k: v.clone() for k, v in lit.model.state_dict().items()}
    apply_lora(lit, LoRAConfig(r=4, alpha=8, targets=["query", "value"]))
    randomized(lit)
    expected = logits(lit.model)
    export_peft(lit.model, tmp_path / "peft")
    fresh = bert()
    fresh.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=TOLERANCE, atol=TOLERANCE)

    save_adapter(lit.model, tmp_path / "inner.lora.safetensors")
    fresh = bert()
    fresh.load_state_dict(base)
    load_adapter(fresh, tmp_path / "inner.lora.safetensors")  # the head is in the file: the base weights match
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=TOLERANCE, atol=TOLERANCE)
    stored = read_adapter(tmp_path / "inner.lora.safetensors").config
    assert (stored.r, stored.alpha, stored.trainable) == (4, 8.0, ["classifier"])  # the adapters' own settings


def test_saving_a_submodule_that_lacks_a_trained_module_is_refused_before_writing(tmp_path):
    lit = Lit(bert())
    lit.extra = torch.nn.Linear(3, 3)  # trained fully, but outside lit.model
    apply_lora(lit, LoRAConfig(targets=["query"], trainable=["model.classifier", "extra"]))
    for write in (lambda: save_adapter(lit.model, tmp_path / "a.lora.safetensors"), lambda: export_peft(lit.model, tmp_path / "peft")):
        with pytest.raises(ValueError, match=r"modules \['extra'\] were trained fully with these adapters but lie outside the "
                                             r"module being saved, so the file would lack them; save from the model that holds them"):
            write()
    assert list(tmp_path.iterdir()) == []
    save_adapter(lit, tmp_path / "whole.lora.safetensors")  # from the LightningModule: everything
    assert read_adapter(tmp_path / "whole.lora.safetensors").trainable == ["model.classifier", "extra"]


# --- exports that load everywhere -------------------------------------------------------------------


def test_auto_peft_model_loads_an_export_by_its_task_type_and_base_path(tmp_path):
    torch.manual_seed(0)
    llama().save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    apply_lora(model, LoRAConfig(targets=["q_proj", "v_proj"]))
    randomized(model)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["task_type"], config["base_model_name_or_path"]) == ("CAUSAL_LM", str(tmp_path / "base"))
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=TOLERANCE, atol=TOLERANCE)

    save_adapter(model, tmp_path / "a.lora.safetensors")  # the file records both, for a later export
    export_peft(tmp_path / "a.lora.safetensors", tmp_path / "from-file")
    assert json.loads((tmp_path / "from-file" / "adapter_config.json").read_text()) == config
    export_peft(model, tmp_path / "given", task_type="FEATURE_EXTRACTION", base_model_name_or_path="org/model")
    given = json.loads((tmp_path / "given" / "adapter_config.json").read_text())
    assert (given["task_type"], given["base_model_name_or_path"]) == ("FEATURE_EXTRACTION", "org/model")
    with pytest.raises(ValueError, match=r"task_type must be None or one of \['CAUSAL_LM', .*\], got 'causal'"):
        export_peft(model, tmp_path / "bad", task_type="causal")
    assert not (tmp_path / "bad").exists()


# --- continuing from PEFT ---------------------------------------------------------------------------


def _peft_folder(tmp_path):
    """A PEFT adapter of a tiny Llama saved by PEFT itself, its base weights and its logits."""
    torch.manual_seed(0)
    base = llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", state, logits(theirs.eval())


def _fresh(state, attribute="model"):
    model = llama()
    model.load_state_dict(state)
    return Lit(model, attribute)


@pytest.mark.parametrize("attribute", ["model", "backbone"])
def test_a_peft_folder_continues_training_through_the_callback(tmp_path, attribute):
    folder, state, expected = _peft_folder(tmp_path)
    lit = _fresh(state, attribute)
    callback = LoRACallback(adapter_path=folder)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(lit, data(), verbose=False)  # unadapted
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[callback])
    trainer.validate(lit, data(), verbose=False)
    torch.testing.assert_close(logits(lit.net.eval()), expected, rtol=TOLERANCE, atol=TOLERANCE)  # PEFT's outputs
    assert (callback.config.r, callback.config.alpha) == (4, 8.0)  # the folder's settings
    before = {k: v.clone() for k, v in lit.state_dict().items() if "matrix_" in k}
    fit(lit, callback, tmp_path)
    assert lit.steps == 2 and any(not torch.equal(lit.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=r"adapter_path '.*peft' was trained with other settings: r=16 \(file: 4\)"):
        fit(_fresh(state), LoRACallback(r=16, adapter_path=folder), tmp_path)


def test_an_adapter_file_of_the_bare_model_continues_under_any_attribute_and_the_mixin_takes_both(tmp_path):
    folder, state, expected = _peft_folder(tmp_path)
    bare = llama()
    bare.load_state_dict(state)
    apply_lora(bare, LoRAConfig(targets=["q_proj", "v_proj"]))
    randomized(bare)
    save_adapter(bare, tmp_path / "bare.lora.safetensors")
    lit = _fresh(state, "backbone")
    fit(lit, LoRACallback(adapter_path=tmp_path / "bare.lora.safetensors"), tmp_path)
    assert lit.steps == 2 and set(lora_modules(lit)) == {f"backbone.{name}" for name in lora_modules(bare)}

    class Mixed(LoRAMixin, Lit):
        pass

    mixed = Mixed(llama())
    mixed.model.load_state_dict(state)
    assert len(mixed.load_adapter(folder)) == 4  # a PEFT folder
    torch.testing.assert_close(logits(mixed.model.eval()), expected, rtol=TOLERANCE, atol=TOLERANCE)
    with pytest.raises(ValueError, match=r"path must be an adapter file, got the folder .*; a PEFT adapter folder loads with import_peft"):
        load_adapter(llama(), folder)


def test_where_the_names_fit_twice_adapter_root_says_which(tmp_path):
    folder, state, expected = _peft_folder(tmp_path)
    lit = _fresh(state)
    lit.teacher = llama()  # a second Llama: the adapter fits under both
    with pytest.raises(ValueError, match=r"fits this model under several submodules \['model', 'teacher'\]; pass root= "
                                         r"\(LoRACallback: adapter_root=\)"):
        fit(lit, LoRACallback(adapter_path=folder), tmp_path)
    assert not lora_modules(lit)
    fit(lit, LoRACallback(adapter_path=folder, adapter_root="model"), tmp_path)
    assert all(name.startswith("model.") for name in lora_modules(lit))
    with pytest.raises(ValueError, match=r"adapter_root='model' names where adapter_path's modules are, but adapter_path is None"):
        LoRACallback(adapter_root="model")


# --- vLLM exports refused before training -----------------------------------------------------------


def test_a_vllm_export_that_would_fail_is_refused_before_training(tmp_path):
    torch.manual_seed(0)
    lit = Lit(gpt2())
    with pytest.raises(MisconfigurationException, match=r"export_peft='vllm' would fail at the first checkpoint: vLLM serves "
                                                        r"no LoRA biases, but the adapters of modules \['model.transformer.h.0.attn.c_attn'.*"
                                                        r"adapt with bias=False \(the default\)"):
        fit(lit, LoRACallback(targets=["c_attn"], bias="auto", export_peft="vllm"), tmp_path)
    assert lit.steps == 0 and not lora_modules(lit)  # nothing trained, the adapters taken out again
    two = Lit(bert())
    with pytest.raises(MisconfigurationException, match=r"vLLM serves one fully trained module, a classification head"):
        fit(two, LoRACallback(targets=["query"], trainable=["classifier", "bert.pooler"], export_peft="vllm"), tmp_path)
    assert two.steps == 0
    with pytest.raises(ValueError, match=r"export_peft='vllm' cannot serve adapters made with use_dora=True: vLLM serves no "
                                         r"DoRA adapters; use export_peft='peft', or leave use_dora=True out"):
        LoRACallback(use_dora=True, export_peft="vllm")
    with pytest.raises(ValueError, match=r"export_peft='vllm' cannot serve adapters made with bias=True"):
        LoRACallback(bias=True, export_peft="vllm")
    head = Lit(bert())  # BERT's new classifier is what vLLM serves as a classification head
    fit(head, LoRACallback(targets=["query", "value"], export_peft="vllm"), tmp_path, ModelCheckpoint(dirpath=tmp_path, save_last=True))
    assert json.loads((tmp_path / "last.peft" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]

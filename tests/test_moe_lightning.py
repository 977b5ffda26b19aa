"""Expert adapters through Lightning, Hydra and the command line: training, slim checkpoints, exact resume, merge."""

from pathlib import Path

import lightning as L
import pytest
import torch
import transformers
from hf_models import qwen3_moe
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRACallback, LoRAConfig, LoRAMixin, apply_lora, load_adapter, lora_modules, lora_state_dict, save_adapter
from lightning_lora.cli import main
from lightning_lora.lightning import adapter_path_for

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
CONF = Path(__file__).resolve().parents[1] / "conf"


class MoELM(LoRAMixin, L.LightningModule):
    """A causal LM with mixture-of-experts layers (a tiny Qwen3-MoE), trained on next tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = qwen3_moe()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def data():
    tokens = torch.randint(0, 64, (32, 7), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(tokens), batch_size=8)


def fit(tmp_path, name, callback, max_epochs=2, ckpt_path=None, module=None):
    module = module or MoELM()
    saver = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_epochs=max_epochs, default_root_dir=tmp_path / name, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, callbacks=[callback, saver])
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe")
    module = fit(folder, "run", LoRACallback(r=4, alpha=8, bias=False, targets=["q_proj", *EXPERTS]))
    return folder, module


def test_the_callback_trains_expert_adapters_with_slim_checkpoints_and_companions(trained):
    folder, module = trained
    adapters = lora_modules(module)
    assert {name for name in adapters if "experts" in name} == {
        f"model.model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }
    assert all(adapter.matrix_B.weight.abs().sum() > 0 for adapter in adapters.values())  # trained
    checkpoint = torch.load(folder / "run" / "last.ckpt", weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if "experts.original_module" in key]  # the frozen experts left out
    assert "model.model.layers.0.mlp.experts.original_module.gate_up_proj" in checkpoint["lora"]["base_keys"]
    fresh = MoELM()
    load_adapter(fresh, adapter_path_for(str(folder / "run" / "last.ckpt")))
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=TOKENS).logits, module.model(input_ids=TOKENS).logits)


def test_resume_from_an_epoch_boundary_is_bit_exact(trained, tmp_path):
    folder, module = trained
    resumed = fit(tmp_path, "resumed", LoRACallback(r=4, alpha=8, bias=False, targets=["q_proj", *EXPERTS]),
                  ckpt_path=folder / "run" / "epoch=0-step=4.ckpt")
    straight, again = lora_state_dict(module), lora_state_dict(resumed)
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


def test_the_moe_preset_and_expert_targets_from_the_hydra_command_line(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        preset = compose("config", overrides=["lora=moe", "lora.trainable=[]"])
        line = compose("config", overrides=["lora.targets=[q_proj,v_proj,experts.gate_up_proj,experts.down_proj]",
                                            "lora.bias=false", "lora.trainable=[]"])
    for cfg in (preset, line):
        callback = instantiate(cfg.lora)
        assert callback.config.targets == ["q_proj", "v_proj", *EXPERTS] and callback.config.bias is False
        module = fit(tmp_path, f"hydra{id(cfg)}", callback, max_epochs=1)
        assert len([name for name in lora_modules(module) if "experts" in name]) == 4


def test_the_mixin_adapts_expert_weights_too():
    module = MoELM()
    names = module.apply_lora(targets=EXPERTS)
    assert names == [f"model.model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]


def run(capsys, *args):
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    return code, *capsys.readouterr()


def test_the_command_inspects_merges_and_checks_expert_adapters(trained, tmp_path, capsys):
    folder, module = trained
    torch.manual_seed(0)
    base = qwen3_moe()
    base.save_pretrained(tmp_path / "base")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    adapter = tmp_path / "moe.lora.safetensors"
    save_adapter(module, adapter)
    code, out, err = run(capsys, "inspect", adapter)
    assert code == 0, err
    assert "model.layers.0.mlp.experts.gate_up_proj" in out and "kind=experts" in out
    with torch.no_grad():
        expected = module.model(input_ids=TOKENS).logits
    code, out, err = run(capsys, "merge", "--base", tmp_path / "base", "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    code, out, err = run(capsys, "merge", "--base", tmp_path / "base.safetensors", "--adapter", adapter, "--out", tmp_path / "merged.safetensors")
    assert code == 0, err
    plain = qwen3_moe()
    plain.load_state_dict(load_file(tmp_path / "merged.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    code, out, err = run(capsys, "check", folder / "run" / "last.ckpt")
    assert code == 0 and "belong together" in out, err


def test_a_model_without_the_experts_protocol_offers_no_expert_weights():
    class Experts(torch.nn.Module):  # 3-D weights, but no use_experts_implementation flags: their layout is unknown
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 8, 8))

    with pytest.raises(ValueError, match=r"targets pattern 'experts.gate_up_proj' matched no module"):
        apply_lora(torch.nn.ModuleDict({"experts": Experts(), "out": torch.nn.Linear(8, 8)}), LoRAConfig(targets=EXPERTS[:1]))

"""The main job end to end, through Hydra's API and from the command line, in a tiny setting."""

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_hydra_configs import ROOT, composed

from lightning_lora import load_adapter, lora_summary, save_adapter

from digits import pretrain  # examples/ is on sys.path (test_hydra_configs)
from train import run

QUICK = ["experiment=quick", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("weights") / "vit.safetensors", [0, 1, 2, 3, 4], epochs=1)


def test_train_then_evaluate_through_hydra_api(backbone, tmp_path):
    result = run(composed([*QUICK, f"model.pretrained_path={backbone}"], tmp_path))
    assert (tmp_path / "result.json").exists()
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert result["trainable_params"] < result["total_params"] * 0.1
    adapter = tmp_path / "checkpoints" / "final.lora.safetensors"
    assert result["adapter_bytes"] == adapter.stat().st_size < result["full_weights_bytes"]
    assert result["checkpoint_bytes"] < result["full_weights_bytes"]
    evaluated = run(composed([*QUICK, "mode=evaluate", f"model.pretrained_path={backbone}", f"lora.adapter_path={adapter}"], tmp_path / "eval"))
    assert evaluated["val_acc"] == result["val_acc_after"]


def test_evaluate_takes_the_files_settings_unless_typed_otherwise(backbone, tmp_path):
    trained = [*QUICK, f"model.pretrained_path={backbone}", "lora=all_linear", "lora.r=2", "lora.alpha=2"]
    result = run(composed(trained, tmp_path))
    adapter = tmp_path / "checkpoints" / "final.lora.safetensors"
    evaluate = [*QUICK, "mode=evaluate", f"model.pretrained_path={backbone}", f"lora.adapter_path={adapter}"]
    assert run(composed(evaluate, tmp_path / "a"))["val_acc"] == result["val_acc_after"]  # preset values differ: fine
    with pytest.raises(ValueError, match=r"was trained with other settings: r=8 \(file: 2\)"):
        run(composed([*evaluate, "lora.r=8"], tmp_path / "b"))  # typed, even though 8 is the default


def test_full_fine_tuning_baseline(backbone, tmp_path):
    result = run(composed([*QUICK, "lora=none", f"model.pretrained_path={backbone}"], tmp_path))
    assert result["trainable_params"] == result["total_params"]
    assert result["adapter_bytes"] is None


def test_bad_mode_and_evaluate_without_adapter(backbone, tmp_path):
    with pytest.raises(ValueError, match=r"mode must be one of \('train', 'evaluate'\), got 'serve'"):
        run(composed([*QUICK, "mode=serve"], tmp_path))
    with pytest.raises(ValueError, match=r"mode=evaluate needs lora.adapter_path=<adapter file>, got none"):
        run(composed([*QUICK, "mode=evaluate", f"model.pretrained_path={backbone}"], tmp_path))


def _train(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_command_line_run_and_sweep_table(backbone, tmp_path):
    done = _train(*QUICK, f"model.pretrained_path={backbone}", "lora.r=16", "lora.alpha=32", "lora.bias=false",
                  "lora.targets=[q_proj,v_proj]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "trainable parameters:" in done.stdout + done.stderr
    assert "reload the adapter: python examples/train.py mode=evaluate" in done.stdout + done.stderr
    sweep = tmp_path / "sweep"
    done = _train("-m", *QUICK, f"model.pretrained_path={backbone}", "lora.r=2,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = (sweep / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| run | trainable params |")
    assert len(table) == 4 and "lora.r=2" in table[2] and "lora.r=4" in table[3]
    assert (sweep / "comparison.csv").exists() and (sweep / "metric_vs_params.png").stat().st_size > 0


def test_bad_override_from_command_line(tmp_path):
    done = _train("lora.rank=8", cwd=tmp_path)
    assert done.returncode != 0
    assert "Key 'rank' not in 'LoRACallbackConf'" in done.stderr and "full_key: lora.rank" in done.stderr


#: One run per documented setting of conf/ (every key of conf/lora/default.yaml, every preset and
#: trainer config) and the README's combinations, with the files each leaves in checkpoints/.
ADAPTED = {"final.ckpt", "final.lora.safetensors", "last.ckpt", "last.lora.safetensors"}
SETTINGS = {
    "lora=default": ([], ADAPTED),
    "lora=attention": (["lora=attention", "trainer.max_epochs=3"], ADAPTED),
    "lora=all_linear": (["lora=all_linear"], ADAPTED),
    "lora=dora": (["lora=dora"], ADAPTED),
    "lora=qlora": (["lora=qlora"], ADAPTED),
    "lora=none": (["lora=none"], {"final.ckpt", "last.ckpt"}),
    "trainer=cpu": (["trainer=cpu"], ADAPTED),
    "readme": (["lora.r=16", "lora.alpha=32", "lora.bias=false", "lora.targets=[q_proj,v_proj]"], ADAPTED),
    "r": (["lora.r=4"], ADAPTED),
    "alpha": (["lora.alpha=4"], ADAPTED),
    "bias": (["lora.bias=auto"], ADAPTED),
    "targets": (["lora.targets=[all-linear]"], ADAPTED),
    "exclude": (["lora.targets=[all-linear]", "lora.exclude=[o_proj]"], ADAPTED),
    "dropout": (["lora.dropout=0.1"], ADAPTED),
    "rank_pattern": (["lora.rank_pattern={q_proj:4}"], ADAPTED),
    "alpha_pattern": (["lora.alpha_pattern={q_proj:4}"], ADAPTED),
    "use_rslora": (["lora.use_rslora=true"], ADAPTED),
    "use_dora": (["lora.use_dora=true"], ADAPTED),
    "trainable": (["lora.trainable=[]"], ADAPTED),
    "adapter_dtype": (["lora.adapter_dtype=float32"], ADAPTED),
    "quantize": (["lora.quantize=nf4"], ADAPTED),
    "save_base_weights": (["lora.save_base_weights=true"], ADAPTED),
    "log_grad_norm": (["lora.log_grad_norm=false"], ADAPTED),
    "log_per_layer": (["lora.log_per_layer=true"], ADAPTED),
    "merge_on_end": (["lora.merge_on_end=true"], ADAPTED | {"merged.safetensors"}),
    "dora+merge_on_end": (["lora=dora", "lora.merge_on_end=true"], ADAPTED | {"merged.safetensors"}),
    "export_peft": (["lora.export_peft=peft"], ADAPTED | {"final.peft", "last.peft"}),
    "export_peft=vllm": (["lora.export_peft=vllm", "lora.trainable=[]"], ADAPTED | {"final.peft", "last.peft"}),
}
# Set in the tests below, with a file the run before them wrote.
LATER = {"adapter_path", "adapter_root"}


def test_every_setting_of_the_lora_config_has_a_run():
    keys = set(OmegaConf.load(ROOT / "conf" / "lora" / "default.yaml")) - {"defaults", "_target_"}
    assert keys - LATER <= set(SETTINGS)


@pytest.mark.parametrize("name", SETTINGS)
def test_every_documented_setting_runs_to_the_end_and_leaves_its_files(name, backbone, tmp_path):
    overrides, files = SETTINGS[name]
    result = run(composed([*QUICK, f"model.pretrained_path={backbone}", *overrides], tmp_path))
    found = {path.name for path in (tmp_path / "checkpoints").iterdir()}
    assert files <= found and (tmp_path / "result.json").exists()
    assert not [f for f in found - files if not f.startswith("epoch=")]  # nothing else but the best checkpoint
    for folder in {f for f in files if f.endswith(".peft")}:
        assert (tmp_path / "checkpoints" / folder / "adapter_config.json").exists()
    if "merged.safetensors" in files:  # the merged weights load into the base model as it is, strictly
        assert result["merged_path"] == str(tmp_path / "checkpoints" / "merged.safetensors")
        cfg = composed([*QUICK, f"model.pretrained_path={backbone}", *overrides], tmp_path / "fresh")
        fresh = instantiate(cfg.model, pretrained_path=str(backbone))
        fresh.load_state_dict(load_file(result["merged_path"]), strict=True)
        adapted = instantiate(cfg.model, pretrained_path=str(backbone))
        load_adapter(adapted, tmp_path / "checkpoints" / "final.lora.safetensors")
        images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(fresh(images), adapted(images), atol=1e-5, rtol=1e-5)
    else:
        assert result["merged_path"] is None


def test_continuing_from_an_adapter_file_a_peft_folder_and_a_file_of_the_inner_model(backbone, tmp_path):
    base = [*QUICK, f"model.pretrained_path={backbone}"]
    cfg = composed([*base, "lora.export_peft=peft"], tmp_path / "first")
    run(cfg)
    checkpoints = tmp_path / "first" / "checkpoints"
    module = instantiate(cfg.model, pretrained_path=str(backbone))
    load_adapter(module, checkpoints / "final.lora.safetensors")
    save_adapter(module.model, tmp_path / "inner.lora.safetensors")  # names relative to module.model
    sources = {
        "file": [f"lora.adapter_path={checkpoints / 'final.lora.safetensors'}"],
        "peft": [f"lora.adapter_path={checkpoints / 'final.peft'}"],
        "inner": [f"lora.adapter_path={tmp_path / 'inner.lora.safetensors'}", "lora.adapter_root=model"],
    }
    for name, overrides in sources.items():
        result = run(composed([*base, *overrides], tmp_path / name))
        assert (tmp_path / name / "checkpoints" / "final.lora.safetensors").exists(), name
        assert result["trainable_params"] == lora_summary(module).trainable, name

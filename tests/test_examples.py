"""The main job end to end, through Hydra's API and from the command line, in a tiny setting."""

import json
import subprocess
import sys

import pytest
from test_hydra_configs import ROOT, composed

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

"""The spawn launchers (ddp_spawn, ddp_fork, ddp_notebook) with LoRACallback: 2 CPU processes each."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_script
from lightning_models import Classifier, data

from lightning_lora import LoRACallback, LoRAConfig, apply_lora, lora_modules, read_adapter
from lightning_lora.lightning.spawn import adopt_final_state, write_final_adapters

LAUNCH = {"accelerator": "cpu", "devices": 2, "max_epochs": 1, "logger": False, "enable_progress_bar": False}


@pytest.fixture(autouse=True)
def _fresh_port(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)  # each launch finds its own (see test_distributed.py)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _launch(folder, strategy, *flags):
    """tests/spawn_run.py in a fresh process, as a script or notebook starts the launcher; ``TMPDIR`` where
    rank 0 leaves its final weights."""
    (folder / "tmp").mkdir()
    done = run_script(Path(__file__).parent / "spawn_run.py", folder, strategy, *flags, TMPDIR=str(folder / "tmp"))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "launching.pt", weights_only=True), torch.load(folder / "final.pt", weights_only=True)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook"])
def test_callback_alone_returns_the_trained_model_exactly_to_the_launching_process(tmp_path, strategy):
    launching, trained = _launch(tmp_path, strategy)
    assert launching["adapted"] == ["net.blocks.0.attn.qkv", "net.blocks.1.attn.qkv"]
    state, before = launching["after"], launching["before"]
    assert list(state) == list(trained)  # every key, the adapters' included, and no other
    for key, tensor in trained.items():
        assert torch.equal(state[key], tensor), key
    for key in ("net.blocks.0.attn.qkv.matrix_B.weight", "net.head.weight"):
        assert not torch.equal(state[key], torch.zeros_like(state[key]) if "matrix_B" in key else before[key]), key
    base = {k: v for k, v in before.items() if "head" not in k}
    for key, tensor in base.items():  # the frozen base is as it was
        assert torch.equal(state[key.replace(".qkv.", ".qkv.original_module.")], tensor), key
    stored = read_adapter(tmp_path / "checkpoints" / "last.lora.safetensors").tensors
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor), key
    assert [files for _, _, files in os.walk(tmp_path / "tmp")] == [[], []]  # its folder, emptied


def test_a_model_adapted_before_fit_with_the_callbacks_config_still_comes_back(tmp_path):
    launching, trained = _launch(tmp_path, "ddp_spawn", "adapted")
    assert all(torch.equal(launching["after"][key], tensor) for key, tensor in trained.items())


def test_adapters_before_fit_that_differ_from_the_callbacks_plan_are_refused_before_training(tmp_path):
    model = Classifier()
    apply_lora(model, LoRAConfig(targets=["qkv"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = LoRACallback(targets=["qkv", "fc1"])
    with pytest.raises(Exception, match=r"adapted before fit with other modules than LoRACallback's targets \['qkv', 'fc1'\] "
                                        r"plan \(adapted only before fit: \[\]; planned only: \['net.blocks.0.mlp.fc1'"):
        L.Trainer(default_root_dir=tmp_path, strategy="ddp_spawn", callbacks=[callback], **LAUNCH).fit(model, data())
    assert sorted(model.state_dict()) == sorted(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not os.listdir(tmp_path) or not any(name.endswith(".ckpt") for _, _, files in os.walk(tmp_path) for name in files)


def test_merge_on_end_is_refused_with_a_spawn_launcher(tmp_path):
    model = Classifier()
    with pytest.raises(Exception, match=r"merge_on_end=True cannot be used with strategy DDPStrategy \(ddp_spawn, ddp_fork, "
                                        r"ddp_notebook\).*lightning_lora.merge_lora\(model\)"):
        L.Trainer(default_root_dir=tmp_path, strategy="ddp_spawn", callbacks=[LoRACallback(targets=["qkv"], merge_on_end=True)],
                  **LAUNCH).fit(model, data())
    assert not lora_modules(model)


def test_final_adapters_refuse_another_base_and_leave_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    trained = Classifier()
    apply_lora(trained, LoRAConfig(targets=["qkv"]))
    path = str(tmp_path / ".temp.ckpt")
    write_final_adapters(trained, path)
    state = trained.state_dict()
    torch.manual_seed(1)
    other = Classifier()  # another base
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="fingerprint"):
        adopt_final_state(other, path, state)
    assert not lora_modules(other) and all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    torch.manual_seed(0)
    same = Classifier()
    unexpected = {**state, "net.extra": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        adopt_final_state(same, path, unexpected)
    assert not lora_modules(same)


def test_a_final_state_the_launching_process_cannot_take_is_an_error_naming_the_trained_files_which_stay(tmp_path):
    from types import SimpleNamespace

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput

    LoRACallback()  # installs the hook
    torch.manual_seed(0)
    trained = Classifier()
    apply_lora(trained, LoRAConfig(targets=["qkv"]))
    path = str(tmp_path / ".temp.ckpt")
    torch.save(trained.state_dict(), path)
    write_final_adapters(trained, path)
    torch.manual_seed(1)
    launching = Classifier()  # another base than the one trained
    launcher = SimpleNamespace(_strategy=SimpleNamespace(checkpoint_io=TorchCheckpointIO()))
    output = _WorkerOutput(None, path, None, None, {})
    trainer = SimpleNamespace(lightning_module=launching, checkpoint_callback=None)
    with pytest.raises(RuntimeError, match=rf"the trained model could not be loaded back into the launching process: .*fingerprint.*"
                                           rf"its final weights are in '{path}' and its adapter file in '{path}.lora.safetensors'"):
        _MultiProcessingLauncher._recover_results_in_main_process(launcher, output, trainer)
    assert os.path.exists(path) and os.path.exists(path + ".lora.safetensors") and not lora_modules(launching)


def test_fork_launchers_refuse_a_launching_process_that_already_holds_a_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:  # as an earlier one-device ModelParallelStrategy run in the same notebook leaves it
        with pytest.raises(RuntimeError, match=r"already holds a torch.distributed process group .* start_method='fork' .*"
                                               r"torch.distributed.destroy_process_group\(\) first"):
            L.Trainer(default_root_dir=tmp_path, strategy="ddp_fork", callbacks=[LoRACallback(targets=["qkv"])],
                      **LAUNCH).fit(Classifier(), data())
    finally:
        torch.distributed.destroy_process_group()

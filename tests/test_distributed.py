"""Multi-process strategies on CPU (gloo, 2 processes): the spawn launcher's round trip."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import Classifier, data

from lightning_lora import LoRACallback, apply_lora, lora_modules, read_adapter

SPAWN = {"strategy": "ddp_spawn", "accelerator": "cpu", "devices": 2, "max_epochs": 1, "logger": False, "enable_progress_bar": False}


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_ddp_spawn_needs_the_model_adapted_before_fit(tmp_path):
    model = Classifier()
    with pytest.raises(Exception, match="launches processes that train copies of the model"):
        L.Trainer(default_root_dir=tmp_path, callbacks=[LoRACallback(targets=["qkv"])], **SPAWN).fit(model, data())
    assert not lora_modules(model)


def test_ddp_spawn_trains_and_returns_the_adapters(tmp_path):
    model = Classifier()
    callback = LoRACallback(targets=["qkv"])
    apply_lora(model, callback.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    L.Trainer(default_root_dir=tmp_path, callbacks=[callback, saver], **SPAWN).fit(model, data())
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=4.ckpt", "epoch=0-step=4.lora.safetensors", "last.ckpt", "last.lora.safetensors"]
    stored = read_adapter(tmp_path / "last.lora.safetensors").tensors
    state = model.state_dict()
    for key, tensor in stored.items():  # the launching process got the trained adapters back
        assert torch.equal(state[key], tensor), key
    assert all(not torch.equal(state[key], before[key]) for key in stored if "matrix_B.weight" in key)

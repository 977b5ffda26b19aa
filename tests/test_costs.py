"""What adapting and checkpointing cost on a 24-block model: walks of the model, plans, fingerprints, serialisations.

A walk is one full traversal of the model's modules (see ``walks.py``). ``apply_lora`` plans in one walk
and installs in one; ``LoRACallback`` plans once per setup, under every strategy, and adds at most three
walks to those Lightning itself makes; each checkpoint save samples each base weight once, reads the
adapters once and serialises the companion once.
"""

import os
from collections import Counter

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from walks import counting_walks

import lightning_lora.formats.adapter_file as adapter_file_module
import lightning_lora.formats.fingerprint as fingerprint_module
import lightning_lora.lightning.adaptation as adaptation_module
from lightning_lora import LoRACallback, LoRAConfig, apply_lora

BLOCKS = 24


class Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.o_proj(self.q_proj(h) * torch.sigmoid(self.v_proj(h)))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(L.LightningModule):
    def __init__(self, shard=False):
        super().__init__()
        self.model = nn.Sequential(*[Block() for _ in range(BLOCKS)], nn.Linear(16, 4))
        self.shard = shard

    def configure_model(self):
        if self.shard:
            for block in self.model:
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class WalksUntilTraining(L.Callback):
    """The walks of the model from the start of ``fit`` until training starts (setup and its checks)."""

    def __init__(self, counts):
        self.counts = counts

    def on_train_start(self, trainer, pl_module):
        self.seen = sum(self.counts.values())


def data():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 16)), batch_size=4)


def fit(module, callbacks, tmp_path, **kwargs):
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)
    trainer.fit(module, data())
    return trainer


def test_apply_lora_walks_the_model_twice():
    model = Stack().model
    with counting_walks(model) as counts:
        apply_lora(model, LoRAConfig(targets=["q_proj", "v_proj"]))
    assert sum(counts.values()) <= 2, counts


def test_the_callback_adds_at_most_three_walks_to_lightnings_own(tmp_path):
    walks = {}
    for with_callback in (False, True):
        module = Stack()
        if not with_callback:
            apply_lora(module, LoRAConfig(targets=["q_proj", "v_proj"]))
        with counting_walks(module) as counts:
            probe = WalksUntilTraining(counts)
            extra = [LoRACallback(targets=["q_proj", "v_proj"])] if with_callback else []
            fit(module, [*extra, probe], tmp_path / str(with_callback))
        walks[with_callback] = probe.seen
    assert walks[True] - walks[False] <= 3, walks


@pytest.fixture
def plans(monkeypatch):
    calls = []
    plan = adaptation_module.plan_adapters
    monkeypatch.setattr(adaptation_module, "plan_adapters", lambda *args: calls.append(1) or plan(*args))
    return calls


def test_the_model_is_planned_once_per_setup_on_one_device(tmp_path, plans):
    module = Stack()
    fit(module, [LoRACallback(targets=["q_proj"])], tmp_path)
    assert len(plans) == 1


def test_the_model_is_planned_once_per_setup_under_model_parallel(tmp_path, plans):
    module = Stack(shard=True)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    environment = dict(os.environ)  # the strategy sets MASTER_PORT & co., which later process groups would reuse
    try:
        fit(module, [LoRACallback(targets=["q_proj"])], tmp_path, strategy=strategy, accelerator="cpu", devices=1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert len(plans) == 1


def test_a_checkpoint_save_reads_each_base_weight_once_and_serialises_once(tmp_path, monkeypatch):
    module = Stack()
    trainer = fit(module, [LoRACallback(targets=["q_proj", "v_proj"])], tmp_path)
    sampled: Counter = Counter()
    sample, save, copies = fingerprint_module._sample, adapter_file_module.save_tensors, adapter_file_module._copies
    saves, gathers = [], []
    monkeypatch.setattr(fingerprint_module, "_sample", lambda tensor: sampled.update([id(tensor)]) or sample(tensor))
    monkeypatch.setattr(adapter_file_module, "save_tensors", lambda *a, **k: saves.append(1) or save(*a, **k))
    monkeypatch.setattr(adapter_file_module, "_copies", lambda tensors: gathers.append(1) or copies(tensors))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    base_weights = sum(1 for p in module.parameters() if not p.requires_grad)
    assert len(sampled) == base_weights and set(sampled.values()) == {1}  # one fingerprint's worth of reads
    assert (len(saves), len(gathers)) == (1, 1)
    assert (tmp_path / "one.lora.safetensors").exists()

"""Multi-process strategies on CPU (gloo, 2 processes): the spawn launcher's round trip."""

import os
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from conftest import run_script
from lightning_models import Classifier, data

from lightning_lora import LoRACallback, apply_lora, read_adapter

SPAWN = {"strategy": "ddp_spawn", "accelerator": "cpu", "devices": 2, "max_epochs": 1, "logger": False, "enable_progress_bar": False}


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Lightning keeps the port it found for a launch in MASTER_PORT: a later launch in this process would
    # reuse it while the previous group may still hold it (EADDRINUSE); each test finds its own
    monkeypatch.delenv("MASTER_PORT", raising=False)


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


def test_ddp_spawn_resumes_exactly(tmp_path):
    from lightning_models import SGDClassifier, data as batches

    torch.manual_seed(0)
    base = SGDClassifier().state_dict()

    def fit(folder, max_epochs, ckpt_path=None):
        torch.manual_seed(1)
        model = SGDClassifier()
        model.load_state_dict(base)
        callback = LoRACallback(targets=["qkv"])
        apply_lora(model, callback.config)
        saver = ModelCheckpoint(dirpath=folder, save_top_k=-1)
        settings = {**SPAWN, "max_epochs": max_epochs, "use_distributed_sampler": False}
        L.Trainer(default_root_dir=folder, callbacks=[callback, saver], **settings).fit(model, batches(), ckpt_path=ckpt_path)
        return {key: value for key, value in model.state_dict().items() if "matrix_" in key}

    straight = fit(tmp_path / "straight", 2)
    resumed = fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "straight" / "epoch=0-step=8.ckpt")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in straight.items() if "matrix_B" in k)


def _run(script, *args, timeout=600, cwd=None):
    """Runs a Python script in its own processes (Lightning launches the second rank itself)."""

    done = run_script(script, *args, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stderr[-5000:]


def _one_process_reference(cls, base, folder):
    """The scripts' training in one process, each step's batch the two ranks' batches together:
    the trained model, and the 2-norm over all gradients at every optimizer step."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)  # as the scripts: the adapters are initialised from the same random state
    reference = cls()
    reference.load_state_dict(base)
    norms = []

    class NormRecorder(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.double().reshape(-1) for p in pl_module.parameters() if p.grad is not None]
            norms.append(torch.cat(grads).norm().item())

    tokens = torch.randint(0, 32, (64, 6), generator=torch.Generator().manual_seed(0))
    L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
              default_root_dir=folder / "reference", callbacks=[LoRACallback(targets=["qkv", "fc1"]), NormRecorder()]).fit(
        reference, DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=8)
    )
    return reference, norms


def _assert_equal_to(reference, state, atol=1e-6):
    from lightning_lora import lora_state_dict

    expected = lora_state_dict(reference)
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].shape == tensor.shape, key  # whole tensors, not one rank's shard
        torch.testing.assert_close(state[key], tensor, rtol=atol, atol=atol)


def _logged_grad_norms(folder):
    """``lora/grad_norm`` as the scripts' CSVLogger wrote it."""
    import csv

    with open(folder / "logs" / "version_0" / "metrics.csv") as file:
        return [float(row["lora/grad_norm"]) for row in csv.DictReader(file) if row.get("lora/grad_norm")]


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import lightning as L
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_models import SGDClassifier
from lightning_lora import LoRACallback, lora_state_dict

torch.manual_seed(0)
tokens = torch.randint(0, 32, (64, 6), generator=torch.Generator().manual_seed(0))
dataset = TensorDataset(tokens, tokens[:, 0] % 3)
model = SGDClassifier()
model.load_state_dict(torch.load({base!r}, weights_only=True))
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, enable_progress_bar=False,
                    enable_model_summary=False, use_distributed_sampler=False, log_every_n_steps=1, deterministic=True,
                    logger=CSVLogger({folder!r}, name="logs", version=0),
                    callbacks=[LoRACallback(targets=["qkv", "fc1"]), ModelCheckpoint(dirpath={folder!r} + "/ckpt", save_top_k=-1, save_last=True)])
sampler = DistributedSampler(dataset, num_replicas=2, rank=trainer.global_rank, shuffle=False)
trainer.fit(model, DataLoader(dataset, batch_size=4, sampler=sampler))
torch.save(lora_state_dict(model), {folder!r} + f"/rank{{trainer.global_rank}}.pt")

resumed = SGDClassifier()  # from the end of epoch 0, on the same world size
resumed.load_state_dict(torch.load({base!r}, weights_only=True))
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, enable_progress_bar=False, logger=False,
                    enable_model_summary=False, use_distributed_sampler=False, deterministic=True,
                    default_root_dir={folder!r} + "/resume", callbacks=[LoRACallback(targets=["qkv", "fc1"])])
trainer.fit(resumed, DataLoader(dataset, batch_size=4, sampler=sampler), ckpt_path={folder!r} + "/ckpt/epoch=0-step=8.ckpt")
torch.save(lora_state_dict(resumed), {folder!r} + f"/resumed{{trainer.global_rank}}.pt")
"""


def test_ddp_two_processes_match_one_process(tmp_path):
    from pathlib import Path

    from lightning_models import SGDClassifier

    torch.manual_seed(0)
    base = SGDClassifier().state_dict()
    torch.save(base, tmp_path / "base.pt")
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), base=str(tmp_path / "base.pt"), folder=str(tmp_path)))
    _run(script, timeout=300, cwd=tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical on every rank

    reference, norms = _one_process_reference(SGDClassifier, base, tmp_path)
    _assert_equal_to(reference, rank0)
    logged = _logged_grad_norms(tmp_path)
    assert len(logged) == len(norms) == 16
    assert logged == pytest.approx(norms, rel=1e-5)  # the global norm, not one rank's
    written = sorted(os.listdir(tmp_path / "ckpt"))  # one writer: one file of each, complete
    assert written == ["epoch=0-step=8.ckpt", "epoch=0-step=8.lora.safetensors", "epoch=1-step=16.ckpt",
                       "epoch=1-step=16.lora.safetensors", "last.ckpt", "last.lora.safetensors"]
    for rank in (0, 1):  # resumed at the epoch boundary: the same adapters as the run without a break
        resumed = torch.load(tmp_path / f"resumed{rank}.pt", weights_only=True)
        assert resumed.keys() == rank0.keys() and all(torch.equal(resumed[k], rank0[k]) for k in rank0)


DROPOUT_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import lightning as L
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_models import SGDClassifier
from lightning_lora import LoRACallback, lora_state_dict

tokens = torch.randint(0, 32, (64, 6), generator=torch.Generator().manual_seed(0))
dataset = TensorDataset(tokens, tokens[:, 0] % 3)

class Losses(Callback):
    def __init__(self):
        self.losses = []
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

def fit(name, ckpt_path=None, seed=0):
    model = SGDClassifier()
    model.load_state_dict(torch.load({base!r}, weights_only=True))
    losses = Losses()
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, enable_progress_bar=False, logger=False,
                        enable_model_summary=False, use_distributed_sampler=False, deterministic=True,
                        default_root_dir={folder!r} + "/" + name,
                        callbacks=[LoRACallback(targets=["qkv", "fc1"], dropout=0.3), losses,
                                   ModelCheckpoint(dirpath={folder!r} + "/" + name, save_top_k=-1)])
    torch.manual_seed(seed + 10 * trainer.global_rank)  # each rank draws its own dropout masks and order
    sampler = DistributedSampler(dataset, num_replicas=2, rank=trainer.global_rank, shuffle=True)
    trainer.fit(model, DataLoader(dataset, batch_size=4, sampler=sampler), ckpt_path=ckpt_path)
    torch.save({{"adapters": lora_state_dict(model), "losses": losses.losses}}, {folder!r} + f"/{{name}}{{trainer.global_rank}}.pt")

fit("straight")
fit("resumed", ckpt_path={folder!r} + "/straight/epoch=0-step=8.ckpt", seed=5)
"""


def test_ddp_resume_with_dropout_restores_each_ranks_random_states(tmp_path):
    from pathlib import Path

    from lightning_models import SGDClassifier

    torch.manual_seed(0)
    torch.save(SGDClassifier().state_dict(), tmp_path / "base.pt")
    script = tmp_path / "dropout_run.py"
    script.write_text(DROPOUT_SCRIPT.format(tests=str(Path(__file__).parent), base=str(tmp_path / "base.pt"), folder=str(tmp_path)))
    _run(script, timeout=300, cwd=tmp_path)
    straight = [torch.load(tmp_path / f"straight{rank}.pt", weights_only=True) for rank in (0, 1)]
    resumed = [torch.load(tmp_path / f"resumed{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert straight[0]["losses"][8:] != straight[1]["losses"][8:]  # the ranks drew differently
    for rank in (0, 1):
        assert resumed[rank]["losses"] == straight[rank]["losses"][8:], rank  # its own masks, step for step
        adapters, expected = resumed[rank]["adapters"], straight[rank]["adapters"]
        assert all(torch.equal(adapters[key], expected[key]) for key in expected), rank


# --- FSDP2: ModelParallelStrategy(data_parallel_size=2) ------------------------------------------


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    """Runs tests/fsdp2_run.py on 2 processes, then on one, and the same training in this process."""
    from pathlib import Path

    from lightning_models import MomentumClassifier, ShardedClassifier

    from lightning_lora import save_adapter

    folder = tmp_path_factory.mktemp("fsdp2")
    torch.manual_seed(0)
    base = ShardedClassifier().state_dict()
    torch.save(base, folder / "base.pt")
    reference, norms = _one_process_reference(MomentumClassifier, base, folder)
    save_adapter(reference, folder / "single.lora.safetensors")  # for the 1 -> 2 load
    script = Path(__file__).parent / "fsdp2_run.py"
    _run(script, str(folder), "two")
    _run(script, str(folder), "one")
    return folder, reference, norms


@pytest.mark.parametrize("run", ["sharded", "sharded_resume", "full_resume", "from_file"])
def test_fsdp2_adapters_are_identical_on_both_ranks_and_equal_one_process(fsdp2, run):
    folder, reference, _ = fsdp2
    rank0, rank1 = (torch.load(folder / f"{run}.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    _assert_equal_to(reference, rank0)


@pytest.mark.parametrize("run", ["sharded_resume", "full_resume"])
def test_fsdp2_resume_at_an_epoch_boundary_is_bit_exact(fsdp2, run):
    folder = fsdp2[0]
    straight = torch.load(folder / "sharded.rank0.pt", weights_only=True)
    resumed = torch.load(folder / f"{run}.rank0.pt", weights_only=True)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_fsdp2_resume_with_dropout_restores_each_ranks_random_states(fsdp2):
    folder = fsdp2[0]
    for rank in (0, 1):
        straight = torch.load(folder / f"dropout.rank{rank}.pt", weights_only=True)
        resumed = torch.load(folder / f"dropout_resume.rank{rank}.pt", weights_only=True)
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), rank
        losses = [torch.load(folder / f"{name}.losses{rank}.pt", weights_only=True) for name in ("dropout", "dropout_resume")]
        assert losses[1] == losses[0][8:], rank
    ranks = [torch.load(folder / f"dropout.losses{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0] != ranks[1]


def test_fsdp2_sharded_checkpoint_resumes_on_one_process(fsdp2):
    folder, reference, _ = fsdp2
    _assert_equal_to(reference, torch.load(folder / "other_world.rank0.pt", weights_only=True))


def test_fsdp2_with_the_mixin_alone_writes_slim_verified_checkpoints_and_resumes(fsdp2):
    from torch.distributed.checkpoint import FileSystemReader

    from lightning_lora.lightning import check_companion

    folder, reference, _ = fsdp2
    stored = FileSystemReader(str(folder / "mixin" / "last.ckpt")).read_metadata().state_dict_metadata
    assert "state_dict.net.embed.weight" not in stored  # the mixin's setup slims them, as the callback does
    assert "state_dict.net.blocks.0.attn.qkv.matrix_A.weight" in stored
    assert check_companion(folder / "mixin" / "last.ckpt")
    _assert_equal_to(reference, torch.load(folder / "mixin_resume.rank0.pt", weights_only=True))


@pytest.mark.parametrize("run", ["sharded", "full"])
def test_fsdp2_checkpoints_are_slim_with_whole_companions(fsdp2, run):
    from lightning_lora import load_adapter, read_adapter
    from lightning_lora.formats import base_fingerprint
    from lightning_lora.lightning.checkpoint import CHECKPOINT_KEY

    folder, reference, _ = fsdp2
    names = sorted(os.listdir(folder / run))
    steps = ["epoch=0-step=8", "epoch=1-step=16"] if run == "sharded" else ["epoch=0-step=8"]
    assert names == sorted([*(f"{s}{ext}" for s in steps for ext in (".ckpt", ".lora.safetensors")), "last.ckpt", "last.lora.safetensors"])
    last = folder / run / "last.ckpt"
    if run == "sharded":  # a folder of shards, without the frozen base
        assert last.is_dir()
        record = torch.load(last / "meta.pt", weights_only=True)[CHECKPOINT_KEY]
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(str(last)).read_metadata().state_dict_metadata
        assert not any(key.startswith("state_dict.") and key[len("state_dict."):] in record["base_keys"] for key in stored)
    else:  # one file, written by rank 0, without the frozen base
        checkpoint = torch.load(last, weights_only=True)
        record = checkpoint[CHECKPOINT_KEY]
        assert not set(record["base_keys"]) & set(checkpoint["state_dict"])
    assert "net.embed.weight" in record["base_keys"]
    companion = read_adapter(folder / run / "last.lora.safetensors")
    assert companion.checkpoint == {"epoch": len(steps) - 1, "global_step": 8 * len(steps)}
    # fingerprints read from 2 processes' shards equal those of the whole tensors in one process
    fresh = type(reference)()
    fresh.load_state_dict(torch.load(folder / "base.pt", weights_only=True))
    assert companion.base_fingerprint == base_fingerprint(fresh, [])
    load_adapter(fresh, folder / run / "last.lora.safetensors")  # 2 -> 1: checks the base, whole tensors
    if run == "sharded":
        _assert_equal_to(reference, companion.tensors)


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_fsdp2_save_checkpoint_after_fit_is_slim_with_a_whole_companion(fsdp2, kind):
    from lightning_lora import read_adapter
    from lightning_lora.lightning.checkpoint import CHECKPOINT_KEY

    folder, reference, _ = fsdp2
    path = folder / "after_fit" / f"{kind}.ckpt"
    head = torch.load(path / "meta.pt" if kind == "sharded" else path, weights_only=True)
    assert "net.embed.weight" in head[CHECKPOINT_KEY]["base_keys"]
    companion = read_adapter(folder / "after_fit" / f"{kind}.lora.safetensors")
    trained = torch.load(folder / f"{'sharded' if kind == 'sharded' else 'full_resume'}.rank0.pt", weights_only=True)
    if kind == "sharded":  # the run's final adapters, whole
        assert companion.tensors.keys() == trained.keys()
        assert all(torch.equal(companion.tensors[k], trained[k]) for k in trained)
    else:  # the one-epoch run's: whole tensors of the right shapes
        assert {k: t.shape for k, t in companion.tensors.items()} == {k: t.shape for k, t in trained.items()}


def test_fsdp2_logged_grad_norm_is_the_global_norm(fsdp2):
    folder, _, norms = fsdp2
    logged = _logged_grad_norms(folder)
    assert len(logged) == len(norms) == 16
    assert logged == pytest.approx(norms, rel=1e-5)


@pytest.mark.parametrize(
    ("attempt", "message"),
    [
        ("apply_lora_after_fully_shard", r"cannot add adapters to modules \['blocks.0.attn.qkv'.* of a sharded model: .* add the adapters before fully_shard"),
        ("callback_after_fully_shard", r"cannot add adapters to modules \['net.blocks.0.attn.qkv'\] of a sharded model"),
        ("adapter_outside_fsdp", r"LoRA parameters \['net.head.matrix_A.weight'.* are plain tensors in a sharded model.*fully_shard on the root"),
        ("other_base", r"checkpoint was trained on different base weights"),
        ("true_precision", r"adapters were asked for in adapter_dtype='float32' but are \['bfloat16'\] now: .*MixedPrecisionPolicy"),
        ("other_targets", r"was trained with adapters on modules \['net.blocks.0.mlp.fc1', .* that this model does not have"),
        *[
            (f"flipped{name}", rf"epoch=0-step=8.ckpt does not match the digests its companion .*: .*epoch=0-step=8.ckpt/{re.escape(name)} "
             r"\(its bytes differ.*the newest checkpoint beside it that verifies is .*(last|epoch=1-step=16).ckpt")
            for name in ("__1_0.distcp", "meta.pt", ".metadata")
        ],
    ],
)
def test_fsdp2_unsynchronised_adapters_and_wrong_bases_are_refused(fsdp2, attempt, message):
    import json
    import re

    errors = json.loads((fsdp2[0] / "errors.json").read_text())
    assert re.search(message, errors[attempt]), errors[attempt]


def test_fsdp2_companions_record_every_file_of_a_sharded_folder_and_check_refuses_any_flipped_byte(fsdp2, tmp_path):
    import shutil

    from lightning_lora.lightning import adapter_path_for, check_companion
    from lightning_lora.lightning.digests import checkpoint_files

    copy = tmp_path / "sharded"
    shutil.copytree(fsdp2[0] / "sharded", copy, symlinks=True)
    path = copy / "epoch=1-step=16.ckpt"
    names = checkpoint_files(str(path))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(names)
    assert set(read_adapter(adapter_path_for(str(path))).checkpoint_files) == set(names)
    assert check_companion(path) is True
    for name in names:  # one byte flipped in each file: shards (adapters, optimizer state) and metadata
        target = path / name
        original = target.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        target.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=rf"{re.escape(name)} \(its bytes differ.*verifies is .*(last|epoch=0-step=8).ckpt"):
            check_companion(path)
        target.write_bytes(original)
    from lightning_lora.lightning import write_companion

    with pytest.raises(ValueError, match=r"checkpoint_path must be a checkpoint file, got .*, a folder: the companion of a sharded"):
        write_companion(path, torch.nn.Linear(2, 2))
    (path / "__0_0.distcp").rename(path / "__0_9.distcp")  # a shard missing, another not listed
    with pytest.raises(ValueError, match=r"__0_0.distcp \(missing\); .*__0_9.distcp \(not listed in its companion"):
        check_companion(path)


# --- HSDP: fully_shard over a 2-D (replicate, shard) mesh -----------------------------------------
# The FSDP2 runs again, on 2 processes as 2 replicas of 1 shard (the replicate dimension, which FSDP2
# lacks: gradients all-reduced between replicas) and as 1 replica of 2 shards; each check is the FSDP2
# test's, on these runs.


@pytest.fixture(scope="module", params=["2x1", "1x2"])
def hsdp(fsdp2, tmp_path_factory, request):
    """tests/fsdp2_run.py on an HSDP mesh (replicas x shards), then (with replicas) on one process, from
    the FSDP2 runs' base weights; the FSDP2 runs' one-process reference."""
    import shutil
    from pathlib import Path

    folder = tmp_path_factory.mktemp(f"hsdp{request.param}")
    for name in ("base.pt", "single.lora.safetensors"):
        shutil.copy(fsdp2[0] / name, folder / name)
    script = Path(__file__).parent / "fsdp2_run.py"
    _run(script, str(folder), "two", request.param)
    if request.param == "2x1":  # 1x2's checkpoint holds what FSDP2's does: its 2 -> 1 resume is FSDP2's
        _run(script, str(folder), "one", request.param)
    return folder, *fsdp2[1:]


@pytest.mark.parametrize("run", ["sharded", "sharded_resume", "full_resume", "from_file"])
def test_hsdp_adapters_are_identical_on_both_ranks_and_equal_one_process(hsdp, run):
    test_fsdp2_adapters_are_identical_on_both_ranks_and_equal_one_process(hsdp, run)


@pytest.mark.parametrize("run", ["sharded_resume", "full_resume"])
def test_hsdp_resume_at_an_epoch_boundary_is_bit_exact(hsdp, run):
    test_fsdp2_resume_at_an_epoch_boundary_is_bit_exact(hsdp, run)


@pytest.mark.parametrize("hsdp", ["2x1"], indirect=True)
def test_hsdp_sharded_checkpoint_resumes_on_one_process(hsdp):
    test_fsdp2_sharded_checkpoint_resumes_on_one_process(hsdp)


@pytest.mark.parametrize("run", ["sharded", "full"])
def test_hsdp_checkpoints_are_slim_with_whole_companions(hsdp, run):
    test_fsdp2_checkpoints_are_slim_with_whole_companions(hsdp, run)


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_hsdp_save_checkpoint_after_fit_is_slim_with_a_whole_companion(hsdp, kind):
    test_fsdp2_save_checkpoint_after_fit_is_slim_with_a_whole_companion(hsdp, kind)


def test_hsdp_logged_grad_norm_is_the_global_norm(hsdp):
    test_fsdp2_logged_grad_norm_is_the_global_norm(hsdp)


def test_hsdp_companions_record_every_file_of_a_sharded_folder(hsdp, tmp_path):
    test_fsdp2_companions_record_every_file_of_a_sharded_folder_and_check_refuses_any_flipped_byte(hsdp, tmp_path)


def test_hsdp_resume_with_dropout_restores_each_ranks_random_states(hsdp):
    test_fsdp2_resume_with_dropout_restores_each_ranks_random_states(hsdp)


def test_hsdp_replicas_start_from_the_same_adapters_whatever_each_ranks_random_state(hsdp):
    folder = hsdp[0]  # the dropout run: each rank seeded its own random state before fit
    rank0, rank1 = (torch.load(folder / f"dropout.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


# --- FSDP2 with expert adapters (mixture of experts) ---------------------------------------------


@pytest.fixture(scope="module")
def fsdp2_moe(tmp_path_factory):
    """tests/fsdp2_moe_run.py on 2 processes, and the same training on one, unsharded, in this process."""
    from pathlib import Path

    from fsdp2_moe_run import TARGETS, MoELM, tokens
    from torch.utils.data import DataLoader

    folder = tmp_path_factory.mktemp("fsdp2_moe")
    _run(Path(__file__).parent / "fsdp2_moe_run.py", str(folder))
    reference = MoELM(shard=False)
    L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
              default_root_dir=folder / "reference", callbacks=[LoRACallback(r=4, alpha=8, bias=False, targets=TARGETS)]).fit(
        reference, DataLoader(tokens(), batch_size=16)
    )
    return folder, reference


def test_fsdp2_expert_adapters_are_identical_on_both_ranks_and_equal_one_process(fsdp2_moe):
    folder, reference = fsdp2_moe
    rank0, rank1 = (torch.load(folder / f"sharded.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any("experts.gate_up_proj.matrix_A" in key for key in rank0)
    _assert_equal_to(reference, rank0, atol=1e-5)


def test_fsdp2_expert_adapters_resume_exactly_from_whole_companions(fsdp2_moe):
    from lightning_lora import read_adapter

    folder, _ = fsdp2_moe
    straight, resumed = (torch.load(folder / f"{run}.rank0.pt", weights_only=True) for run in ("sharded", "sharded_resume"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    companion = read_adapter(folder / "sharded" / "epoch=1-step=4.lora.safetensors")
    for key, tensor in straight.items():  # whole tensors, not one rank's shard
        assert torch.equal(companion.tensors[key.removeprefix("model.")], tensor), key

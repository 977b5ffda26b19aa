"""FSDP2 and HSDP runs for tests/test_distributed.py: ``python fsdp2_run.py FOLDER two|one [MESH]``.

``two``: 2 processes (Lightning launches the second), ``ModelParallelStrategy(data_parallel_size=2)``,
every run in lockstep on both ranks. ``one``: the same strategy on one process, for the runs that
end in an error (Lightning stops the other processes of a failed multi-process run) and for
resuming the 2-process checkpoints on another world size. Results go to FOLDER.

``MESH`` (``2x1``: 2 replicas of 1 shard; ``1x2``): HSDP, the model sharded over that 2-D
``(replicate, shard)`` mesh of the 2 processes (``HybridShardedClassifier``), for the same runs; ``one``
then only resumes the 2-process sharded checkpoint on one process (a 1x1 mesh): the refusals are FSDP2's.
"""

import json
import shutil
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from lightning_models import HybridShardedClassifier, ShardedClassifier  # noqa: E402

from lightning_lora import LoRACallback, LoRAMixin, apply_lora, lora_modules, lora_state_dict  # noqa: E402

TARGETS = ["qkv", "fc1"]
folder, mode = Path(sys.argv[1]), sys.argv[2]
world = 2 if mode == "two" else 1
mesh = sys.argv[3] if len(sys.argv) > 3 else None
_, shards = map(int, mesh.split("x")) if mesh else (1, world)  # replicas x shards of the 2-process runs
# one process is one replica of one shard
Model = partial(HybridShardedClassifier, shards=min(shards, world)) if mesh else ShardedClassifier
base = torch.load(folder / "base.pt", weights_only=True)
tokens = torch.randint(0, 32, (64, 6), generator=torch.Generator().manual_seed(0))
dataset = TensorDataset(tokens, tokens[:, 0] % 3)


def fresh(cls=None):
    torch.manual_seed(0)  # the adapters start from the same random state as the reference's
    model = (cls or Model)()
    model.load_state_dict(base)
    return model


def trainer(name, max_epochs, full=False, callback=None, logger=False):
    """A Trainer with a LoRACallback (``callback=False``: none) and a ModelCheckpoint keeping every epoch."""
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=not full)
    saver = ModelCheckpoint(dirpath=folder / name, save_top_k=-1, save_last=True)
    lora = [LoRACallback(targets=TARGETS)] if callback is None else [callback] if callback else []
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_epochs=max_epochs, logger=logger,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     log_every_n_steps=1, deterministic=True, default_root_dir=folder / name,
                     callbacks=[*lora, saver])


def loader(rank):  # each step's two batches of 4 are the reference's batch of 8
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=8 // world, sampler=sampler)


def record(name, model, rank):
    state = lora_state_dict(model)  # every rank: the shards are gathered
    torch.save(state, folder / f"{name}.rank{rank}.pt")


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


if mode == "two":
    run = trainer("sharded", 2, logger=CSVLogger(folder, name="logs", version=0))
    model = fresh()
    run.fit(model, loader(run.global_rank))
    record("sharded", model, run.global_rank)
    run.save_checkpoint(folder / "after_fit" / "sharded.ckpt")  # after fit, on every rank

    run = trainer("sharded_resume", 2)  # exact resume at an epoch boundary
    model = fresh()
    run.fit(model, loader(run.global_rank), ckpt_path=folder / "sharded" / "epoch=0-step=8.ckpt")
    record("sharded_resume", model, run.global_rank)

    run = trainer("full", 1, full=True)  # full (gathered) checkpoints: one file, written by rank 0
    model = fresh()
    run.fit(model, loader(run.global_rank))
    run.save_checkpoint(folder / "after_fit" / "full.ckpt")
    run = trainer("full_resume", 2, full=True)
    model = fresh()
    run.fit(model, loader(run.global_rank), ckpt_path=folder / "full" / "last.ckpt")
    record("full_resume", model, run.global_rank)

    dropout_runs = [("dropout", None), ("dropout_resume", folder / "dropout" / "epoch=0-step=8.ckpt")]
    for name, ckpt_path in dropout_runs:
        run = trainer(name, 2, callback=LoRACallback(targets=TARGETS, dropout=0.3))
        losses = Losses()
        run.callbacks.append(losses)
        model = fresh()
        torch.manual_seed(100 + 10 * run.global_rank + (ckpt_path is not None))  # each rank its own masks
        run.fit(model, loader(run.global_rank), ckpt_path=ckpt_path)
        record(name, model, run.global_rank)
        torch.save(losses.losses, folder / f"{name}.losses{run.global_rank}.pt")

    run = trainer("from_file", 1, callback=LoRACallback(adapter_path=folder / "single.lora.safetensors"))
    model = fresh()  # 1 -> 2: an adapter file of a one-process run, into the sharded model
    run.validate(model, loader(run.global_rank))
    record("from_file", model, run.global_rank)
else:
    run = trainer("other_world", 2)  # 2 -> 1: the 2-process sharded checkpoint, resumed on one process
    model = fresh()
    run.fit(model, loader(0), ckpt_path=folder / "sharded" / "epoch=0-step=8.ckpt")
    record("other_world", model, 0)
    if mesh is not None:  # the refusals below are FSDP2's, whatever the mesh
        sys.exit()

    class AdaptedAfterSharding(ShardedClassifier):
        def configure_model(self):
            super().configure_model()
            apply_lora(self.net, LoRACallback(targets=TARGETS).config)

    class BuiltAndShardedInConfigureModel(ShardedClassifier):
        def __init__(self):
            super().__init__()
            self.net.blocks[0].attn["qkv"] = None  # (re)built in configure_model, as large models are

        def configure_model(self):
            if self.net.blocks[0].attn["qkv"] is None:
                self.net.blocks[0].attn["qkv"] = torch.nn.Linear(16, 48)
            super().configure_model()

    class RootNotSharded(ShardedClassifier):
        shard_root = False

    errors = {}
    attempts = {
        "apply_lora_after_fully_shard": (AdaptedAfterSharding, False),
        "callback_after_fully_shard": (BuiltAndShardedInConfigureModel, LoRACallback(targets=TARGETS)),
        "adapter_outside_fsdp": (RootNotSharded, LoRACallback(targets=[*TARGETS, "head"])),
    }
    for name, (cls, callback) in attempts.items():
        try:
            trainer(name, 1, callback=callback).fit(cls(), loader(0))
        except Exception as err:  # noqa: BLE001  (recorded for the test to check)
            errors[name] = f"{type(err).__name__}: {err}"
    other = fresh()  # another base model: resuming the sharded checkpoint into it is refused
    with torch.no_grad():
        other.net.blocks[1].mlp["fc2"].weight.add_(1.0)
    try:
        trainer("other_base", 2).fit(other, loader(0), ckpt_path=folder / "sharded" / "epoch=0-step=8.ckpt")
    except Exception as err:  # noqa: BLE001
        errors["other_base"] = f"{type(err).__name__}: {err}"
    try:  # a '*-true' precision casts the sharded adapters with the model
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
        L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=1, logger=False, precision="bf16-true",
                  enable_checkpointing=False, enable_progress_bar=False, default_root_dir=folder / "bf16",
                  callbacks=[LoRACallback(targets=TARGETS, adapter_dtype="float32")]).fit(fresh(), loader(0))
    except Exception as err:  # noqa: BLE001
        errors["true_precision"] = f"{type(err).__name__}: {err}"
    try:  # a checkpoint trained with other targets
        trainer("other_targets", 2, callback=LoRACallback(targets=["qkv"])).fit(
            fresh(), loader(0), ckpt_path=folder / "sharded" / "epoch=0-step=8.ckpt"
        )
    except Exception as err:  # noqa: BLE001
        errors["other_targets"] = f"{type(err).__name__}: {err}"
    for name in ("__1_0.distcp", "meta.pt", ".metadata"):  # one byte flipped in a copy of a sharded checkpoint
        copy = folder / f"flipped{name}"
        shutil.copytree(folder / "sharded", copy, symlinks=True)
        target = copy / "epoch=0-step=8.ckpt" / name
        content = bytearray(target.read_bytes())
        content[len(content) // 2] ^= 0x01
        target.write_bytes(bytes(content))
        try:
            trainer(f"flipped_resume{name}", 2).fit(fresh(), loader(0), ckpt_path=copy / "epoch=0-step=8.ckpt")
        except Exception as err:  # noqa: BLE001
            errors[f"flipped{name}"] = f"{type(err).__name__}: {err}"
    (folder / "errors.json").write_text(json.dumps(errors, indent=1))

    class MixinSharded(LoRAMixin, ShardedClassifier):  # the mixin alone: adapters in configure_model
        def configure_model(self):
            if not lora_modules(self):
                self.apply_lora(targets=TARGETS)
            super().configure_model()

    trainer("mixin", 1, callback=False).fit(fresh(MixinSharded), loader(0))
    resumed = fresh(MixinSharded)
    trainer("mixin_resume", 2, callback=False).fit(resumed, loader(0), ckpt_path=folder / "mixin" / "last.ckpt")
    record("mixin_resume", resumed, 0)

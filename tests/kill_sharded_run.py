"""Sharded saves with one rank killed, for tests/test_sharded_kill.py: ``python kill_sharded_run.py FOLDER WHEN``.

Two processes train a ShardedClassifier with LoRACallback under ``ModelParallelStrategy``, saving a
sharded checkpoint and ``last.ckpt`` every epoch. Rank 1 kills itself (SIGKILL) during the second save
of ``last.ckpt`` (the one that replaces a complete one): ``before`` it writes its shard, or ``after``
every rank wrote its shard (before the checkpoint is published). It writes ``FOLDER/killed`` first.
``python kill_sharded_run.py FOLDER resume`` resumes ``last.ckpt`` on one process for one more epoch.
"""

import os
import signal
import sys
from pathlib import Path

import lightning as L
import lightning.pytorch.strategies.model_parallel as model_parallel
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from lightning_models import ShardedClassifier  # noqa: E402

from lightning_lora import LoRACallback  # noqa: E402

folder, when = Path(sys.argv[1]), sys.argv[2]
world = 1 if when == "resume" else 2
save = model_parallel._distributed_checkpoint_save
saves_of_last = []


def killing_save(state, path):
    """Lightning's sharded save, with rank 1 killed around its second save of last.ckpt."""
    if "last.ckpt" in os.path.basename(str(path)):
        saves_of_last.append(path)
    kill = torch.distributed.get_rank() == 1 and len(saves_of_last) == 2
    if kill and when == "before":
        _die()
    save(state, path)
    if kill and when == "after":
        _die()


def _die():
    (folder / "killed").write_text("rank 1")
    os.kill(os.getpid(), signal.SIGKILL)


model_parallel._distributed_checkpoint_save = killing_save
tokens = torch.randint(0, 32, (32, 6), generator=torch.Generator().manual_seed(0))
dataset = TensorDataset(tokens, tokens[:, 0] % 3)
strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
saver = ModelCheckpoint(dirpath=folder / "checkpoints", save_top_k=-1, save_last=True)
trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_epochs=4 if when == "resume" else 3,
                    logger=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                    callbacks=[LoRACallback(targets=["qkv", "fc1"]), saver])
torch.manual_seed(0)
model = ShardedClassifier()
sampler = DistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)
ckpt_path = folder / "checkpoints" / "last.ckpt" if when == "resume" else None
trainer.fit(model, DataLoader(dataset, batch_size=8 // world, sampler=sampler), ckpt_path=ckpt_path)
(folder / f"done.{when}").write_text(str(trainer.global_step))

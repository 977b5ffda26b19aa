"""FSDP2 run of expert adapters for tests/test_distributed.py: ``python fsdp2_moe_run.py FOLDER``.

2 processes (Lightning launches the second), ``ModelParallelStrategy(data_parallel_size=2)``: a tiny
Qwen3-MoE whose decoder layers and root are sharded in ``configure_model``, with adapters on its
attention and expert weights; two epochs with sharded checkpoints, then a resume from the first.
Each rank's adapters (gathered) go to FOLDER.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import qwen3_moe  # noqa: E402

from lightning_lora import LoRACallback, lora_state_dict  # noqa: E402

TARGETS = ["q_proj", "experts.gate_up_proj", "experts.down_proj"]


class MoELM(L.LightningModule):
    def __init__(self, shard=True):
        super().__init__()
        torch.manual_seed(0)
        self.model = qwen3_moe()
        self.shard = shard

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not self.shard or isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def tokens():
    return TensorDataset(torch.randint(0, 64, (32, 7), generator=torch.Generator().manual_seed(0)))


def trainer(folder, name, world):
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_epochs=2, logger=False, deterministic=True,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     default_root_dir=folder / name, callbacks=[LoRACallback(r=4, alpha=8, bias=False, targets=TARGETS),
                                                               ModelCheckpoint(dirpath=folder / name, save_top_k=-1)])


if __name__ == "__main__":
    folder = Path(sys.argv[1])  # read here only: test_distributed.py imports this module
    for name, resume in (("sharded", None), ("sharded_resume", folder / "sharded" / "epoch=0-step=2.ckpt")):
        run = trainer(folder, name, 2)
        model = MoELM()
        sampler = DistributedSampler(tokens(), num_replicas=2, rank=run.global_rank, shuffle=False)
        run.fit(model, DataLoader(tokens(), batch_size=8, sampler=sampler), ckpt_path=resume)
        torch.save(lora_state_dict(model), folder / f"{name}.rank{run.global_rank}.pt")  # every rank: gathered

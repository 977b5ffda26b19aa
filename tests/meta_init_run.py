"""A model built on the meta device under ModelParallelStrategy, for tests/test_base_names.py.

``python meta_init_run.py FOLDER WORLD VARIANT``: ``configure_model`` builds the network on the meta
device, adapts it (``VARIANT``: ``lora`` or ``dora``) and shards it; Lightning materialises it; the
pretrained weights (``FOLDER/pretrained.pt``, the base model's own names) are loaded in
``on_fit_start`` with ``load_base_weights``, on every rank. Each rank saves the logits right after
the load, and the gathered adapters and the losses after one epoch, to FOLDER.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TinyModel  # noqa: E402

from lightning_lora import LoRAConfig, apply_lora, load_base_weights, lora_parameters, lora_state_dict  # noqa: E402

folder, world, variant = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tokens = torch.randint(0, 32, (32, 6), generator=torch.Generator().manual_seed(0))


class MetaBuilt(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = None
        self.losses = []

    def configure_model(self) -> None:
        with torch.device("meta"):  # as large models are built: no memory until sharded
            self.net = TinyModel()
        apply_lora(self.net, LoRAConfig(r=4, targets=["qkv", "fc1"], use_dora=variant == "dora"))
        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def on_fit_start(self) -> None:
        load_base_weights(self.net, torch.load(folder / "pretrained.pt", weights_only=True))
        with torch.no_grad():
            torch.save(self.net(tokens[:4]), folder / f"start.rank{self.global_rank}.pt")

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(lora_parameters(self.net), lr=1e-2)


model = MetaBuilt()
strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_epochs=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    use_distributed_sampler=False)
sampler = DistributedSampler(TensorDataset(tokens), num_replicas=world, rank=trainer.global_rank, shuffle=False)
trainer.fit(model, DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=4, sampler=sampler))
adapters = lora_state_dict(model.net)  # every rank: the shards are gathered
torch.save({"adapters": adapters, "losses": torch.tensor(model.losses)}, folder / f"end.rank{trainer.global_rank}.pt")

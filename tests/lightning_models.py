"""Small LightningModules and data for the integration tests."""

import lightning as L
import torch
from conftest import TinyModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRAMixin

BATCH = 8


def data(n: int = 64, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (n, 6), generator=generator)
    labels = tokens[:, 0] % 3  # learnable from the tokens
    return DataLoader(TensorDataset(tokens, labels), batch_size=BATCH)


class Classifier(L.LightningModule):
    """A LightningModule without the mixin: a small transformer classifier."""

    def __init__(self, lr: float = 1e-2, depth: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.lr = lr
        self.net = TinyModel(dim=dim, depth=depth)

    def forward(self, tokens):
        return self.net(tokens)

    def _loss(self, batch):
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class MixinClassifier(LoRAMixin, Classifier):
    lora_targets = ["attn.qkv", "mlp.fc1"]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.lora_parameters(), lr=self.lr)


class LazyClassifier(Classifier):
    """Creates its layers in ``configure_model``, as models built for sharding do."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.lr = 1e-2
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = TinyModel()


class SGDClassifier(Classifier):
    """Plain SGD: no optimizer state that amplifies rounding (Adam divides by tiny second moments), so
    runs that sum gradients in another order agree to float precision."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class MomentumClassifier(SGDClassifier):
    """SGD with momentum: an optimizer state to save and resume (Lightning's full checkpoints of
    ModelParallelStrategy fail to load an empty one)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


class ShardedClassifier(MomentumClassifier):
    """Shards each block, then the whole network, with FSDP2 in ``configure_model``, as
    ``ModelParallelStrategy`` asks (``shard_root=False`` leaves the network itself unsharded)."""

    shard_root = True

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net.blocks[0], FSDPModule):  # a second run of the same model
            return
        mesh = self.shard_mesh()
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        if self.shard_root:
            fully_shard(self.net, mesh=mesh)

    def shard_mesh(self):
        """The mesh ``fully_shard`` shards over: the strategy's data-parallel dimension."""
        return self.device_mesh["data_parallel"]


class HybridShardedClassifier(ShardedClassifier):
    """HSDP: ``fully_shard`` over a 2-D ``(replicate, shard)`` mesh built in ``configure_model``, the
    multi-node layout (each replica sharded within a node, gradients all-reduced between replicas).

    Args:
        shards: ranks that shard each replica; the world size divided by it is the number of replicas.
    """

    def __init__(self, shards: int = 1) -> None:
        super().__init__()
        self.shards = shards

    def shard_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        world = self.device_mesh.size()  # ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
        return init_device_mesh(self.device_mesh.device_type, (world // self.shards, self.shards),
                                mesh_dim_names=("replicate", "shard"))

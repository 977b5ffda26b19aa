"""The default task: a small vision transformer pretrained on digits 0-4, LoRA-adapted to digits 5-9.

The data is scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package, so
nothing is downloaded). The backbone is first trained on one task (digits 0-4) and saved as a
safetensors file; fine-tuning then loads those weights, replaces the head and adapts the backbone
to another task (digits 5-9), exactly as with any pretrained checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from safetensors.torch import load_file, save
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import LoRAMixin
from lightning_lora.formats.files import write_atomic

log = logging.getLogger(__name__)

#: Where the pretrained backbone is cached when no path is configured.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / ".weights" / "vit-digits-0to4.safetensors"


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8x8 digits restricted to ``classes``, labels renumbered 0..len(classes)-1.

    Args:
        classes: the digits of this task.
        val_fraction: share of the images held out for validation (a fixed, seeded split).
        batch_size: images per batch.
        seed: seed of the split.
    """

    def __init__(self, classes: list[int], val_fraction: float = 0.25, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if not classes or len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
            raise ValueError(f"classes must be distinct digits 0-9, got {classes!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.classes = list(classes)
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
        targets = torch.tensor(digits.target)
        keep = torch.isin(targets, torch.tensor(self.classes))
        images, targets = images[keep].unsqueeze(1), targets[keep]  # (N, 1, 8, 8)
        labels = torch.tensor([self.classes.index(int(t)) for t in targets])
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(labels) * self.val_fraction)
        self.train_set = TensorDataset(images[order[n_val:]], labels[order[n_val:]])
        self.val_set = TensorDataset(images[order[:n_val]], labels[order[:n_val]])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class Attention(nn.Module):
    """Multi-head self-attention with separate projections (q_proj, k_proj, v_proj, o_proj)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, heads, T, C / heads)
            return t.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        attended = nn.functional.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.o_proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: attn.{q,k,v,o}_proj and mlp.fc1, mlp.fc2."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, mlp_ratio * dim), "fc2": nn.Linear(mlp_ratio * dim, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp["fc2"](nn.functional.gelu(self.mlp["fc1"](self.norm2(x))))


class ViT(nn.Module):
    """A vision transformer for 8x8 images: 2x2 patches -> 16 tokens."""

    def __init__(self, num_classes: int, dim: int = 96, depth: int = 4, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(4, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, classes)
        patches = images.unfold(2, 2, 2).unfold(3, 2, 2).reshape(images.shape[0], 16, 4)  # (B, 16, 4)
        x = self.patch_embed(patches) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class DigitsClassifier(LoRAMixin, L.LightningModule):
    """Classifies digits with a (pretrained) ViT; trains whatever is left trainable.

    Args:
        num_classes: classes of this task.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        pretrained_path: safetensors file of a pretrained ViT; its head is replaced.
        backbone: ``ViT`` keyword arguments (dim, depth, heads, mlp_ratio).
    """

    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the attention projections

    def __init__(
        self,
        num_classes: int = 5,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        pretrained_path: str | None = None,
        backbone: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ViT(num_classes, **(backbone or {}))
        if pretrained_path is not None:
            load_pretrained(self.model, pretrained_path)
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels))
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def load_pretrained(model: ViT, path: str | Path) -> None:
    """Load a pretrained ViT's weights into ``model``, all but the head (a new task gets a new head).

    Raises:
        FileNotFoundError: if ``path`` does not exist. RuntimeError: if the weights do not fit.
    """
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise RuntimeError(f"{path} does not fit the model: missing {missing!r}, unexpected {unexpected!r}")


def pretrain(path: str | Path, classes: list[int], backbone: dict | None = None, epochs: int = 30, seed: int = 0) -> Path:
    """Train a ViT from scratch on ``classes`` and save its weights to ``path`` (safetensors)."""
    L.seed_everything(seed, verbose=False)
    model = DigitsClassifier(num_classes=len(classes), lr=2e-3, backbone=backbone)
    data = DigitsDataModule(classes, seed=seed)
    trainer = L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, data)
    accuracy = trainer.validate(model, data, verbose=False)[0]["val/acc"]
    log.info("pretrained backbone on digits %s: val/acc %.3f", classes, accuracy)
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    write_atomic(str(path), save(state, metadata={"task": f"digits {classes}", "val_acc": f"{accuracy:.4f}"}))
    return Path(path)


__all__ = ["DEFAULT_WEIGHTS", "DigitsClassifier", "DigitsDataModule", "ViT", "load_pretrained", "pretrain"]

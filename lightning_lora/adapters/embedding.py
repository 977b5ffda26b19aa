"""The ``embedding`` kind: :class:`LoRAEmbedding`, LoRA around ``nn.Embedding``.

``matrix_A`` is an ``nn.Embedding(num_embeddings, r)`` (normal init, the padding row zero) and
``matrix_B`` an ``nn.Linear(r, embedding_dim)`` starting at zero. With ``bias=True`` only ``matrix_B``
has a bias (a lookup has no input bias); it merges into every row of the table. In PEFT's format:
``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B`` (dim, r), without ``.weight``, and
no bias.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.adapters import registry
from lightning_lora.adapters.base import LoRABase, ZeroLinear, base_bias, base_weight, cast, check_dims, holding
from lightning_lora.adapters.spec import AdapterSpec


class LoRAEmbedding(LoRABase):
    """LoRA adapter around an ``nn.Embedding``.

    Arguments as for :class:`~lightning_lora.LoRA`; ``use_dora=True`` is refused with a ``ValueError``
    (DoRA is implemented for Linear and Conv1D layers only).
    """

    kind = "embedding"
    peft_a = ("lora_embedding_A", 0)
    peft_b = ("lora_embedding_B", 1)
    served_by_vllm = True
    peft_bias = False
    original_module: nn.Embedding
    matrix_A: nn.Embedding
    matrix_B: nn.Linear

    def create(self, spec: AdapterSpec) -> None:
        emb = self.original_module
        self.matrix_A = nn.Embedding(emb.num_embeddings, spec.r, padding_idx=emb.padding_idx, **self.factory)
        self.matrix_B = ZeroLinear(spec.r, emb.embedding_dim, bias=spec.bias, **self.factory)

    def reset_matrices(self) -> None:
        """Normal ``matrix_A`` (padding row zero); zero ``matrix_B`` weight and bias."""
        nn.init.normal_(base_weight(self.matrix_A))
        if self.matrix_A.padding_idx is not None:
            with torch.no_grad():
                base_weight(self.matrix_A)[self.matrix_A.padding_idx].zero_()
        for param in self.matrix_B.parameters(recurse=False):
            nn.init.zeros_(param)

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        num_embeddings, embedding_dim = base_weight(original_module).shape
        shapes: dict[str, tuple[int, ...]] = {"matrix_A.weight": (num_embeddings, spec.r), "matrix_B.weight": (embedding_dim, spec.r)}
        if spec.bias:
            shapes["matrix_B.bias"] = (embedding_dim,)
        return shapes

    def update(self, x: torch.Tensor) -> torch.Tensor:
        weight_b, bias_b = cast(self.matrix_B, base_weight(self.matrix_B).dtype)
        hidden = F.embedding(x, base_weight(self.matrix_A), self.matrix_A.padding_idx)  # (..., r)
        return F.linear(self.dropout(hidden), weight_b, bias_b)  # (..., embedding_dim)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.original_module(x)
        return result + (self.scaling * self.update(x)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        delta = base_weight(self.matrix_A).float() @ base_weight(self.matrix_B).float().T  # (num, dim)
        b_bias = base_bias(self.matrix_B)
        if b_bias is not None:
            delta = delta + b_bias.float()
        return self.scaling * delta

    def delta_bias(self) -> torch.Tensor | None:
        return None  # the adapter's bias is folded into every row of the table instead

    @classmethod
    def to_peft(
        cls, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, base: nn.Module | None, with_bias: bool, name: str
    ) -> dict[str, torch.Tensor]:
        if spec.bias:
            raise ValueError(f"PEFT has no bias for embedding adapters: module '{name}' has one; adapt it with bias=False")
        return {"lora_embedding_A": tensors["matrix_A.weight"].T.contiguous(), "lora_embedding_B": tensors["matrix_B.weight"]}

    @classmethod
    def from_peft(cls, tensors: Mapping[str, torch.Tensor], base: nn.Module, name: str, source: str) -> dict[str, torch.Tensor]:
        if "lora_B.bias" in tensors:
            raise ValueError(f"{source}: PEFT has no bias for embedding adapters, but module '{name}' has a lora_B.bias")
        return {"matrix_A.weight": tensors["lora_embedding_A"].T, "matrix_B.weight": tensors["lora_embedding_B"]}

    @classmethod
    def rebuild_base(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec
    ) -> nn.Module:
        check_dims(weight, (2,), spec)
        with torch.device("meta"):
            layer = nn.Embedding(weight.shape[0], weight.shape[1])
        return holding(layer, weight, None)


registry.add_type(nn.Embedding, LoRAEmbedding)

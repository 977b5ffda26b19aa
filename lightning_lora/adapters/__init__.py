"""The adapter layers: one class per kind of base layer, LoRA variants, and the registry of both.

=============== ==========================================================================
``kind``        ``AdapterKind``: the hooks a kind implements (shapes, update, delta weight, PEFT
                names, a plain base layer)
``base``        ``LoRABase``, what every kind shares (settings, forward, variant, merge and
                unmerge), ``build_adapter`` and ``register_adapter_kind``
``merging``     the merge into the base weights and the exact unmerge
``base_names``  pretrained weights loaded by the base model's own names (``q_proj.weight``)
``linear``      ``LoRA`` (``nn.Linear``, the seed layer) and ``LoRAConv1D`` (transformers' ``Conv1D``)
``conv``        ``LoRAConv`` (``nn.Conv1d/2d/3d``)
``embedding``   ``LoRAEmbedding`` (``nn.Embedding``)
``experts``     ``LoRAExperts``: the fused 3-D expert weights of MoE layers (a parameter, not a module),
                computed by the ``ExpertsContainer`` that stands in for their module
``variants``    ``Variant``, the interface of a LoRA variant, and ``register_variant``
``dora``        ``DoRA``, the built-in variant
``registry``    which kind adapts which layer type, and the variants by name
``spec``        ``AdapterSpec``, the settings of one adapter, and the validators of every setting
``fused``       the fused autograd node of a LoRA linear layer
=============== ==========================================================================

Importing this package registers the built-in kinds and DoRA.
"""

from lightning_lora.adapters.base import AdapterContainer, LoRABase, base_layer, build_adapter, register_adapter_kind
from lightning_lora.adapters.kind import AdapterKind
from lightning_lora.adapters.linear import LoRA, LoRAConv1D  # noqa: I001  (registration order: the error lists kinds so)
from lightning_lora.adapters.conv import LoRAConv
from lightning_lora.adapters.embedding import LoRAEmbedding
from lightning_lora.adapters.experts import ExpertsContainer, LoRAExperts, LoRAExpertsTransposed
from lightning_lora.adapters.dora import DoRA
from lightning_lora.adapters.registry import find_kind, kind_named, kind_of, parameter_kinds, variant_named
from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.adapters.variants import Variant, register_variant

__all__ = [
    "AdapterContainer",
    "AdapterKind",
    "AdapterSpec",
    "DoRA",
    "ExpertsContainer",
    "LoRA",
    "LoRABase",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRAExperts",
    "LoRAExpertsTransposed",
    "Variant",
    "base_layer",
    "build_adapter",
    "find_kind",
    "kind_named",
    "kind_of",
    "parameter_kinds",
    "register_adapter_kind",
    "register_variant",
    "variant_named",
]

"""LoRA fine-tuning for PyTorch and Lightning: adapter layers, model surgery, adapter files."""

__version__ = "0.1.0"

from lightning_lora.adapter_file import load_adapter, read_adapter, save_adapter  # noqa: E402
from lightning_lora.callback import LoRACallback  # noqa: E402
from lightning_lora.checkpoint import LoRACheckpointIO, adapter_path_for  # noqa: E402
from lightning_lora.config import LoRAConfig  # noqa: E402
from lightning_lora.fingerprint import base_fingerprint  # noqa: E402
from lightning_lora.hydra_config import LoRACallbackConf  # noqa: E402  (registers the Hydra "lora" group)
from lightning_lora.layers import LoRA, LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear  # noqa: E402
from lightning_lora.mixin import LoRAMixin  # noqa: E402
from lightning_lora.surgery import (  # noqa: E402
    LoRASummary,
    apply_lora,
    lora_config,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    lora_summary,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

__all__ = [
    "LoRA",
    "LoRACallback",
    "LoRACallbackConf",
    "LoRACheckpointIO",
    "LoRAConfig",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMixin",
    "LoRASummary",
    "__version__",
    "adapter_path_for",
    "apply_lora",
    "base_fingerprint",
    "load_adapter",
    "lora_config",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "lora_summary",
    "merge_and_unload",
    "merge_lora",
    "read_adapter",
    "save_adapter",
    "unmerge_lora",
]

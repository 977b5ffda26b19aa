"""LoRA fine-tuning for PyTorch and Lightning: adapter layers, model surgery, adapter files.

The package, module by module (each module's docstring says what it owns):

- ``spec``: ``AdapterSpec``, the settings of one adapter; ``config``: ``LoRAConfig``, all settings;
  ``patterns``: module name patterns; ``naming``: clean module names through wrappers;
- ``layers``: the adapter layers (``fused``: the fused linear autograd node); ``quantize``: 4-bit
  NF4 base weights (QLoRA);
- ``plan``: model + config -> specs; ``surgery``: install specs, merge, unload, state dicts;
- ``fingerprint``: base-weight fingerprints; ``files``: atomic rank-zero file IO;
  ``adapter_file``: the adapter file format; ``checkpoint``: slim Lightning checkpoints;
  ``peft_format``: export to and import from Hugging Face PEFT (and vLLM);
- ``callback``, ``mixin``: the Lightning integration; ``hydra_config``: the Hydra ``lora`` group.
"""

from lightning_lora.adapter_file import AdapterFile, library_version, load_adapter, read_adapter, save_adapter
from lightning_lora.callback import LoRACallback
from lightning_lora.checkpoint import (
    LoRACheckpointIO,
    adapter_path_for,
    check_companion,
    load_checkpoint,
    write_companion,
)
from lightning_lora.config import LoRAConfig
from lightning_lora.fingerprint import base_fingerprint
from lightning_lora.hydra_config import LoRACallbackConf  # importing it registers the Hydra "lora" group
from lightning_lora.layers import LoRA, LoRABase, LoRAConv, LoRAConv1D, LoRAEmbedding, LoRALinear
from lightning_lora.mixin import LoRAMixin
from lightning_lora.peft_format import export_peft, import_peft
from lightning_lora.plan import AdapterPlan, plan_adapters
from lightning_lora.spec import AdapterSpec
from lightning_lora.surgery import (
    Installation,
    LoRASummary,
    apply_lora,
    disable_adapters,
    install,
    lora_config,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    lora_summary,
    merge_and_unload,
    merge_lora,
    quantize_base,
    set_adapters_enabled,
    unmerge_lora,
)

__version__ = library_version()

__all__ = [
    "AdapterFile",
    "AdapterPlan",
    "AdapterSpec",
    "Installation",
    "LoRA",
    "LoRABase",
    "LoRACallback",
    "LoRACallbackConf",
    "LoRACheckpointIO",
    "LoRAConfig",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMixin",
    "LoRASummary",
    "__version__",
    "adapter_path_for",
    "apply_lora",
    "base_fingerprint",
    "export_peft",
    "import_peft",
    "check_companion",
    "disable_adapters",
    "install",
    "load_adapter",
    "load_checkpoint",
    "lora_config",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "lora_summary",
    "merge_and_unload",
    "merge_lora",
    "plan_adapters",
    "quantize_base",
    "read_adapter",
    "save_adapter",
    "set_adapters_enabled",
    "unmerge_lora",
    "write_companion",
]

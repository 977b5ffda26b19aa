"""LoRA fine-tuning for PyTorch and Lightning: adapter layers, model surgery, adapter files.

The package, by subpackage (each module's docstring says what it owns):

- ``adapters``: the adapter layers, one class per kind of base layer (``LoRA`` for ``nn.Linear``,
  ``LoRAConv``, ``LoRAEmbedding``, ``LoRAConv1D``), LoRA variants (DoRA) and their registry;
- ``surgery``: plan adapters for a model, install them, merge them, switch them off and on;
- ``formats``: adapter files, PEFT and vLLM folders, merged state dicts, base fingerprints;
- ``lightning``: ``LoRACallback``, ``LoRAMixin``, slim checkpoints and the Hydra ``lora`` group;
- ``config`` (``LoRAConfig``), ``patterns``, ``naming``, ``quantize``, ``sharding``, ``tasks`` (what a
  transformers model's class says: PEFT's task type, the new task head): what they all use; ``cli``:
  the ``lightning-lora`` command.

This module is the public surface; everything else is in the documented subpackages.
"""

from lightning_lora.adapters import LoRA, register_adapter_kind
from lightning_lora.adapters.base_names import load_base_weights
from lightning_lora.config import LoRAConfig
from lightning_lora.formats import export_peft, import_peft, load_adapter, read_adapter, save_adapter
from lightning_lora.formats.adapter_file import library_version
from lightning_lora.lightning import LoRACallback, LoRAMixin, load_checkpoint  # registers the Hydra "lora" group
from lightning_lora.surgery import (
    apply_lora,
    disable_adapters,
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
    "LoRA",
    "LoRACallback",
    "LoRAConfig",
    "LoRAMixin",
    "__version__",
    "apply_lora",
    "disable_adapters",
    "export_peft",
    "import_peft",
    "load_adapter",
    "load_base_weights",
    "load_checkpoint",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "lora_summary",
    "merge_and_unload",
    "merge_lora",
    "quantize_base",
    "read_adapter",
    "register_adapter_kind",
    "save_adapter",
    "set_adapters_enabled",
    "unmerge_lora",
]

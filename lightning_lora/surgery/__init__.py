"""Model surgery: plan adapters, install them, merge them, switch them, and read what a model holds.

=============== ==========================================================================
``plan``        ``plan_adapters``: model + config -> ``AdapterPlan``, without changing the model
``apply``       ``install`` (transactional, undoable), ``apply_lora``, ``quantize_base``
``merge``       ``merge_lora``, ``unmerge_lora``, ``merge_and_unload``
``switches``    ``disable_adapters``, ``set_adapters_enabled``
``state``       ``lora_modules``, ``lora_parameters``, ``lora_state_dict``, ``lora_summary``, the
                base weights under their original names
=============== ==========================================================================
"""

from lightning_lora.surgery.apply import Installation, apply_lora, install, quantize_base
from lightning_lora.surgery.merge import merge_and_unload, merge_lora, unmerge_lora
from lightning_lora.surgery.plan import AdapterPlan, plan_adapters
from lightning_lora.surgery.state import (
    LoRASummary,
    lora_config,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    lora_summary,
    trainable_modules,
)
from lightning_lora.surgery.switches import disable_adapters, set_adapters_enabled

__all__ = [
    "AdapterPlan",
    "Installation",
    "LoRASummary",
    "apply_lora",
    "disable_adapters",
    "install",
    "lora_config",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "lora_summary",
    "merge_and_unload",
    "merge_lora",
    "plan_adapters",
    "quantize_base",
    "set_adapters_enabled",
    "trainable_modules",
    "unmerge_lora",
]

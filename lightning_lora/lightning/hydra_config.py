"""The ``lora`` config group for Hydra apps, registered in Hydra's ConfigStore on import.

``lora/schema`` is a structured config of :class:`~lightning_lora.LoRACallback`'s arguments, so a
YAML file that lists it in its defaults is type-checked and closed: ``lora.r=abc`` or an unknown
key such as ``lora.rank=8`` fail while the config is composed, naming the key; values out of range
(``lora.alpha=-1``), flags other than true and false (``lora.log_grad_norm=2``, ``lora.bias=maybe``)
and settings that do not go together (``lora=dora lora.export_peft=vllm``) fail when the callback
is instantiated, naming the key, before any training. The flags are typed ``Any`` here because
OmegaConf's ``bool`` would turn ``2`` or ``yes`` into true without a word; the callback takes
``true`` and ``false`` only. A Hydra app can use it from the installed package, without copying YAML
files (``LoRACallback``'s defaults, overridable as usual: ``python your_app.py lora.r=8``)::

    # your_app/config.yaml
    defaults:
      - lora: schema
      - _self_

    # your_app/train.py
    import lightning_lora  # registers the lora group
    callback = hydra.utils.instantiate(cfg.lora)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

GROUP = "lora"


@dataclass
class LoRACallbackConf:
    """Arguments of ``lightning_lora.LoRACallback`` with its defaults (a test pins the two together)."""

    _target_: str = "lightning_lora.LoRACallback"
    r: int = 8
    alpha: float = 16.0
    bias: Any = False  # true, false or auto (a union OmegaConf cannot type; checked on instantiation)
    targets: Optional[List[str]] = None
    exclude: Tuple[str, ...] = ()
    dropout: float = 0.0
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    use_rslora: Any = False  # true or false, checked on instantiation
    use_dora: Any = False  # true or false, checked on instantiation
    trainable: Optional[List[str]] = None  # null: a transformers model's new task head
    adapter_dtype: Optional[str] = None
    quantize: Optional[str] = None
    adapter_path: Optional[str] = None
    adapter_root: Optional[str] = None
    save_base_weights: Any = False  # true or false, checked on instantiation
    log_grad_norm: Any = True  # true or false, checked on instantiation
    log_per_layer: Any = False  # true or false, checked on instantiation
    merge_on_end: Any = False  # true or false, checked on instantiation
    export_peft: Optional[str] = None


def register_configs() -> None:
    """Store ``lora/schema`` in Hydra's ConfigStore (YAML presets list it in their defaults).

    The schema is closed (unknown keys fail), except inside the pattern maps, whose keys are module
    patterns: Hydra merges a dict override into the existing node, so ``lora.rank_pattern={q_proj:8}``
    needs that node open to new keys (their values are still type-checked).
    """
    node = OmegaConf.structured(LoRACallbackConf)
    for name in ("rank_pattern", "alpha_pattern"):
        OmegaConf.set_struct(node[name], False)
    ConfigStore.instance().store(group=GROUP, name="schema", node=node)


register_configs()

"""The Lightning integration: the callback, the mixin, slim checkpoints and the Hydra config group.

==================== =====================================================================
``callback``         ``LoRACallback``: adapt, freeze, log and checkpoint, as one callback
``settings``         its arguments, validated, and the Trainers it refuses
``adaptation``       when and how it adapts the model, and the checks before a run starts
``wiring``           how its checkpoints plug into the strategy's IO
``metrics``          what it logs
``random_state``     the random states its checkpoints keep, for exact resume
``spawn``            the spawn launchers: the trained adapters back in the launching process
``mixin``            ``LoRAMixin``: the same abilities declared on the LightningModule
``checkpoint``       slim checkpoints and their companion adapter files: ``LoRACheckpointIO``,
                     ``adapter_path_for``, ``check_companion``, ``write_companion``, ``load_checkpoint``
``digests``          the SHA-256 of every file of a checkpoint, recorded in its companion and verified
                     before it is loaded
``model_parallel``   the same under ``ModelParallelStrategy`` (FSDP2), sharded or full
``hydra_config``     the Hydra ``lora`` group (``LoRACallbackConf``), registered on import
==================== =====================================================================
"""

from lightning_lora.lightning.callback import LoRACallback
from lightning_lora.lightning.checkpoint import (
    LoRACheckpointIO,
    adapter_path_for,
    check_companion,
    load_checkpoint,
    write_companion,
)
from lightning_lora.lightning.hydra_config import LoRACallbackConf
from lightning_lora.lightning.mixin import LoRAMixin

__all__ = [
    "LoRACallback",
    "LoRACallbackConf",
    "LoRACheckpointIO",
    "LoRAMixin",
    "adapter_path_for",
    "check_companion",
    "load_checkpoint",
    "write_companion",
]

"""File formats: adapter files, PEFT and vLLM folders, merged state dicts, fingerprints, atomic IO.

=================== ======================================================================
``adapter_file``    this package's ``.lora.safetensors`` adapter files: ``save_adapter``,
                    ``load_adapter``, ``read_adapter`` (an ``AdapterFile``)
``peft``            ``export_peft`` / ``import_peft``: Hugging Face PEFT's format
``peft_config``     PEFT folders read strictly: the files, the config field by field, its tensors
``vllm``            what vLLM serves, and the PEFT folder written for it (``target="vllm"``)
``state_dict``      ``merge_state_dict``: an adapter file merged into a plain state dict
``fingerprint``     ``base_fingerprint``: the identity of the base weights an adapter was trained on
``files``           atomic writes on global rank 0, reads, for local paths and fsspec URLs
=================== ======================================================================
"""

from lightning_lora.formats.adapter_file import AdapterFile, load_adapter, read_adapter, save_adapter
from lightning_lora.formats.fingerprint import base_fingerprint
from lightning_lora.formats.peft import export_peft, import_peft
from lightning_lora.formats.state_dict import merge_state_dict, read_state_dict

__all__ = [
    "AdapterFile",
    "base_fingerprint",
    "export_peft",
    "import_peft",
    "load_adapter",
    "merge_state_dict",
    "read_adapter",
    "read_state_dict",
    "save_adapter",
]

"""vLLM's own adapter loader (``PEFTHelper``, ``LoRAModel.from_local_checkpoint``), for tests that read exports with it.

Its parsing is plain Python: CI installs vLLM without its dependencies (``pip install --no-deps vllm``) and the
``vllm-loader`` extra for what the loader imports. Where vLLM is not installed the tests that use it skip.
"""

import pytest
import torch


def load_with_vllm(folder, expected_modules, monkeypatch):
    """vLLM's ``LoRAModel`` of the adapter folder ``folder``, as vLLM loads it."""
    lora_model = pytest.importorskip("vllm.lora.lora_model", reason="vLLM is not installed here (CI installs it)")
    from vllm.lora.peft_helper import PEFTHelper

    monkeypatch.setattr(lora_model, "PIN_MEMORY", False)  # no accelerator on this machine
    helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=64)
    return lora_model.LoRAModel.from_local_checkpoint(str(folder), set(expected_modules), helper, lora_model_id=1,
                                                      device="cpu", dtype=torch.float32)


def read_with_vllm(folder, expected_modules, monkeypatch):
    """Module name -> (lora_a, lora_b, scaling) as vLLM loads the adapter folder ``folder``."""
    loaded = load_with_vllm(folder, expected_modules, monkeypatch)
    return {name: (weights.lora_a, weights.lora_b, weights.scaling) for name, weights in loaded.loras.items()}

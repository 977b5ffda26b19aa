"""What vLLM serves, and the PEFT folder written for it (``export_peft(..., target="vllm")``).

vLLM reads PEFT's format with its own rules (``vllm.lora.peft_helper``, ``vllm.lora.lora_model``): one
global rank from :data:`VLLM_RANKS`, no LoRA biases, no DoRA, linear and embedding adapters and the fused
experts of gated MoE layers, and at most one fully trained module: a classification head named
``classifier`` or ``score`` (a weight and a bias). The export folds each module's scaling into its B
(``lora_alpha`` equals the rank) and pads ranks with zero rows and columns, which changes nothing.

:func:`check_vllm` holds these rules for adapters' settings, so that ``LoRACallback(export_peft="vllm")``
refuses what vLLM would refuse as soon as the model is adapted, before training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_lora.adapters.registry import kind_named, variant_named
from lightning_lora.adapters.spec import AdapterSpec

#: The ranks vLLM accepts (``--max-lora-rank``).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: The names of the one fully trained module vLLM serves (a classification head).
VLLM_HEADS = ("classifier", "score")


def check_vllm(specs: Mapping[str, AdapterSpec], trainable: Mapping[str, Iterable[str]], biased: Iterable[str]) -> None:
    """Refuse adapters that vLLM cannot serve, with the fix in the message.

    Args:
        specs: adapted module -> its settings.
        trainable: fully trained module -> the keys of its state dict.
        biased: the adapted modules whose adapters have a bias vLLM would have to add.

    Raises:
        ValueError: naming the modules and what to do instead.
    """
    unserved = [name for name, spec in specs.items() if spec.variant is not None and not variant_named(spec.variant).served_by_vllm]
    if unserved:
        if all(specs[name].use_dora for name in unserved):
            raise ValueError(
                f"vLLM serves no DoRA adapters (use_dora), but modules {unserved[:5]!r} use DoRA; export with "
                f"target='peft', or serve the model with its adapters merged (merge_and_unload)"
            )
        raise ValueError(f"vLLM serves no adapters of variant {specs[unserved[0]].variant!r}: modules {unserved[:5]!r}")
    kinds = [name for name, spec in specs.items() if not kind_named(spec.kind).served_by_vllm]
    if kinds:
        if all(specs[name].kind == "conv" for name in kinds):
            raise ValueError(f"vLLM serves linear and embedding adapters only, got convolutions {kinds[:5]!r}")
        raise ValueError(f"vLLM serves no adapters of kind {specs[kinds[0]].kind!r}: modules {kinds[:5]!r}")
    biased = list(biased)
    if biased:
        raise ValueError(
            f"vLLM serves no LoRA biases, but the adapters of modules {biased[:5]!r} have biases; adapt with "
            f"bias=False (the default), or export with target='peft'"
        )
    heads = [name for name, keys in trainable.items() if name.rpartition(".")[2] in VLLM_HEADS and set(keys) <= {"weight", "bias"}]
    if len(trainable) > 1 or len(heads) != len(trainable):
        raise ValueError(
            f"vLLM serves one fully trained module, a classification head named {' or '.join(map(repr, VLLM_HEADS))} "
            f"(a weight and a bias), but modules {list(trainable)[:5]!r} are trained fully; train fewer (trainable=[] "
            f"for none), or export with target='peft'"
        )
    largest = max((spec.r for spec in specs.values()), default=1)
    if largest > VLLM_RANKS[-1]:
        raise ValueError(f"vLLM serves ranks up to {VLLM_RANKS[-1]}, got r={largest}")


def for_vllm(
    specs: Mapping[str, AdapterSpec],
    converted: Mapping[str, dict[str, torch.Tensor]],
    trainable: Mapping[str, Iterable[str]],
    config: Mapping[str, Any],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, AdapterSpec], dict[str, Any]]:
    """PEFT's tensors (adapted module -> suffix -> tensor) and config as vLLM serves them: one rank, the scaling
    in B, no biases; expert weights in pairs; a classification head as vLLM names it in ``modules_to_save``.

    Raises:
        ValueError: for anything vLLM cannot serve (see :func:`check_vllm`).
    """
    biased = [name for name, own in converted.items() if "lora_B.bias" in own and own["lora_B.bias"].any()]
    check_vllm(specs, trainable, biased)
    largest = max(spec.r for spec in specs.values())
    rank = next(allowed for allowed in VLLM_RANKS if allowed >= largest)
    served: dict[str, dict[str, torch.Tensor]] = {}
    for name, spec in specs.items():
        kind = kind_named(spec.kind)
        own = {key: tensor for key, tensor in converted[name].items() if key != "lora_B.bias"}
        b_key = kind.peft_b[0]
        own[b_key] = (own[b_key].double() * spec.scaling).to(own[b_key].dtype)  # the global scaling is lora_alpha / rank = 1
        served[name] = kind.pad_rank(own, spec.r, rank)
    served, paired = _expert_pairs(served, dict(specs), rank)
    vllm = {
        **config,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "lora_bias": False,
        "modules_to_save": [name.rpartition(".")[2] for name in trainable] or None,
        "target_parameters": sorted(name for name, spec in paired.items() if kind_named(spec.kind).adapts_parameter) or None,
    }
    return served, paired, vllm


def _expert_pairs(
    served: dict[str, dict[str, torch.Tensor]], specs: dict[str, AdapterSpec], rank: int
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, AdapterSpec]]:
    """vLLM reads the adapters of a fused experts module as a pair, ``gate_up_proj`` (under ``base_layer``) and
    ``down_proj``: the one of a pair that was not trained is added with zeros, which changes nothing."""
    owners: dict[str, dict[str, str]] = {}
    for name, spec in specs.items():
        if kind_named(spec.kind).adapts_parameter:
            owner, _, parameter = name.rpartition(".")
            owners.setdefault(owner, {})[parameter] = name
    served, specs = dict(served), dict(specs)
    for owner, adapted in owners.items():
        if set(adapted) - {"gate_up_proj", "down_proj"}:
            raise ValueError(
                f"vLLM serves the fused experts of a gated MoE layer (gate_up_proj, down_proj), got expert weights "
                f"{sorted(adapted)} of '{owner}'"
            )
        if len(adapted) == 2:
            continue
        (parameter, name), = adapted.items()
        a, b = served[name]["lora_A.weight"], served[name]["lora_B.weight"]  # (experts * rank, in), (out, experts * rank)
        if parameter == "gate_up_proj":  # the missing down_proj reads the intermediate size, writes the hidden size
            zeros = {"lora_A.weight": a.new_zeros(a.shape[0], b.shape[0] // 2), "lora_B.weight": b.new_zeros(a.shape[1], b.shape[1])}
            other = f"{owner}.down_proj"
        else:
            zeros = {"lora_A.weight": a.new_zeros(a.shape[0], b.shape[0]), "lora_B.weight": b.new_zeros(2 * a.shape[1], b.shape[1])}
            other = f"{owner}.gate_up_proj"
        served[other] = zeros
        specs[other] = dataclasses.replace(specs[name], r=rank)
    return served, specs

"""Inference (no grad) time of this project's LoRA, unmerged and merged, against the base model.

Variants (same model, batch, sequence length, dtype and seed; adapters with non-zero weights):

- base: the model without adapters;
- lightning-lora unmerged: ``apply_lora``, the adapters computed beside the base layers;
- lightning-lora merged: the same adapters after ``merge_lora`` (on a copy of the weights);
- PEFT LoRA (defaults) unmerged, when ``peft`` is installed, and the plain reference LoRA.

The merged outputs must equal the unmerged ones, and the unmerged ones the reference's, within
the dtype's tolerance, or the run stops with exit status 1.

Usage::

    python benchmarks/inference.py                 # the CPU preset
    python benchmarks/inference.py --preset gpu --json benchmarks/results/gpu-inference.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    TOLERANCE,
    ReferenceLoRA,
    Setting,
    Variant,
    add_arguments,
    build_base,
    build_training_variant,
    environment,
    make_batch,
    median_ms,
    peft_adapters,
    peft_available,
    randomize_pairs,
    relative_error,
    round_ratio_quartiles,
    setting_from_args,
    time_interleaved,
    write_json,
)

from report import render_inference  # noqa: E402

from lightning_lora import lora_modules, merge_lora  # noqa: E402


def _pairs(variant: Variant) -> list[tuple[nn.Module, nn.Module]]:
    if variant.kind == "lightning_lora":
        return [(m.matrix_A, m.matrix_B) for m in lora_modules(variant.model).values()]
    if variant.kind == "peft":
        return list(peft_adapters(variant.model).values())
    return [(m.A, m.B) for m in variant.model.modules() if isinstance(m, ReferenceLoRA)]


def build_variants(s: Setting, base: nn.Module, with_peft: bool) -> list[Variant]:
    """The base model, then per target set: unmerged, merged, PEFT and reference adapters."""
    variants = [Variant("base", "base", "base model", None, base)]
    for label in s.target_sets:
        kinds = ["lightning_lora", "peft", "reference"] if with_peft else ["lightning_lora", "reference"]
        built = {kind: build_training_variant(kind, base, s, label) for kind in kinds}
        for variant in built.values():
            variant.optimizer = None
            randomize_pairs(_pairs(variant), s.seed)  # the same non-zero adapters everywhere
        merged = copy.deepcopy(built["lightning_lora"].model)  # its own weights: merging writes into them
        merge_lora(merged)
        ours = built["lightning_lora"]
        ours.key, ours.label = f"unmerged[{label}]", f"lightning-lora unmerged, {label}"
        variants.append(ours)
        variants.append(Variant(f"merged[{label}]", "merged", f"lightning-lora merged, {label}", label, merged))
        variants += [built[kind] for kind in kinds[1:]]
    return variants


@torch.no_grad()
def forward(variant: Variant, tokens: torch.Tensor) -> torch.Tensor:
    return variant.model(tokens)


def run(s: Setting, with_peft: bool) -> dict[str, Any]:
    """Build, check and time every variant; returns the JSON payload."""
    base = build_base(s)
    tokens, _ = make_batch(s)
    variants = build_variants(s, base, with_peft)
    by_key = {v.key: v for v in variants}
    numerics = {}
    for label in s.target_sets:
        unmerged = forward(by_key[f"unmerged[{label}]"], tokens)
        numerics[label] = {
            "tolerance": TOLERANCE[s.dtype],
            "merged_vs_unmerged": relative_error(forward(by_key[f"merged[{label}]"], tokens), unmerged),
            "unmerged_vs_reference": relative_error(unmerged, forward(by_key[f"reference[{label}]"], tokens)),
            "adapters_change_output": relative_error(unmerged, forward(by_key["base"], tokens)),
        }
        checked = [numerics[label]["merged_vs_unmerged"], numerics[label]["unmerged_vs_reference"]]
        numerics[label]["ok"] = max(checked) <= TOLERANCE[s.dtype]
    failed = {label: n for label, n in numerics.items() if not n["ok"]}
    if failed:
        print(failed, file=sys.stderr)
        raise SystemExit("merged and unmerged outputs (or unmerged and reference) differ beyond tolerance")

    times, disturbed = time_interleaved(
        {v.key: (lambda v=v: forward(v, tokens)) for v in variants}, s.warmup, s.steps, s.device
    )
    ms = {key: median_ms(t) for key, t in times.items()}
    rows = []
    for v in variants:
        peft_key = f"peft[{v.targets}]"
        rows.append({
            "key": v.key,
            "variant": v.kind,
            "label": v.label,
            "targets": v.targets,
            "ms": ms[v.key],
            "vs_base": ms[v.key] / ms["base"],
            "vs_base_rounds": round_ratio_quartiles(times[v.key], times["base"]),
            "vs_peft": ms[v.key] / ms[peft_key] if peft_key in ms and v.kind != "merged" else None,
            "times_ms": [1000.0 * t for t in times[v.key]],
            "disturbed_steps": disturbed[v.key],
        })
    return {
        "benchmark": "inference",
        "setting": s.to_dict(),
        "environment": environment(s),
        "numerics": numerics,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--no-peft", action="store_true", help="leave PEFT out even if it is installed")
    args = parser.parse_args(argv)
    s = setting_from_args(args)
    torch.manual_seed(s.seed)
    payload = run(s, with_peft=peft_available() and not args.no_peft)
    print(render_inference(payload))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

"""What crosses the network per training step and rank: LoRA against full fine-tuning, DDP, FSDP2 and HSDP.

The model is built on the meta device (no memory, no GPU needed) and adapted as the benchmarks adapt
it; the payloads are computed from its parameters, per rank and step, without the collectives'
algorithmic factor (a ring all-reduce sends about twice its payload). With ``P`` parameters in all,
``T`` of them trainable, ``p`` bytes per parameter, ``g`` bytes per gradient and ``S`` ranks in a shard
group (``--shard-size``, the GPUs of one node):

- DDP all-reduces the gradients of the trainable parameters: ``T * g``.
- FSDP2 (``fully_shard`` with ``reshard_after_forward=True``) all-gathers every parameter, frozen or
  not, in the forward and again in the backward, and reduce-scatters the trainable gradients:
  ``2 * P * p + T * g``.
- HSDP (``fully_shard`` on a 2-D mesh, replicate x shard: the multi-node layout) does what FSDP2 does
  within its shard group, then all-reduces each rank's gradient shard across the replicas:
  ``2 * P * p + T * g + T * g / S``. Only that last all-reduce, ``T * g / S``, crosses nodes; the rows
  "HSDP, across nodes (in the row above)" show it alone.

For LoRA, ``P`` counts the adapters too and ``T`` only them; for full fine-tuning ``T = P`` and the
gradients are in the parameters' dtype (``g = p``).

    python benchmarks/communication.py                    # the gpu preset: 4 Llama-7B-shaped layers
    python benchmarks/communication.py --layers 32        # a whole 7B-shaped stack
    python benchmarks/communication.py --shard-size 4     # HSDP with shard groups of 4 GPUs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from common import add_arguments, build_base, our_config, setting_from_args, write_json
from lightning_lora import apply_lora, lora_parameters

MIB = 1024**2


def payloads(total: int, trainable: int, param_bytes: int, grad_bytes: int, shard_size: int) -> dict[str, float]:
    """Bytes per step and rank of each strategy (see the module docstring for the formulas)."""
    gathers, gradients = 2 * total * param_bytes, trainable * grad_bytes
    across_nodes = gradients / shard_size
    return {
        "DDP": gradients,
        "FSDP2": gathers + gradients,
        f"HSDP, shard groups of {shard_size}": gathers + gradients + across_nodes,
        "HSDP, across nodes (in the row above)": across_nodes,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--shard-size", type=int, default=8,
                        help="HSDP: ranks per shard group, the GPUs of one node (default: 8)")
    parser.set_defaults(preset="gpu")
    args = parser.parse_args(argv)
    if args.shard_size < 2:
        sys.exit(f"--shard-size must be at least 2 (a shard group of one rank is DDP), got {args.shard_size}")
    args.device = "meta"
    setting = setting_from_args(args)
    model = build_base(setting)
    total = sum(p.numel() for p in model.parameters())
    param_bytes = setting.torch_dtype.itemsize
    description = (f"{setting.model}, {setting.layers} layers, hidden {setting.hidden}, FFN {setting.ffn}, "
                   f"vocab {setting.vocab}, {setting.dtype}: {total:,} parameters")
    print(f"model: {description}")
    print("| targets | trainable | strategy | LoRA MiB/step | full fine-tuning MiB/step | LoRA / full |")
    print("|---|---|---|---|---|---|")
    rows: list[dict[str, Any]] = []
    for label, targets in setting.target_sets.items():
        adapted = build_base(setting)
        apply_lora(adapted, our_config(setting, targets))
        trainable = list(lora_parameters(adapted))
        count = sum(p.numel() for p in trainable)
        grad_bytes = trainable[0].dtype.itemsize
        lora = payloads(total + count, count, param_bytes, grad_bytes, args.shard_size)
        full = payloads(total, total, param_bytes, param_bytes, args.shard_size)
        for strategy in lora:
            ratio = lora[strategy] / full[strategy]
            print(f"| {label} (r={setting.r}) | {count:,} | {strategy} | {lora[strategy] / MIB:,.2f} | "
                  f"{full[strategy] / MIB:,.2f} | {ratio:.4f} |")
            rows.append({"targets": label, "r": setting.r, "trainable": count, "strategy": strategy,
                         "lora_bytes": lora[strategy], "full_bytes": full[strategy], "ratio": ratio})
    write_json(args.json, {"benchmark": "communication", "model": description, "parameters": total,
                           "shard_size": args.shard_size, "setting": setting.to_dict(), "rows": rows})


if __name__ == "__main__":
    main()

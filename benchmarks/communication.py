"""What crosses the network per training step and rank: LoRA against full fine-tuning, DDP and FSDP2.

The model is built on the meta device (no memory, no GPU needed) and adapted as the benchmarks adapt
it; the payloads are computed from its parameters, per rank and step, without the collectives'
algorithmic factor (a ring all-reduce sends about twice its payload):

- DDP all-reduces the gradients of the trainable parameters.
- FSDP2 (``fully_shard`` with ``reshard_after_forward=True``) all-gathers every parameter, frozen or
  not, in the forward and again in the backward, and reduce-scatters the trainable gradients.

    python benchmarks/communication.py                    # the gpu preset: 4 Llama-7B-shaped layers
    python benchmarks/communication.py --layers 32        # a whole 7B-shaped stack
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from common import add_arguments, build_base, our_config, setting_from_args
from lightning_lora import apply_lora, lora_parameters

GIB = 1024**3


def payloads(total: int, trainable: int, param_bytes: int, grad_bytes: int) -> dict[str, float]:
    """Bytes per step and rank: DDP's gradient all-reduce, FSDP2's gathers plus gradient reduce-scatter."""
    return {"DDP": trainable * grad_bytes, "FSDP2": 2 * total * param_bytes + trainable * grad_bytes}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(preset="gpu")
    args = parser.parse_args(argv)
    args.device = "meta"
    setting = setting_from_args(args)
    model = build_base(setting)
    total = sum(p.numel() for p in model.parameters())
    param_bytes = setting.torch_dtype.itemsize
    print(f"model: {setting.model}, {setting.layers} layers, hidden {setting.hidden}, FFN {setting.ffn}, "
          f"vocab {setting.vocab}, {setting.dtype}: {total:,} parameters")
    print("| targets | trainable | strategy | LoRA GiB/step | full fine-tuning GiB/step | LoRA / full |")
    print("|---|---|---|---|---|---|")
    for label, targets in setting.target_sets.items():
        adapted = build_base(setting)
        apply_lora(adapted, our_config(setting, targets))
        trainable = list(lora_parameters(adapted))
        count = sum(p.numel() for p in trainable)
        grad_bytes = trainable[0].dtype.itemsize
        lora = payloads(total + count, count, param_bytes, grad_bytes)
        full = payloads(total, total, param_bytes, param_bytes)
        for strategy in lora:
            print(f"| {label} (r={setting.r}) | {count:,} | {strategy} | {lora[strategy] / GIB:.4f} | "
                  f"{full[strategy] / GIB:.3f} | {lora[strategy] / full[strategy]:.4f} |")


if __name__ == "__main__":
    main()

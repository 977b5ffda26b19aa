"""A quantized base (QLoRA) against the unquantized model: memory and step time, side by side in one run.

For the preset's model and its first target set (``quantize="nf4"`` against no quantization) it prints:

- the bytes of the base weights that ``quantize="nf4"`` holds in 4 bits (every linear layer but the
  last, see ``lightning_lora.surgery.plan.quantizable``) in float16, in the preset's dtype and as stored in
  NF4 (4-bit codes and scales), and the bytes of all base weights (embeddings included) both ways;
- the peak memory of two training steps (AdamW over the adapters), unquantized and on the NF4 base,
  each in a fresh process: on the CPU the peak RSS of the steps alone (``VmHWM`` reset after the
  model is built and quantized, so the float model that a real run would load quantized layer by
  layer is not counted), on a GPU ``torch.cuda.max_memory_allocated``. On the CPU the processes run
  with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so that every freed tensor goes back to the
  system: otherwise glibc keeps freed blocks after it raises its threshold, and the peak RSS measures
  its cache (the many short-lived tensors of dequantizing weights) rather than live memory;
- the training step time of both (median of the preset's steps, interleaved, after warm-up) and
  their ratio;
- the numerics check: the NF4 model's output against the unquantized model given the weights the
  NF4 codes decode to (same adapters); a mismatch stops the run with exit status 1.

    python benchmarks/qlora.py            # the cpu preset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from common import (
    TOLERANCE,
    add_arguments,
    build_base,
    loss_fn,
    make_batch,
    median_ms,
    our_config,
    relative_error,
    setting_from_args,
    time_interleaved,
)

from lightning_lora import apply_lora, lora_modules, lora_parameters, lora_state_dict
from lightning_lora.quantize import dequantize, quantized_format, stored_parts

VARIANTS = ("unquantized", "nf4")


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the base weights: those held in NF4 (as stored, in float16, in their dtype) and all of them."""
    quantized = [p for p in model.parameters() if quantized_format(p) is not None]
    stored = sum(part.numel() * part.element_size() for p in quantized for part in stored_parts(p).values())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "quantized_layers": len(quantized),
        "nf4": stored,
        "float16": sum(p.numel() * 2 for p in quantized),
        "dtype": sum(p.numel() * p.element_size() for p in quantized),
        "all_base_nf4": sum(p.numel() * p.element_size() for p in frozen if quantized_format(p) is None) + stored,
        "all_base_unquantized": sum(p.numel() * p.element_size() for p in frozen),
    }


def build(setting, variant: str) -> torch.nn.Module:
    model = build_base(setting)
    targets = next(iter(setting.target_sets.values()))
    config = our_config(setting, targets)
    config.quantize = None if variant == "unquantized" else variant
    apply_lora(model, config)
    return model


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    tokens, targets = batch
    loss_fn(model(tokens), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_numerics(setting, quantized: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Relative error of the NF4 model's output against the unquantized model holding the decoded weights."""
    reference = build(setting, "unquantized")
    with torch.no_grad():
        for adapter in lora_modules(quantized).values():  # a non-zero update, the same in both
            adapter.matrix_B.weight.normal_(0, 0.02)
        reference.load_state_dict(lora_state_dict(quantized), strict=False)
        decoded = {name: dequantize(p) for name, p in quantized.named_parameters() if quantized_format(p) is not None}
        for name, param in reference.named_parameters():
            if name in decoded:
                param.copy_(decoded[name])
        return relative_error(quantized(batch[0]), reference(batch[0]))


def peak_step_memory(setting, variant: str) -> float:
    """Peak memory (MiB) of two training steps of one variant, in this process."""
    model = build(setting, variant)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    batch = make_batch(setting)
    if setting.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(2):  # the second step holds the optimizer state
        training_step(model, optimizer, batch)
    if setting.device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status: peak RSS needs Linux")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setting = setting_from_args(args)
    if args.child:
        print(json.dumps({"peak_mib": peak_step_memory(setting, args.child)}))
        return
    models = {variant: build(setting, variant) for variant in VARIANTS}
    sizes = weight_bytes(models["nf4"])
    batch = make_batch(setting)
    error = check_numerics(setting, models["nf4"], batch)
    if error > TOLERANCE[setting.dtype]:
        raise SystemExit(f"the NF4 model computes something else than its decoded weights: relative error {error:.1e}")
    optimizers = {variant: torch.optim.AdamW(lora_parameters(model), lr=1e-4) for variant, model in models.items()}
    times, _ = time_interleaved(
        {variant: (lambda v=variant: training_step(models[v], optimizers[v], batch)) for variant in VARIANTS},
        setting.warmup,
        setting.steps,
        setting.device,
    )
    ms = {variant: median_ms(times[variant]) for variant in VARIANTS}
    del models, optimizers
    peaks = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", variant]
        environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
        if result.returncode != 0:
            raise SystemExit(f"memory run of {variant} failed:\n{result.stderr[-4000:]}")
        peaks[variant] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    mib = 2**20
    print(f"preset {setting.preset}: {setting.layers} layers, hidden {setting.hidden}, {setting.dtype}, "
          f"batch {setting.batch} x {setting.seq_len}; {sizes['quantized_layers']} linear weights in NF4")
    print("| what | unquantized | NF4 base | ratio |")
    print("|---|---|---|---|")
    print(f"| quantized weights vs float16 | {sizes['float16'] / mib:.2f} MiB | {sizes['nf4'] / mib:.2f} MiB "
          f"| {sizes['float16'] / sizes['nf4']:.2f}x smaller |")
    print(f"| quantized weights vs {setting.dtype} | {sizes['dtype'] / mib:.2f} MiB | {sizes['nf4'] / mib:.2f} MiB "
          f"| {sizes['dtype'] / sizes['nf4']:.2f}x smaller |")
    print(f"| all base weights (embeddings too) | {sizes['all_base_unquantized'] / mib:.2f} MiB "
          f"| {sizes['all_base_nf4'] / mib:.2f} MiB | {sizes['all_base_unquantized'] / sizes['all_base_nf4']:.2f}x smaller |")
    print(f"| peak memory of a training step | {peaks['unquantized']:.0f} MiB | {peaks['nf4']:.0f} MiB "
          f"| {peaks['nf4'] / peaks['unquantized']:.2f}x |")
    print(f"| training step (median of {setting.steps}) | {ms['unquantized']:.0f} ms | {ms['nf4']:.0f} ms "
          f"| {ms['nf4'] / ms['unquantized']:.2f}x |")
    print(f"Numerics: NF4 model vs the unquantized one holding the decoded weights, relative error {error:.1e} "
          f"(tolerance {TOLERANCE[setting.dtype]:.0e}): ok")
    if args.json:
        args.json.write_text(json.dumps({"setting": setting.to_dict(), "bytes": sizes, "peak_mib": peaks, "ms": ms, "error": error}, indent=2))


if __name__ == "__main__":
    main()

"""FSDP2 with LoRA on one CUDA device (NCCL, one process): the checks CI's CPUs cannot make.

In one run, on a Llama-shaped stack from ``common.py`` (bfloat16 base, float32 adapters):

1. Meta-device initialisation: the model is built on the meta device, adapted, sharded with
   ``fully_shard`` and materialised as Lightning's ``ModelParallelStrategy`` does (``to_empty``, then
   ``reset_parameters`` on every module with parameters of its own). Every ``matrix_B`` must be zero
   and every ``matrix_A`` not, so the adapted model computes what the base does.
2. ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: the adapters stay float32,
   get float32 gradients, and train (the loss goes down).
3. Step time and peak memory per step (``torch.cuda.max_memory_allocated``), LoRA against full
   fine-tuning under the same policy, side by side.
4. Lightning: ``ModelParallelStrategy(data_parallel_size=1)`` with ``LoRACallback``: a sharded
   checkpoint with its companion adapter file (whole tensors), and a resume that continues exactly.

Without CUDA it says so and exits 0. ``--device cpu`` runs the same checks on CPU with gloo at tiny
sizes (as the tests do), so the script is exercised where there is no GPU.

    python benchmarks/gpu_fsdp2.py                 # one CUDA device
    python benchmarks/gpu_fsdp2.py --device cpu    # the CPU dry run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from common import ATTENTION, PRESETS, Encoder, Setting, loss_fn, make_batch, rotary_tables
from lightning_lora import LoRAConfig, apply_lora, disable_adapters, lora_modules, lora_parameters, lora_state_dict

SIZES = {  # the GPU preset's layers; tiny ones for the CPU dry run
    "cuda": {"layers": 4, "hidden": 4096, "ffn": 11008, "heads": 32, "vocab": 32000, "batch": 4, "seq_len": 2048},
    "cpu": {"layers": 2, "hidden": 64, "ffn": 128, "heads": 4, "vocab": 100, "batch": 2, "seq_len": 16},
}


def setting(device: str, steps: int, sizes: str | None = None) -> Setting:
    values = {**PRESETS["gpu"], **SIZES[sizes or device], "device": device, "steps": steps, "warmup": 2}
    return Setting(preset="gpu", adapter_dtype="float32", **values)


def policy() -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: Encoder, mesh) -> None:  # noqa: ANN001  (a DeviceMesh)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy())
    fully_shard(model, mesh=mesh, mp_policy=policy())


def build(s: Setting, mesh, lora: bool) -> Encoder:  # noqa: ANN001
    """Meta-device build, (adapt,) shard, materialise as Lightning does; base in bfloat16."""
    with torch.device("meta"):
        model = Encoder(s)
    model.to(torch.bfloat16)
    if lora:
        apply_lora(model, LoRAConfig(r=s.r, alpha=s.alpha, targets=ATTENTION, adapter_dtype="float32"))
    else:
        model.requires_grad_(True)
    shard(model, mesh)
    model.to_empty(device=s.device)
    torch.manual_seed(s.seed)
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()
    cos, sin = rotary_tables(s.hidden // s.heads, s.seq_len)  # buffers, not parameters: computed again
    for layer in model.layers:
        layer.self_attn.cos.copy_(cos)
        layer.self_attn.sin.copy_(sin)
    return model


def check(condition: bool, what: str) -> None:
    print(f"{'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        raise SystemExit(1)


def timed_steps(model: Encoder, s: Setting, params: list[nn.Parameter]) -> tuple[list[float], list[float], float]:
    """Losses, seconds per step and peak memory (GiB; 0 on CPU) of ``s.steps`` AdamW steps."""
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tokens, targets = make_batch(s)
    losses, seconds = [], []
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(s.warmup + s.steps):
        start = time.perf_counter()
        loss = loss_fn(model(tokens).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if s.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 1024**3 if s.device == "cuda" else 0.0
    return losses, seconds[s.warmup:], peak


def lightning_round_trip(s: Setting, folder: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_lora import LoRACallback, read_adapter

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = Encoder(s).to(torch.bfloat16)

        def configure_model(self) -> None:
            if not isinstance(self.model.layers[0], torch.distributed.fsdp.FSDPModule):
                shard(self.model, self.device_mesh["data_parallel"])

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return loss_fn(self.model(batch[0]).float(), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(lora_parameters(self), lr=1e-3)

    tokens, targets = (t.cpu() for t in make_batch(s))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, targets), batch_size=s.batch)

    def fit(epochs: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        module = Module()
        trainer = L.Trainer(
            strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
            accelerator="gpu" if s.device == "cuda" else "cpu", devices=1, max_epochs=epochs, logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
            callbacks=[LoRACallback(r=s.r, alpha=s.alpha, targets=ATTENTION, adapter_dtype="float32"),
                       ModelCheckpoint(dirpath=folder, save_top_k=-1)],
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return {key: value.cpu() for key, value in lora_state_dict(module).items()}

    straight = fit(2)
    first = folder / "epoch=0-step=1.ckpt"
    companion = read_adapter(folder / "epoch=0-step=1.lora.safetensors")
    check(first.is_dir(), "Lightning: a sharded checkpoint folder")
    shapes = {key: tuple(t.shape) for key, t in straight.items()}
    check({key: tuple(t.shape) for key, t in companion.tensors.items()} == shapes, "companion holds whole tensors")
    resumed = fit(2, first)
    difference = max((resumed[k].float() - straight[k].float()).abs().max().item() for k in straight)
    # bit-exact on CPU; CUDA attention kernels may sum in another order from run to run
    check(difference == 0 if s.device == "cpu" else difference < 1e-5, f"resume continues the run (max difference {difference:.1e})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False); --device cpu runs the dry run")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        s = setting(args.device, args.steps)
        if args.device == "cuda":
            torch.cuda.set_device(0)
        mesh = init_device_mesh(args.device, (1,))
        model = build(s, mesh, lora=True)
        adapters = lora_modules(model).values()
        check(all(torch.count_nonzero(a.matrix_B.weight.full_tensor()) == 0 for a in adapters), "meta init: every matrix_B is zero")
        check(all(torch.count_nonzero(a.matrix_A.weight.full_tensor()) > 0 for a in adapters), "meta init: every matrix_A is not")
        tokens, _ = make_batch(s)
        with torch.no_grad():
            adapted = model(tokens)
            with disable_adapters(model):
                base = model(tokens)
        check(torch.equal(adapted, base), "meta init: the adapted model computes what the base does")
        params = list(lora_parameters(model))
        losses, seconds, peak = timed_steps(model, s, params)
        check({p.dtype for p in params} == {torch.float32}, "adapters stay float32 under the bfloat16 policy")
        check(losses[-1] < losses[0], f"LoRA trains: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        del model, params
        full = build(s, mesh, lora=False)
        _, full_seconds, full_peak = timed_steps(full, s, list(full.parameters()))
        del full
        lora_ms, full_ms = statistics.median(seconds) * 1e3, statistics.median(full_seconds) * 1e3
        print(f"device: {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}; "
              f"{s.layers} layers, hidden {s.hidden}, batch {s.batch} x {s.seq_len}, r={s.r} on {','.join(ATTENTION)}")
        gib = (lambda v: f"{v:.2f}") if args.device == "cuda" else (lambda v: "n/a")
        print("| variant | ms/step (median) | peak GiB |")
        print("|---|---|---|")
        print(f"| LoRA, bf16 base, float32 adapters | {lora_ms:.1f} | {gib(peak)} |")
        print(f"| full fine-tuning, same policy | {full_ms:.1f} | {gib(full_peak)} |")
        memory = f", peak memory {peak / full_peak:.3f}" if args.device == "cuda" else ""
        print(f"LoRA / full: time {lora_ms / full_ms:.3f}{memory}")
        with tempfile.TemporaryDirectory() as folder:
            lightning_round_trip(setting(args.device, 2, sizes="cpu"), Path(folder))  # behaviour, not speed
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

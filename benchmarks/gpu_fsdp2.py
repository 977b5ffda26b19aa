"""FSDP2 with LoRA on the GPUs of one node (torchrun, NCCL): the checks CI's CPUs cannot make.

    torchrun --nproc_per_node=8 benchmarks/gpu_fsdp2.py                # 8 GPUs (any of 1 to 8)
    torchrun --nproc_per_node=2 benchmarks/gpu_fsdp2.py --device cpu   # the CPU dry run: gloo, tiny sizes
    python benchmarks/gpu_fsdp2.py                                     # cuda:0 alone, as a single rank

Each rank runs one process on ``cuda:LOCAL_RANK`` (rank, world size and local rank come from the
environment torchrun sets; one node). Started without torchrun, the script runs as a single rank:
every check still runs, and those against a one-rank run then compare a run with itself. Without
CUDA (and without ``--device cpu``) it prints ``skipped: no CUDA device`` and exits 0.

The model is the Llama-shaped stack of ``common.py`` (bfloat16 base, float32 adapters on q, k, v
and o), every layer and then the root sharded with ``fully_shard`` and
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``. Every check prints one line
from rank 0, ``ok  `` or ``FAIL``, with the result of all ranks; the job exits 1 if any failed:

1. Meta-device initialisation, as Lightning's ``ModelParallelStrategy`` does it (``to_empty``, then
   ``reset_parameters``): every ``matrix_B`` is zero and every ``matrix_A`` not, and the adapted
   model computes what the base does.
2. Training, each rank on its part of one global batch (AdamW): the forward computes in bfloat16
   and the adapters' gradients are float32 (the gradients: FSDP2 never changes the sharded
   parameters' dtype); the loss goes down; the adapters (gathered whole) are the same on every
   rank (digests compared through ``all_gather_object``: adapters left out of ``fully_shard`` are
   plain parameters every rank trains on its own); and they equal a one-rank run of the same
   global batch, which rank 0 runs on a mesh of one rank (a sub-group), accumulating the ranks'
   parts as micro-batches. Both runs compute each part with the same bfloat16 kernels (PyTorch's
   math attention, whose backward is deterministic, unlike the flash kernel's), so they differ
   only in the order the float32 gradients are summed, which AdamW can amplify where a gradient
   is near zero: the difference of the updates must be within 1e-2 of their norm
   (``CROSS_WORLD_TOLERANCE``; bfloat16's epsilon is 3.9e-3). A missing gradient synchronisation
   moves them by about their whole norm.
3. Step time and peak memory per rank (``torch.cuda.max_memory_allocated``; "n/a" on CPU): LoRA
   against full fine-tuning with float32 master weights under the same policy (bfloat16 compute,
   float32 gradient reduction), AdamW for both, side by side in one table, with their ratio. The
   timed runs use the default attention kernels. ``--json PATH`` writes the table and the checks.
4. Lightning, ``ModelParallelStrategy(data_parallel_size=N)`` with ``LoRACallback``, on torchrun's
   processes (``devices=N``, ``num_nodes=1``; tiny sizes: behaviour, not speed), one step per
   epoch: sharded checkpoints every epoch, each with a companion adapter file of whole tensors; a
   resume on N ranks that continues exactly (bit for bit on CPU; within 1e-5 of the update on
   CUDA, where NCCL may sum in another order); the companion loaded into a one-rank model outside
   Lightning gives exactly the adapters of that epoch; the N-rank sharded checkpoint resumed on
   one rank (N -> 1) and a one-rank checkpoint resumed on N ranks (1 -> N) continue as the
   straight runs do, within ``CROSS_WORLD_TOLERANCE`` of the step after the resume. One rank
   computes the whole global batch at once where N ranks compute their parts, and the adapters'
   gradients are computed in bfloat16 (``param_dtype``), so they round differently (about 1e-3
   of the update on the CPU dry run); the optimizer is SGD with momentum, whose update is linear
   in the gradient (AdamW's first steps are the gradient's sign, which flips where a gradient is
   near zero). The one-rank runs are a subprocess of rank 0 (``--phase one-rank``, without
   torchrun's environment) while the other ranks wait.

For the tests only: ``GPU_FSDP2_FAULT=unsharded-first-layer`` leaves the first layer and the root
out of ``fully_shard`` in the checked training run of step 2, so their adapters are plain
parameters that every rank trains on its own; the rank and reference checks must then fail.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import ATTENTION, PRESETS, Encoder, Setting, loss_fn, make_batch, rotary_tables, write_json
from lightning_lora import (
    LoRACallback,
    LoRAConfig,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    read_adapter,
)

SIZES = {  # the gpu preset's layers, batch per rank; tiny ones for the CPU dry run and the Lightning runs
    "cuda": {"layers": 4, "hidden": 4096, "ffn": 11008, "heads": 32, "vocab": 32000, "batch": 4, "seq_len": 2048},
    "cpu": {"layers": 2, "hidden": 64, "ffn": 128, "heads": 4, "vocab": 100, "batch": 2, "seq_len": 16},
}
CHECKED_STEPS = 3  # of the training run compared across ranks and with the one-rank reference
CROSS_WORLD_TOLERANCE = 1e-2  # |difference of the adapters| / |update|, between runs on different numbers of ranks
SAME_WORLD_CUDA_TOLERANCE = 1e-5  # the same, between two CUDA runs on the same ranks
FAULT = os.environ.get("GPU_FSDP2_FAULT", "")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

State = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]  # (B, T) token ids, (B, T, C) targets


def setting(device: str, steps: int, sizes: str | None = None) -> Setting:
    values = {**PRESETS["gpu"], **SIZES[sizes or device], "device": device, "steps": steps, "warmup": 2}
    return Setting(preset="gpu", adapter_dtype="float32", **values)


def lora_config(s: Setting) -> LoRAConfig:
    return LoRAConfig(r=s.r, alpha=s.alpha, targets=ATTENTION, adapter_dtype="float32")


# --- processes and checks -------------------------------------------------------------------------


def start(device_type: str) -> torch.device:
    """Join torchrun's process group (or make one of a single rank); returns this rank's device."""
    launched = "RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world, local_world = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if launched and local_world is not None and local_world != world:
        sys.exit(f"run it on one node (torchrun --nproc_per_node=N): WORLD_SIZE={world}, "
                 f"LOCAL_WORLD_SIZE={local_world}")
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launched:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class Checks:
    """One line per check from rank 0 with the result of every rank; the failures, for the exit status."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def __call__(self, condition: bool, what: str) -> bool:
        failing = [rank for rank, ok in enumerate(gather(bool(condition))) if not ok]
        if dist.get_rank() == 0:
            where = f" (false on rank {', '.join(map(str, failing))})" if failing and dist.get_world_size() > 1 else ""
            print(f"{'FAIL' if failing else 'ok  '} {what}{where}", flush=True)
        self.results.append({"check": what, "ok": not failing})
        return not failing

    @property
    def failed(self) -> bool:
        return not all(result["ok"] for result in self.results)


def digest(state: State) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def copied(state: State) -> State:
    """On the CPU, apart from the parameters (a one-rank mesh gathers without copying)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def update_error(actual: State, expected: State, start: State) -> float:
    """``|actual - expected| / |expected - start|`` over all tensors (float64): how far from the expected update."""
    difference = torch.cat([(actual[k].double().cpu() - expected[k].double().cpu()).flatten() for k in expected])
    update = torch.cat([(expected[k].double().cpu() - start[k].double().cpu()).flatten() for k in expected])
    return float(difference.norm() / update.norm().clamp_min(1e-30))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- models ------------------------------------------------------------------------------------


def policy() -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: Encoder, mesh: DeviceMesh, fault: bool = False) -> None:
    """Every layer, then the root (``fault``: the first layer and the root left out)."""
    for index, layer in enumerate(model.layers):
        if not (fault and index == 0):
            fully_shard(layer, mesh=mesh, mp_policy=policy())
    if not fault:
        fully_shard(model, mesh=mesh, mp_policy=policy())


def build_on_meta(s: Setting, mesh: DeviceMesh, device: torch.device) -> Encoder:
    """Built on the meta device, adapted, sharded and materialised as Lightning does; base in bfloat16."""
    with torch.device("meta"):
        model = Encoder(s)
    model.to(torch.bfloat16)
    apply_lora(model, lora_config(s))
    shard(model, mesh)
    model.to_empty(device=device)
    torch.manual_seed(s.seed)
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()
    cos, sin = rotary_tables(s.hidden // s.heads, s.seq_len)  # buffers, not parameters: computed again
    for layer in model.layers:
        layer.self_attn.cos.copy_(cos)
        layer.self_attn.sin.copy_(sin)
    return model


def build(s: Setting, mesh: DeviceMesh, device: torch.device, lora: bool, fault: bool = False) -> Encoder:
    """The same weights on every rank (seeded, built on the device), then sharded.

    LoRA: bfloat16 base, float32 adapters. Full fine-tuning: float32 master weights, all trainable.
    """
    torch.manual_seed(s.seed)
    with torch.device(device):
        model = Encoder(s)
    if lora:
        model.to(torch.bfloat16)
        apply_lora(model, lora_config(s))
    shard(model, mesh, fault)
    return model


def parts(s: Setting, world: int) -> list[Batch]:
    """One global batch of ``world * s.batch`` sequences on the CPU, in the ranks' parts of ``s.batch``."""
    tokens, targets = make_batch(replace(s, batch=s.batch * world, device="cpu"))
    return [(tokens[r * s.batch:(r + 1) * s.batch], targets[r * s.batch:(r + 1) * s.batch]) for r in range(world)]


def on(device: torch.device, *batches: Batch) -> list[Batch]:
    """Copies of ``batches`` on ``device`` (and nothing else: a slice would keep the whole global batch)."""
    return [(tokens.to(device, copy=True), targets.to(device, copy=True)) for tokens, targets in batches]


def ranks(count: int) -> str:
    return f"{count} rank{'s' if count != 1 else ''}"


def train(model: Encoder, params: list[nn.Parameter], micro_batches: list[Batch],
          steps: int, device: torch.device,
          after_backward: Callable[[torch.Tensor, list[nn.Parameter]], None] | None = None,
          ) -> tuple[list[float], list[float]]:
    """``steps`` AdamW steps, each over ``micro_batches`` (gradients averaged); losses and seconds per step."""
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses, seconds = [], []
    synchronize(device)
    for _ in range(steps):
        began = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for tokens, targets in micro_batches:
            out = model(tokens)  # (B, T, C)
            loss = loss_fn(out, targets)
            loss.backward()
            loss_sum += loss.detach()
            if after_backward is not None:
                after_backward(out, params)  # the first backward only
                after_backward = None
            del out, loss  # not kept through the next forward: the peak memory is the step's own
        if len(micro_batches) > 1:  # the mean over the global batch, as the ranks' reduce-scatter computes it
            for p in params:
                p.grad.div_(len(micro_batches))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - began)
        losses.append(loss_sum.item() / len(micro_batches))
    return losses, seconds


# --- 1: meta-device initialisation ------------------------------------------------------------------


def check_meta_init(s: Setting, data: list[Batch], mesh: DeviceMesh, device: torch.device, checks: Checks) -> None:
    model = build_on_meta(s, mesh, device)
    adapters = lora_modules(model).values()
    checks(all(torch.count_nonzero(a.matrix_B.weight.full_tensor()) == 0 for a in adapters),
           "meta init: every matrix_B is zero")
    checks(all(torch.count_nonzero(a.matrix_A.weight.full_tensor()) > 0 for a in adapters),
           "meta init: every matrix_A is not")
    [(tokens, _)] = on(device, data[dist.get_rank()])
    with torch.no_grad():
        adapted = model(tokens)
        with disable_adapters(model):
            base = model(tokens)
    checks(torch.equal(adapted, base), "meta init: the adapted model computes what the base does")


# --- 2: training against the ranks and against one rank ---------------------------------------------


def check_training(s: Setting, data: list[Batch], mesh: DeviceMesh, device: torch.device, checks: Checks) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(s, mesh, device, lora=True, fault=FAULT == "unsharded-first-layer")
    params = list(lora_parameters(model))
    start_state = copied(lora_state_dict(model))
    seen: dict[str, Any] = {}

    def dtypes(out: torch.Tensor, params: list[nn.Parameter]) -> None:  # the gradients, not the parameters
        seen["out"], seen["grads"] = out.dtype, {p.grad.dtype if p.grad is not None else None for p in params}

    with sdpa_kernel(SDPBackend.MATH):
        losses, _ = train(model, params, on(device, data[rank]), CHECKED_STEPS, device, after_backward=dtypes)
    trained = copied(lora_state_dict(model))
    del model, params
    release(device)
    grads = ", ".join(sorted(map(str, seen["grads"])))
    checks(seen["out"] == torch.bfloat16 and seen["grads"] == {torch.float32},
           f"mixed precision: forward in {seen['out']}, adapter gradients in {grads} (bfloat16 base, float32 adapters)")
    first, last = (statistics.fmean(values) for values in zip(*gather((losses[0], losses[-1]))))
    checks(last < first, f"LoRA trains: mean loss over the ranks {first:.4f} -> {last:.4f} in {CHECKED_STEPS} steps")
    checks(len(set(gather(digest(trained)))) == 1,
           f"adapters after training are the same on every rank ({ranks(world)}, digests of the gathered tensors)")

    one = dist.new_group([0])  # every rank takes part in creating it; only rank 0 uses it
    error = 0.0
    if rank == 0:
        reference = build(s, DeviceMesh.from_group(one, device.type), device, lora=True)
        reference_params = list(lora_parameters(reference))
        with sdpa_kernel(SDPBackend.MATH):
            train(reference, reference_params, on(device, *data), CHECKED_STEPS, device)
        error = update_error(trained, copied(lora_state_dict(reference)), start_state)
        del reference, reference_params
        release(device)
    checks(error <= CROSS_WORLD_TOLERANCE,
           f"adapters equal a one-rank run of the same global batch: |difference| / |update| {error:.1e} "
           f"(tolerance {CROSS_WORLD_TOLERANCE:.0e})")


# --- 3: step time and memory --------------------------------------------------------------------


def measure(s: Setting, data: list[Batch], mesh: DeviceMesh, device: torch.device, lora: bool) -> tuple[float, float]:
    """Median ms per step and peak GiB (0 on CPU) of this rank, after ``s.warmup`` untimed steps."""
    model = build(s, mesh, device, lora)
    params = list(lora_parameters(model)) if lora else list(model.parameters())
    batch = on(device, data[dist.get_rank()])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, seconds = train(model, params, batch, s.warmup + s.steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0
    del model, params
    release(device)
    return 1000 * statistics.median(seconds[s.warmup:]), peak


def report_speed(s: Setting, data: list[Batch], mesh: DeviceMesh, device: torch.device) -> dict[str, Any]:
    """Rank 0 prints the table; returns it for ``--json``."""
    lora_ms, lora_peak = measure(s, data, mesh, device, lora=True)
    full_ms, full_peak = measure(s, data, mesh, device, lora=False)
    rows = [dict(zip(("rank", "lora_ms", "full_ms", "lora_peak_gib", "full_peak_gib"), values))
            for values in gather((dist.get_rank(), lora_ms, full_ms, lora_peak, full_peak))]
    time_ratio = max(row["lora_ms"] for row in rows) / max(row["full_ms"] for row in rows)
    cuda = device.type == "cuda"
    memory_ratio = max(r["lora_peak_gib"] for r in rows) / max(r["full_peak_gib"] for r in rows) if cuda else None
    if dist.get_rank() == 0:
        name = f"{torch.cuda.get_device_name(device)} x {len(rows)}, NCCL" if cuda else f"cpu x {len(rows)}, gloo"
        gib = (lambda value: f"{value:.2f}") if cuda else (lambda value: "n/a")
        print(f"device: {name}; torch {torch.__version__}; {s.layers} layers, hidden {s.hidden}, FFN {s.ffn}, "
              f"batch {s.batch} x {s.seq_len} per rank, r={s.r} on {','.join(ATTENTION)}; median of {s.steps} steps")
        print("LoRA: bfloat16 base, float32 adapters. Full fine-tuning: float32 master weights. Both "
              "MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), AdamW.")
        print("| rank | LoRA ms/step | full FT ms/step | LoRA / full time | LoRA peak GiB | full FT peak GiB | "
              "LoRA / full memory |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            memory = f"{row['lora_peak_gib'] / row['full_peak_gib']:.3f}" if cuda else "n/a"
            print(f"| {row['rank']} | {row['lora_ms']:.1f} | {row['full_ms']:.1f} | "
                  f"{row['lora_ms'] / row['full_ms']:.3f} | {gib(row['lora_peak_gib'])} | {gib(row['full_peak_gib'])} | "
                  f"{memory} |")
        memory_text = f"{memory_ratio:.3f} (largest rank)" if memory_ratio is not None else "n/a"
        print(f"LoRA / full fine-tuning: time {time_ratio:.3f} (slowest rank), peak memory {memory_text}", flush=True)
    return {"rows": rows, "time_ratio": time_ratio, "memory_ratio": memory_ratio,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu"}


# --- 4: Lightning ------------------------------------------------------------------------------


def lightning_fit(s: Setting, device: torch.device, folder: Path, epochs: int, ckpt_path: Path | None = None,
                  ) -> tuple[State, list[State]]:
    """Fit on every rank of the process group; the adapters at the end and after each epoch (gathered)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = Encoder(s).to(torch.bfloat16)

        def configure_model(self) -> None:
            if not isinstance(self.model.layers[0], FSDPModule):
                shard(self.model, self.device_mesh["data_parallel"])

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.MATH):  # deterministic backward: runs compare to rounding
                return loss_fn(self.model(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # the loss is a mean over B x T x C values, so its gradients are small: lr 1
            return torch.optim.SGD(lora_parameters(self), lr=1.0, momentum=0.9)

    class Record(L.Callback):
        def __init__(self) -> None:
            self.epochs: list[State] = []

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.epochs.append(copied(lora_state_dict(pl_module)))  # every rank: the shards are gathered

    rank, world = dist.get_rank(), dist.get_world_size()
    tokens, targets = (torch.cat(values) for values in zip(*parts(s, world)))
    dataset = TensorDataset(tokens, targets)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    record = Record()
    trainer = L.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=world, num_nodes=1, max_epochs=epochs,
        logger=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=folder, callbacks=[LoRACallback(config=lora_config(s)), record,
                                            ModelCheckpoint(dirpath=folder, save_top_k=-1)],
    )
    module = Module()
    trainer.fit(module, DataLoader(dataset, batch_size=s.batch, sampler=sampler), ckpt_path=ckpt_path)
    return copied(lora_state_dict(module)), record.epochs


def one_rank_phase(s: Setting, device: torch.device, folder: Path, world: int) -> None:
    """In a process of its own (a group of one): what rank 0 of the N-rank job compares."""
    many = folder / "many"
    companion = load_into_plain_model(s, many / "epoch=0-step=1.lora.safetensors")
    torch.save(companion, folder / "one_from_companion.pt")
    resumed, _ = lightning_fit(replace(s, batch=s.batch * world), device, folder / "one_resumed", 2,
                               many / "epoch=0-step=1.ckpt")
    torch.save(resumed, folder / "one_resumed.pt")
    straight, epochs = lightning_fit(replace(s, batch=s.batch * world), device, folder / "one", 2)
    torch.save({"straight": straight, "epoch0": epochs[0]}, folder / "one_straight.pt")


def load_into_plain_model(s: Setting, path: Path) -> State:
    """The adapter file loaded into the Lightning module's base model, outside Lightning (names ``model.*``)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"model": Encoder(replace(s, device="cpu")).to(torch.bfloat16)})
    load_adapter(model, path)
    return copied(lora_state_dict(model))


def one_rank_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    return env


def check_lightning(s: Setting, device: torch.device, checks: Checks) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = Path(gather(tempfile.mkdtemp(prefix="gpu_fsdp2_") if rank == 0 else None)[0])
    same_world = (lambda e: e == 0.0) if device.type == "cpu" else (lambda e: e <= SAME_WORLD_CUDA_TOLERANCE)
    straight, epochs = lightning_fit(s, device, folder / "many", 2)
    first = folder / "many" / "epoch=0-step=1.ckpt"
    companion = folder / "many" / "epoch=0-step=1.lora.safetensors"
    checks(first.is_dir() and (folder / "many" / "epoch=1-step=2.ckpt").is_dir(),
           f"Lightning, {ranks(world)}: a sharded checkpoint folder every epoch")
    whole = {k: tuple(v.shape) for k, v in straight.items()}
    checks(companion.is_file() and {k: tuple(v.shape) for k, v in read_adapter(companion).tensors.items()} == whole,
           "Lightning: the companion adapter file holds whole tensors")
    resumed, _ = lightning_fit(s, device, folder / "many_resumed", 2, first)
    error = update_error(resumed, straight, epochs[0])
    checks(same_world(error),
           f"Lightning: resume on {ranks(world)} continues the run (|difference| / |update| {error:.1e})")

    done = 0
    if rank == 0:
        command = [sys.executable, __file__, "--device", device.type, "--phase", "one-rank",
                   "--folder", str(folder), "--world", str(world)]
        done = subprocess.run(command, env=one_rank_environment(), check=False).returncode
    done = gather(done)[0]
    results = {name: torch.load(folder / f"{name}.pt", weights_only=True) if done == 0 else None
               for name in ("one_from_companion", "one_resumed", "one_straight")}
    loaded, one = results["one_from_companion"] or {}, results["one_straight"]
    checks(done == 0 and loaded.keys() == epochs[0].keys() and all(torch.equal(loaded[k], epochs[0][k]) for k in loaded),
           f"Lightning: the companion loads into a one-rank model, exactly the adapters of that epoch "
           f"(one-rank process exit status {done})")
    error = update_error(results["one_resumed"], straight, epochs[0]) if done == 0 else 1.0
    checks(error <= CROSS_WORLD_TOLERANCE,
           f"Lightning: the {world}-rank sharded checkpoint resumes on one rank ({world} -> 1): "
           f"|difference| / |update| {error:.1e}")
    error = 1.0
    if one is not None:
        resumed, _ = lightning_fit(s, device, folder / "many_from_one", 2, folder / "one" / "epoch=0-step=1.ckpt")
        error = update_error(resumed, one["straight"], one["epoch0"])
    checks(error <= CROSS_WORLD_TOLERANCE,
           f"Lightning: a one-rank checkpoint resumes on {ranks(world)} (1 -> {world}): "
           f"|difference| / |update| {error:.1e}")
    dist.barrier()  # every rank is done with the folder
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)


# --- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[torch.device]:
    device = start(device_type)
    try:
        yield device
        gc.collect()  # the meshes and models that hold process groups, so that they go with the groups below
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--json", type=Path, help="rank 0 writes the table and the checks to this JSON file")
    parser.add_argument("--phase", choices=["all", "one-rank"], default="all",
                        help="one-rank: the one-rank Lightning runs, started by rank 0 itself")
    parser.add_argument("--folder", type=Path, help="for --phase one-rank: the N-rank runs' folder")
    parser.add_argument("--world", type=int, help="for --phase one-rank: the N-rank job's number of ranks")
    args = parser.parse_args(argv)
    if args.phase == "one-rank" and (args.folder is None or args.world is None):
        parser.error("--phase one-rank needs --folder and --world")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False); "
              "torchrun --nproc_per_node=2 benchmarks/gpu_fsdp2.py --device cpu runs the dry run")
        return 0
    if args.steps < 1:
        sys.exit(f"--steps must be at least 1, got {args.steps}")
    if FAULT not in ("", "unsharded-first-layer"):
        sys.exit(f"GPU_FSDP2_FAULT must be unset or 'unsharded-first-layer', got {FAULT!r}")
    with process_group(args.device) as device:
        if args.phase == "one-rank":
            one_rank_phase(setting(args.device, 2, sizes="cpu"), device, args.folder, args.world)
            return 0
        s = setting(args.device, args.steps)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        data = parts(s, dist.get_world_size())  # the same on every rank
        checks = Checks()
        check_meta_init(s, data, mesh, device, checks)
        check_training(s, data, mesh, device, checks)
        table = report_speed(s, data, mesh, device)
        check_lightning(setting(args.device, 2, sizes="cpu"), device, checks)  # behaviour, not speed
        if dist.get_rank() == 0:
            write_json(args.json, {"benchmark": "gpu_fsdp2", "world_size": dist.get_world_size(),
                                   "setting": s.to_dict(), **table, "checks": checks.results})
            print(f"{sum(not c['ok'] for c in checks.results)} of {len(checks.results)} checks failed"
                  if checks.failed else f"all {len(checks.results)} checks passed", flush=True)
        return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint digests: what recording and verifying them costs on a checkpoint of a given size.

A checkpoint of ``--gib`` GiB (a small adapted model whose optimizer state holds the bulk, as in a
long LoRA run with AdamW) is written through ``LoRACheckpointIO``, timing the save and the digest
inside it; then it is verified (``verify_checkpoint``: one SHA-256 pass over the file, on one core)
and loaded (``torch.load``). It prints the save time and the digest's share of it, the bytes
digested per byte written (one pass: 1.0), the verification speed in GiB/s and verification / load.

    python benchmarks/checkpoint_digests.py                       # 1 GiB, about a minute
    python benchmarks/checkpoint_digests.py --gib 0.01 --repeats 1  # a quick dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from report import render_digests  # noqa: E402

import lightning_lora.lightning.checkpoint as checkpoint_module  # noqa: E402
from lightning_lora import LoRAConfig, apply_lora  # noqa: E402
from lightning_lora.lightning import LoRACheckpointIO, adapter_path_for  # noqa: E402
from lightning_lora.lightning.digests import verify_checkpoint  # noqa: E402


def checkpoint_of(gib: float) -> tuple[nn.Module, dict[str, Any]]:
    """An adapted model and a Lightning-like checkpoint of it of about ``gib`` GiB (the optimizer state)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(256, 256) for _ in range(4)))
    apply_lora(model, LoRAConfig(r=8, targets=["all-linear"]))
    chunk = 2**24  # 64 MiB of float32 per tensor
    total = int(gib * 2**30 / 4)
    state = {}
    index = 0
    while total > 0:
        n = min(chunk, total)
        state[index] = {"exp_avg": torch.randn(n // 2), "exp_avg_sq": torch.rand(n - n // 2)}
        total -= n
        index += 1
    checkpoint = {"state_dict": model.state_dict(), "epoch": 0, "global_step": 1,
                  "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-3, "params": list(state)}]}]}
    return model, checkpoint


def run(gib: float, repeats: int) -> dict[str, Any]:
    model, checkpoint = checkpoint_of(gib)
    io = LoRACheckpointIO(TorchCheckpointIO(), lambda: model)
    real = checkpoint_module.digest_bytes
    hashed: list[int] = []
    times: dict[str, list[float]] = {"save": [], "digest": [], "verify": [], "load": []}

    def digest(data: Any) -> str:
        start = time.perf_counter()
        found = real(data)
        times["digest"].append(time.perf_counter() - start)
        hashed.append(len(data))
        return found

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "epoch=0-step=1.ckpt"
        for _ in range(repeats):
            hashed.clear()
            checkpoint_module.digest_bytes = digest  # type: ignore[assignment]
            try:
                start = time.perf_counter()
                io.save_checkpoint(dict(checkpoint), path)
                times["save"].append(time.perf_counter() - start)
            finally:
                checkpoint_module.digest_bytes = real  # type: ignore[assignment]
            size = path.stat().st_size
            digested = sum(hashed)
            start = time.perf_counter()  # verified, then loaded: both from the page cache
            assert verify_checkpoint(str(path), adapter_path_for)
            times["verify"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.load(path, map_location="cpu", weights_only=True, mmap=False)
            times["load"].append(time.perf_counter() - start)
    ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
    return {
        "benchmark": "digests",
        "setting": {"preset": "cpu", "gib": gib, "repeats": repeats},
        "environment": environment(types.SimpleNamespace(device="cpu")),  # type: ignore[arg-type]
        "bytes": size,
        "digested_per_written": digested / size,
        "ms": ms,
        "digest_share": ms["digest"] / ms["save"],
        "digest_gib_s": size / 2**30 / (ms["digest"] / 1000),
        "verify_gib_s": size / 2**30 / (ms["verify"] / 1000),
        "verify_vs_load": ms["verify"] / ms["load"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="the checkpoint's size in GiB")
    parser.add_argument("--repeats", type=int, default=3, help="saves, each followed by a verification and a load")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.gib <= 0 or args.repeats < 1:
        parser.error(f"--gib must be > 0 and --repeats >= 1, got {args.gib} and {args.repeats}")
    torch.set_num_threads(1)  # per core
    payload = run(args.gib, args.repeats)
    print(render_digests(payload))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

"""Step time of a Lightning ``fit`` with ``LoRACallback`` against the same LoRA model without it.

Both runs train the same seeded model on the same data for the same number of steps, with a
logger attached and ``log_every_n_steps=1``, so every step is a logging step for the callback
(the most it ever does: gradient norm and scaling logged each step). Without the callback the
model is adapted by ``apply_lora`` before ``fit``. The two runs alternate (several fits each) and
the step time is the median over all timed steps of each, measured from batch start to batch end
(forward, backward, optimizer step and every callback hook).

Usage::

    python benchmarks/callback_overhead.py         # the CPU preset
    python benchmarks/callback_overhead.py --preset gpu --json benchmarks/results/gpu-callback.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Setting,
    add_arguments,
    build_base,
    environment,
    loss_fn,
    make_batch,
    median_ms,
    our_config,
    setting_from_args,
    synchronize,
    write_json,
)

from report import render_callback  # noqa: E402

from lightning_lora import LoRACallback, apply_lora, lora_parameters  # noqa: E402


class EncoderModule(L.LightningModule):
    """The benchmark encoder as a LightningModule: the benchmarks' regression loss, logged each step."""

    def __init__(self, s: Setting) -> None:
        super().__init__()
        self.net = build_base(s).requires_grad_(True)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = loss_fn(self.net(tokens), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(lora_parameters(self), lr=1e-4)


class StepTimer(L.Callback):
    """Seconds from each batch start to its end (device synchronised at both ends)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)


def fit(s: Setting, targets: list[str], with_callback: bool, root: Path) -> list[float]:
    """One ``fit`` of ``warmup + steps`` steps; returns the timed steps' seconds."""
    module = EncoderModule(s)
    config = our_config(s, targets)
    timer = StepTimer(s.device)
    callbacks: list[L.Callback] = [timer]
    if with_callback:
        callbacks.append(LoRACallback(config=config))
    else:
        apply_lora(module, config)
    tokens, targets = make_batch(s)
    loader = DataLoader(TensorDataset(tokens.cpu(), targets.cpu()), batch_size=s.batch)
    precision = {"float32": "32-true", "bfloat16": "bf16-true", "float16": "16-true"}[s.dtype]
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="gpu" if s.device.startswith("cuda") else "cpu",
        devices=1,
        precision=precision,
        max_steps=s.warmup + s.steps,
        logger=CSVLogger(root),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one batch per epoch: Lightning warns about the small loader
        trainer.fit(module, loader)
    return timer.times[s.warmup:]


def run(s: Setting, repeats: int) -> dict[str, Any]:
    """Alternate fits with and without the callback; returns the JSON payload."""
    label = max(s.target_sets, key=lambda name: len(s.target_sets[name]))  # the most adapters: the most work
    times: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(repeats):
            times["without"] += fit(s, s.target_sets[label], False, Path(root))
            times["with"] += fit(s, s.target_sets[label], True, Path(root))
    ms = {key: median_ms(t) for key, t in times.items()}
    return {
        "benchmark": "callback",
        "setting": {**s.to_dict(), "repeats": repeats, "targets": label, "log_every_n_steps": 1},
        "environment": environment(s),
        "ms_without": ms["without"],
        "ms_with": ms["with"],
        "ratio": ms["with"] / ms["without"],
        "times_ms": {key: [1000.0 * t for t in t_] for key, t_ in times.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="fits with and without the callback, alternating")
    args = parser.parse_args(argv)
    s = setting_from_args(args)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the output to the result
    payload = run(s, args.repeats)
    print(render_callback(payload))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

"""Step time of a Lightning ``fit`` with ``LoRACallback`` against the same LoRA model without it.

Both runs train the same seeded model on the same data for the same number of steps, with a
logger attached and ``log_every_n_steps=1``, so every step is a logging step for the callback
(the most it ever does: gradient norm and scaling logged each step). Without the callback the
model is adapted by ``apply_lora`` before ``fit``. The two runs alternate (several fits each, in
ABBA order) and the step time is the median over all timed steps of each, measured from batch
start to batch end (forward, backward, optimizer step and every callback hook). Since step-to-step noise on a shared
machine can exceed the callback's cost, the time spent inside the callback's own hooks is also
measured directly, per step.

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
from collections.abc import Callable
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
    """Seconds from each batch start to its end (device synchronised at both ends).

    It also collects, per step, the seconds spent inside the hooks of a watched callback (see
    :meth:`watch`): a direct measure of the callback's cost, free of step-to-step noise. (On a
    GPU this is host time; the hooks are not synchronised separately.)
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self._start = 0.0
        self._in_hooks = 0.0

    def watch(self, callback: L.Callback) -> None:
        """Time every hook that ``callback`` overrides, from now on."""
        for name in dir(L.Callback):
            hook = getattr(type(callback), name, None)
            if name.startswith("_") or not callable(hook) or hook is getattr(L.Callback, name):
                continue
            setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self._in_hooks += time.perf_counter() - start

        return timed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        synchronize(self.device)
        self._in_hooks = 0.0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        self.hook_times.append(self._in_hooks)


def fit(s: Setting, targets: list[str], with_callback: bool, root: Path) -> tuple[list[float], list[float]]:
    """One ``fit`` of ``warmup + steps`` steps.

    Returns:
        Seconds per timed step, and seconds per timed step inside the callback's hooks.
    """
    module = EncoderModule(s)
    config = our_config(s, targets)
    timer = StepTimer(s.device)
    callbacks: list[L.Callback] = [timer]
    if with_callback:
        callbacks.append(LoRACallback(config=config))
        timer.watch(callbacks[-1])
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
    return timer.times[s.warmup:], timer.hook_times[s.warmup:]


def run(s: Setting, repeats: int) -> dict[str, Any]:
    """Alternate fits with and without the callback; returns the JSON payload."""
    label = max(s.target_sets, key=lambda name: len(s.target_sets[name]))  # the most adapters: the most work
    times: dict[str, list[float]] = {"without": [], "with": []}
    hooks: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(repeats):
            # ABBA order: whichever fit runs first in a pair runs measurably slower on this machine
            for with_callback in (False, True) if repeat % 2 == 0 else (True, False):
                step_times, hook_times = fit(s, s.target_sets[label], with_callback, Path(root))
                times["with" if with_callback else "without"] += step_times
                if with_callback:
                    hooks += hook_times
    ms = {key: median_ms(t) for key, t in times.items()}
    return {
        "benchmark": "callback",
        "setting": {**s.to_dict(), "repeats": repeats, "targets": label, "log_every_n_steps": 1},
        "environment": environment(s),
        "ms_without": ms["without"],
        "ms_with": ms["with"],
        "ratio": ms["with"] / ms["without"],
        "hook_ms": median_ms(hooks),
        "hook_share": median_ms(hooks) / ms["with"],
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

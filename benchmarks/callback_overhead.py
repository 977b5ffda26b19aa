"""Step time of a Lightning ``fit`` with ``LoRACallback`` against the same LoRA model without it.

Both runs train the same seeded model on the same data for the same number of steps, with a
logger attached and ``log_every_n_steps=1``, so every step is a logging step for the callback
(the most it ever does: gradient norm and scaling logged each step). Without the callback the
model is adapted by ``apply_lora`` before ``fit``. The two runs alternate (several fits each, in
ABBA order) and the step time is the median over all timed steps of each, measured from batch
start to batch end (forward, backward, optimizer step and every callback hook). Since step-to-step noise on a shared
machine can exceed the callback's cost, the time spent inside the callback's own hooks is also
measured directly, per step.

With ``--setup``, it measures instead what adapting and checkpointing cost on a deeper model (24
layers by default, ``--setup-layers``): the time from ``trainer.fit`` to the first training step with
``LoRACallback`` (the callback plans and installs the adapters there), the same for the model adapted by
``apply_lora`` before ``fit`` (``apply_lora`` included), and the time of one ``trainer.save_checkpoint``
(a slim checkpoint and its companion adapter file). Each measurement runs in a fresh process. With
``--baseline PATH`` (a checkout of another version of this package, e.g. ``git worktree add PATH
<commit>``) the processes alternate between that version and this one, so both are measured side by
side in one run and the ratios this/baseline are printed.

Usage::

    python benchmarks/callback_overhead.py         # the CPU preset
    python benchmarks/callback_overhead.py --preset gpu --json benchmarks/results/gpu-callback.json
    python benchmarks/callback_overhead.py --setup --baseline ../before   # setup and save, before and after
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
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

from report import render_callback, render_setup  # noqa: E402

import lightning_lora  # noqa: E402
from lightning_lora import LoRACallback, apply_lora, lora_parameters  # noqa: E402

#: The depth of the model whose setup and checkpoint saves are timed (``--setup``).
SETUP_LAYERS = 24


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


class UntilTraining(L.Callback):
    """The ``perf_counter`` time at which training starts."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at = time.perf_counter()


def setup_worker(s: Setting, saves: int) -> dict[str, Any]:
    """In this process: fit setup with and without the callback, then ``saves`` checkpoint saves.

    Returns:
        Seconds: ``with`` (``fit`` until training starts, adapted by the callback), ``without``
        (``apply_lora``, then the same), ``save`` (the median of the checkpoint saves), and the
        package that ran.
    """
    label = max(s.target_sets, key=lambda name: len(s.target_sets[name]))
    config = our_config(s, s.target_sets[label])
    tokens, targets = make_batch(s)
    loader = DataLoader(TensorDataset(tokens.cpu(), targets.cpu()), batch_size=s.batch)
    seconds: dict[str, Any] = {"package": os.path.dirname(lightning_lora.__file__)}
    with tempfile.TemporaryDirectory() as root:
        for with_callback in (False, True):
            torch.manual_seed(s.seed)
            module = EncoderModule(s)
            probe = UntilTraining()
            start = time.perf_counter()
            if not with_callback:
                apply_lora(module, config)
            trainer = L.Trainer(
                default_root_dir=root, accelerator="cpu", devices=1, max_steps=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[probe, *([LoRACallback(config=config)] if with_callback else [])],
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module, loader)
            seconds["with" if with_callback else "without"] = probe.at - start
        times = []
        for index in range(saves):
            start = time.perf_counter()
            trainer.save_checkpoint(Path(root) / f"save-{index}.ckpt")
            times.append(time.perf_counter() - start)
        seconds["save"] = sorted(times)[len(times) // 2]
    return seconds


def run_setup(s: Setting, repeats: int, saves: int, baseline: Path | None) -> dict[str, Any]:
    """Setup and save times of this package (and of ``baseline``, alternating), each in a fresh process."""
    sides = {"this": Path(__file__).resolve().parents[1]}
    if baseline is not None:
        sides = {"baseline": baseline.resolve(), **sides}
    results: dict[str, dict[str, list[float]]] = {side: {"with": [], "without": [], "save": []} for side in sides}
    packages = {}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))  # ABBA
        for side in order:
            env = {**os.environ, "PYTHONPATH": str(sides[side]), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
            if not env["OMP_NUM_THREADS"]:
                del env["OMP_NUM_THREADS"]
            command = [sys.executable, __file__, "--setup-worker", "--saves", str(saves), *_setting_args(s)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"the {side} worker failed:\n{done.stderr[-3000:]}")
            values = json.loads(done.stdout.strip().splitlines()[-1])
            packages[side] = values.pop("package")
            for key, value in values.items():
                results[side][key].append(value)
    ms = {side: {key: median_ms(values) for key, values in result.items()} for side, result in results.items()}
    return {
        "benchmark": "callback_setup",
        "setting": {**s.to_dict(), "repeats": repeats, "saves": saves},
        "environment": environment(s),
        "packages": packages,
        "commits": {side: _commit(folder) for side, folder in sides.items()},
        "ms": ms,
        "times_ms": {side: {k: [1000.0 * v for v in vs] for k, vs in r.items()} for side, r in results.items()},
    }


def _setting_args(s: Setting) -> list[str]:
    """Command-line arguments that give a worker process the setting ``s``."""
    args = ["--preset", s.preset, "--model", s.model, "--dtype", s.dtype, "--device", s.device, "--seed", str(s.seed)]
    for name in ("layers", "hidden", "ffn", "heads", "vocab", "batch", "seq_len", "r", "alpha"):
        args += [f"--{name.replace('_', '-')}", str(getattr(s, name))]
    for targets in s.target_sets.values():
        args += ["--targets", ",".join(targets)]
    return args


def _commit(folder: Path) -> str:
    """The checked-out commit of ``folder`` (with ``+changes`` if its files differ from it), or "unknown"."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="fits with and without the callback, alternating")
    parser.add_argument("--setup", action="store_true", help="time setup and checkpoint saves instead of steps")
    parser.add_argument("--setup-layers", type=int, default=SETUP_LAYERS, help="the model's depth for --setup")
    parser.add_argument("--saves", type=int, default=5, help="checkpoint saves timed per process, for --setup")
    parser.add_argument("--baseline", type=Path, help="with --setup: a checkout of another version, measured alongside")
    parser.add_argument("--setup-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "lightning_lora" / "__init__.py").is_file():
        parser.error(f"--baseline must be a checkout of lightning-lora (with lightning_lora/__init__.py), got {args.baseline}")
    s = setting_from_args(args)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the output to the result
    if args.setup_worker:
        print(json.dumps(setup_worker(s, args.saves)))
        return
    if args.setup:
        s = dataclasses.replace(s, layers=args.setup_layers)
        payload = run_setup(s, args.repeats, args.saves, args.baseline)
        print(render_setup(payload))
    else:
        payload = run(s, args.repeats)
        print(render_callback(payload))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

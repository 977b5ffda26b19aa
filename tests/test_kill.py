"""Kill -9 during checkpointing: no partial file under a final name, no stale pair, every survivor resumes.

A real training process writes a checkpoint (and its companion adapter file) every step, keeps the two
newest plus ``last``, and is killed with SIGKILL at a random moment; this repeats for a few trials with
a fixed seed.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_models import Classifier, data
from test_callback import trainer

from lightning_lora import LoRACallback, read_adapter
from lightning_lora.lightning import check_companion

TRIALS = 4
SEED = 0
TESTS = Path(__file__).resolve().parent
SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_models import Classifier, data
from lightning_lora import LoRACallback

class Ready(Callback):
    def on_train_start(self, trainer, pl_module):
        print("READY", flush=True)

torch.manual_seed(0)
model = Classifier(dim=64)
torch.save(model.state_dict(), {base!r})
saver = ModelCheckpoint(dirpath={folder!r}, every_n_train_steps=1, save_top_k=2, monitor="step", mode="max", save_last=True)
L.Trainer(max_epochs=1000, logger=False, enable_progress_bar=False, enable_model_summary=False,
          callbacks=[LoRACallback(targets=["qkv", "fc1"]), saver, Ready()]).fit(model, data())
"""


def _kill_during_training(folder: Path, base: Path, delay: float) -> None:
    script = SCRIPT.format(tests=str(TESTS), base=str(base), folder=str(folder))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "READY", "the training process did not start"
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_during_checkpointing(tmp_path, trial):
    delay = random.Random(SEED + trial).uniform(0.2, 2.0)
    folder, base = tmp_path / "ckpt", tmp_path / "base.pt"
    _kill_during_training(folder, base, delay)
    names = sorted(os.listdir(folder))
    checkpoints = [n for n in names if n.endswith(".ckpt")]
    companions = [n for n in names if n.endswith(".lora.safetensors")]
    assert checkpoints, f"no checkpoint written within {delay:.2f} s"
    assert all(n.endswith((".ckpt", ".lora.safetensors")) or n.startswith(".") for n in names), names
    for name in companions:  # never a companion without its checkpoint
        assert name.removesuffix(".lora.safetensors") + ".ckpt" in checkpoints, name
        read_adapter(folder / name)  # complete and intact
    base_state = torch.load(base, weights_only=True)
    for name in checkpoints:
        checkpoint = torch.load(folder / name, weights_only=True)  # complete: never partial
        if name.removesuffix(".ckpt") + ".lora.safetensors" in companions:
            check_companion(folder / name)  # never a stale pair
        model = Classifier(dim=64)
        model.load_state_dict(base_state)
        resumed = trainer(tmp_path / "resume" / name, LoRACallback(targets=["qkv", "fc1"]), logger=False, max_epochs=-1, max_steps=checkpoint["global_step"] + 1)
        resumed.fit(model, data(), ckpt_path=folder / name)
        assert resumed.global_step == checkpoint["global_step"] + 1

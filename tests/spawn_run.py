"""A spawn launcher with LoRACallback alone, for tests/test_spawn.py: ``python spawn_run.py FOLDER STRATEGY [adapted]``.

Run in a fresh process, as a notebook or script starts it: ``STRATEGY`` (``ddp_spawn``, ``ddp_fork`` or
``ddp_notebook``) trains 2 CPU processes. Rank 0 saves its model's whole state as training ended
(``FOLDER/final.pt``); the launching process saves its model's state before and after ``fit``
(``FOLDER/launching.pt``). ``adapted``: the model is adapted with the callback's config before ``fit``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from lightning_models import Classifier, data  # noqa: E402

from lightning_lora import LoRACallback, apply_lora, lora_modules  # noqa: E402


class FinalState(Callback):
    """Rank 0 keeps the model's whole state as training ended, in the process that trained it."""

    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.state_dict(), self.path)


if __name__ == "__main__":
    folder, strategy = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = Classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = LoRACallback(targets=["qkv"], trainable=["net.head"])
    if "adapted" in sys.argv[3:]:
        apply_lora(model, callback.config)
    saver = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)
    trainer = L.Trainer(default_root_dir=folder, strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_progress_bar=False, callbacks=[callback, saver, FinalState(folder / "final.pt")])
    trainer.fit(model, data())
    torch.save({"before": before, "after": model.state_dict(), "adapted": sorted(lora_modules(model))}, folder / "launching.pt")

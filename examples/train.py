"""LoRA fine-tuning from the command line.

    python examples/train.py                                  # the default: digits 0-4 -> 5-9
    python examples/train.py lora.r=16 lora.alpha=32 lora.bias=false 'lora.targets=[q_proj,v_proj]'
    python examples/train.py lora=attention trainer.max_epochs=3
    python examples/train.py -m lora=attention,all_linear,none   # ends with a comparison table
    python examples/train.py mode=evaluate lora.adapter_path=<run>/checkpoints/final.lora.safetensors

Every run writes under Hydra's run directory: checkpoints/ (slim Lightning checkpoints: the best,
last.ckpt and final.ckpt of the model at the end, each with its .lora.safetensors adapter file;
with lora.merge_on_end=true also merged.safetensors, the merged model's weights under the base
model's own names), csv/ (logged metrics) and result.json (the summary below).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

import lightning_lora  # noqa: F401  (registers the Hydra "lora" group)
from lightning_lora import LoRACallback, lora_modules, lora_summary, merge_and_unload, read_adapter, unmerge_lora
from lightning_lora.lightning import adapter_path_for
from lightning_lora.lightning.settings import CALLBACK_ARGUMENTS
from lightning_lora.config import FIELDS, reconcile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DEFAULT_WEIGHTS, pretrain  # noqa: E402

log = logging.getLogger(__name__)
MODES = ("train", "evaluate")


class StepTimer(Callback):
    """Wall-clock seconds of each training step (forward, backward and optimizer)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def pretrained_weights(cfg: DictConfig) -> Path:
    """The configured backbone file, or the cached one (pretrained now if it is missing)."""
    if cfg.model.pretrained_path is not None:
        return Path(cfg.model.pretrained_path)
    backbone = cfg.model.backbone
    classes = "".join(str(c) for c in cfg.pretrain.classes)
    name = f"vit-digits-{classes}-e{cfg.pretrain.epochs}-d{backbone.dim}x{backbone.depth}-s{cfg.seed}.safetensors"
    path = DEFAULT_WEIGHTS.with_name(name)
    if not path.exists():
        log.info("No pretrained backbone at %s: pretraining one on digits %s (once)", path, list(cfg.pretrain.classes))
        pretrain(path, list(cfg.pretrain.classes), OmegaConf.to_container(backbone), cfg.pretrain.epochs, cfg.seed)
    return path


def evaluation_callback(cfg: DictConfig) -> LoRACallback:
    """The callback for ``mode=evaluate``: the adapter file's own settings.

    The preset's values (``alpha: 8.0`` in ``lora/default.yaml``, say) are not the user's choice, so
    only the ``lora.*`` settings typed on the command line are compared with the file; any that
    contradicts it is an error.
    """
    path = cfg.lora.adapter_path if cfg.get("lora") is not None else None
    if path is None:
        raise ValueError("mode=evaluate needs lora.adapter_path=<adapter file>, got none")
    settings = OmegaConf.to_container(cfg.lora, resolve=True)
    assert isinstance(settings, dict)
    typed = {key.lstrip("+~").split("=")[0].removeprefix("lora.") for key in HydraConfig.get().overrides.task}
    reconcile(read_adapter(path).config, {name: settings[name] for name in FIELDS if name in typed}, f"lora.adapter_path {path!r}")
    return LoRACallback(adapter_path=path, **{name: settings[name] for name in CALLBACK_ARGUMENTS if name != "adapter_path"})


def validation_accuracy(trainer: L.Trainer, model: L.LightningModule, data: L.LightningDataModule) -> float:
    return float(trainer.validate(model, data, verbose=False)[0]["val/acc"])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or evaluate) as configured; returns the summary that is also written to result.json."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode == "evaluate":
        lora = evaluation_callback(cfg)
    else:
        lora = instantiate(cfg.lora) if cfg.get("lora") is not None else None  # bad lora values fail here
    weights = pretrained_weights(cfg)
    L.seed_everything(cfg.seed, verbose=False)  # after any pretraining: a cached backbone gives the same run
    model = instantiate(cfg.model, pretrained_path=str(weights))
    data = instantiate(cfg.data)
    output = Path(HydraConfig.get().runtime.output_dir)

    if cfg.mode == "evaluate":
        trainer = instantiate(cfg.trainer, callbacks=[lora], logger=False)
        accuracy = validation_accuracy(trainer, model, data)
        log.info("Base model %s + adapter %s: val/acc %.4f", weights.name, lora.adapter_path, accuracy)
        return {"mode": "evaluate", "adapter_path": lora.adapter_path, "val_acc": accuracy}

    checkpoints = ModelCheckpoint(dirpath=output / "checkpoints", monitor="val/acc", mode="max", save_last=True)
    timer = StepTimer()
    callbacks = [checkpoints, timer] + ([lora] if lora is not None else [])
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger))
    before = validation_accuracy(trainer, model, data)
    trainer.fit(model, data)
    after = validation_accuracy(trainer, model, data)  # merged, with lora.merge_on_end

    merged = any(adapter.merged for adapter in lora_modules(model).values())
    if merged:  # exactly the trained adapters again, for final.ckpt and its adapter file
        unmerge_lora(model)
    summary = lora_summary(model)
    last = output / "checkpoints" / "final.ckpt"  # the model just validated (last.ckpt is the last *saved* one)
    trainer.save_checkpoint(last, weights_only=False)  # with the optimizer state: a run can continue from it
    merged_path = output / "checkpoints" / "merged.safetensors"
    if merged:  # the merge of on_fit_end, under the base model's own names: loads with strict=True
        save_file(merge_and_unload(copy.deepcopy(model)).state_dict(), merged_path)
    adapter = Path(adapter_path_for(str(last)))
    full_weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    result = {
        "lora": HydraConfig.get().runtime.choices.get("lora", "?"),
        "overrides": " ".join(HydraConfig.get().overrides.task),
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "trainable_percent": round(summary.percent, 3),
        "adapter_bytes": adapter.stat().st_size if lora is not None else None,
        "checkpoint_bytes": last.stat().st_size,
        "merged_path": str(merged_path) if merged else None,
        "full_weights_bytes": full_weights,
        "val_acc_before": before,
        "val_acc_after": after,
        "seconds_per_step": statistics.median(timer.seconds[1:] or timer.seconds),
    }
    (output / "result.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"trainable parameters: {summary.trainable:,} of {summary.total:,} ({summary.percent:.2f}%)",
        f"val/acc before fine-tuning: {before:.4f}, after: {after:.4f}",
        f"checkpoint {last.name}: {_size(last.stat().st_size)} (full model weights: {_size(full_weights)})",
    ]
    if lora is not None:
        task = [o for o in HydraConfig.get().overrides.task if o.split("=")[0] not in ("mode", "trainer.max_epochs")]
        command = ["python", "examples/train.py", "mode=evaluate", *task, f"lora.adapter_path={adapter}"]
        lines.insert(2, f"adapter file {adapter.name}: {_size(adapter.stat().st_size)}")
        lines.append("reload the adapter: " + " ".join(_quote(part) for part in command))
    if merged:
        lines.insert(3, f"merged model {merged_path.name}: {_size(merged_path.stat().st_size)} (the base model's keys)")
    log.info("Summary\n  %s", "\n  ".join(lines))
    return result


def _size(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _quote(part: str) -> str:
    return f"'{part}'" if any(c in part for c in "[]{}, ") else part


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

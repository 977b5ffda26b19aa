"""Fine-tune a causal language model from transformers with LoRACallback, then export it for PEFT and vLLM.

    python examples/causal_lm.py                                        # a tiny Llama on the shipped word tasks, on a CPU
    python examples/causal_lm.py lora.r=16 lora.alpha=32 trainer.max_epochs=20
    python examples/causal_lm.py causal_lm=hub model.name=Qwen/Qwen2.5-0.5B data.path=my_data.jsonl
    python examples/causal_lm.py readme=README.md                      # also writes the summary into the README

By default the model is a tiny Llama built from a config with a character tokenizer, pretrained here (once,
cached under ``examples/.weights/``) on two of the word tasks of ``examples/data/word_tasks.jsonl`` (repeat,
lowercase); LoRA then teaches it another (uppercase). ``model.name`` (a hub id or a local
folder) loads any causal LM and its tokenizer with ``AutoModelForCausalLM`` / ``AutoTokenizer`` instead,
which is also how the tiny model is loaded once it is saved. The data is any JSONL file of
``{"prompt": ..., "response": ...}`` rows (see ``examples/prompts.py``): the prompt's tokens are masked
out of the loss and batches are padded to their longest example.

Writes under Hydra's run directory: ``checkpoints/`` (slim checkpoints with their adapter files),
``csv/`` (metrics), ``adapter.lora.safetensors``, ``peft/`` (``AutoPeftModelForCausalLM.from_pretrained``
loads it: it records the base model's folder or hub id), ``vllm/`` (``vllm serve BASE --enable-lora
--lora-modules mine=<run>/vllm``) and ``result.json``; prints the validation loss and perplexity before and
after, the exact-match rate of greedy answers to validation prompts, a sample generation and the paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torchmetrics
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

import lightning_lora  # noqa: F401  (registers the Hydra "lora" group)
from lightning_lora import export_peft, lora_summary, save_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import DEFAULT_DATA, IGNORE, PromptResponseData, char_tokenizer, read_examples  # noqa: E402
from sweep_summary import update_readme  # noqa: E402

log = logging.getLogger(__name__)
#: Where the tiny pretrained base model is cached.
WEIGHTS = Path(__file__).resolve().parent / ".weights"


class CausalLM(L.LightningModule):
    """A transformers causal LM trained on the masked labels of :mod:`prompts`; validation logs ``val/loss``
    (the mean negative log-likelihood per response token, over the whole validation set) and ``val/perplexity``."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.val_nll = torchmetrics.MeanMetric()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss  # transformers shifts the labels and ignores -100
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        tokens = (labels != IGNORE).sum()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        self.val_nll.update(nll / tokens, weight=tokens)  # token-weighted across batches (and processes)

    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        with torch.inference_mode(False):  # fresh states usable by the next validation, in or out of inference mode
            self.val_nll.reset()
        self.log("val/loss", nll)
        self.log("val/perplexity", nll.exp())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay)


def data_path(cfg: DictConfig) -> Path:
    return DEFAULT_DATA if cfg.data.path is None else Path(cfg.data.path)


def tiny_base(cfg: DictConfig) -> tuple[Path, bool]:
    """The folder of the tiny pretrained Llama (config, weights, tokenizer), built and pretrained once, and
    whether this call built it."""
    path = data_path(cfg)
    settings = {"tiny": OmegaConf.to_container(cfg.model.tiny), "pretrain": OmegaConf.to_container(cfg.model.pretrain),
                "template": cfg.data.template, "max_length": cfg.data.max_length, "seed": cfg.seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + path.read_bytes()).hexdigest()[:12]
    folder = (WEIGHTS if cfg.model.cache_dir is None else Path(cfg.model.cache_dir)) / f"tiny-llama-{key}"
    if (folder / "config.json").exists():
        return folder, False
    import transformers

    log.info("No tiny base model at %s: pretraining one on tasks %s (once)", folder, list(cfg.model.pretrain.tasks))
    L.seed_everything(cfg.seed, verbose=False)
    pairs = read_examples(path)
    tokenizer = char_tokenizer([cfg.data.template] + [text for pair in pairs for text in pair])
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=cfg.data.max_length,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **cfg.model.tiny)
    model = transformers.LlamaForCausalLM(config)
    data = PromptResponseData(tokenizer, path, list(cfg.model.pretrain.tasks), cfg.data.template, cfg.data.max_length,
                              batch_size=cfg.data.batch_size, seed=cfg.seed)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=cfg.model.pretrain.epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CausalLM(model, lr=cfg.model.pretrain.lr), data)
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # complete or absent
    return folder, True


def load(cfg: DictConfig) -> tuple[Any, Any, bool]:
    """The tokenizer and the causal LM of ``model.name`` (a hub id or local folder), else of the tiny base, and
    whether the tiny base was built now."""
    import transformers

    source, built = (cfg.model.name, False) if cfg.model.name is not None else tiny_base(cfg)
    source = str(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:  # Llama's and many others' have none: pad with end-of-sequence (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cfg.model.dtype))
    return tokenizer, model.train(), built  # from_pretrained gives it in eval mode


@torch.no_grad()
def answer(model: Any, tokenizer: Any, template: str, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy answer to ``prompt``, up to its end-of-sequence token."""
    inputs = tokenizer(template.format(prompt=prompt), return_tensors="pt").to(model.device)
    was_training = model.training
    model.eval()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def exact_match(model: Any, tokenizer: Any, cfg: DictConfig, pairs: list[tuple[str, str]]) -> float:
    """The share of ``pairs`` whose greedy answer is exactly the response."""
    answers = [answer(model, tokenizer, cfg.data.template, prompt, cfg.generate.max_new_tokens) for prompt, _ in pairs]
    return sum(given == response.strip() for given, (_, response) in zip(answers, pairs)) / len(pairs)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as configured, export, and return the summary also written to result.json (and, with
    ``readme=<file>``, between its ``<!-- causal-lm:start -->`` and ``<!-- causal-lm:end -->`` lines)."""
    started = time.perf_counter()
    lora = instantiate(cfg.lora)  # bad LoRA values fail here, before any model is loaded
    tokenizer, model, built = load(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    tasks = None if cfg.data.tasks is None else list(cfg.data.tasks)
    data = PromptResponseData(tokenizer, data_path(cfg), tasks, cfg.data.template, cfg.data.max_length,
                              cfg.data.val_fraction, cfg.data.batch_size, cfg.seed)
    data.setup()
    module = CausalLM(model, cfg.optim.lr, cfg.optim.weight_decay)
    output = Path(HydraConfig.get().runtime.output_dir)
    checkpoints = ModelCheckpoint(dirpath=output / "checkpoints", monitor="val/loss", save_last=True)
    trainer = instantiate(cfg.trainer, callbacks=[lora, checkpoints], logger=CSVLogger(output, name="csv"),
                          default_root_dir=str(output))
    probe = data.val_pairs[: cfg.generate.examples]
    before = trainer.validate(module, data, verbose=False)[0]
    matched_before = exact_match(module.model, tokenizer, cfg, probe)
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    matched_after = exact_match(module.model, tokenizer, cfg, probe)

    adapter = save_adapter(module.model, output / "adapter.lora.safetensors")
    peft_dir = export_peft(module.model, output / "peft")
    vllm_dir = export_peft(module.model, output / "vllm", target="vllm")
    prompt, response = data.val_pairs[0]
    sample = answer(module.model, tokenizer, cfg.data.template, prompt, cfg.generate.max_new_tokens)
    summary = lora_summary(module)
    base = module.model.config._name_or_path
    result = {
        "model": base,
        "trainable_params": summary.trainable,
        "total_params": summary.total,
        "val_loss_before": before["val/loss"],
        "val_loss_after": after["val/loss"],
        "val_perplexity_before": before["val/perplexity"],
        "val_perplexity_after": after["val/perplexity"],
        "exact_match_before": matched_before,
        "exact_match_after": matched_after,
        "sample": {"prompt": prompt, "answer": sample, "expected": response},
        "seconds": round(time.perf_counter() - started, 1),
        "adapter": adapter,
        "peft": peft_dir,
        "vllm": vllm_dir,
    }
    (output / "result.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"model: {base}{' (built and pretrained in this run)' if built else ''}; {result['seconds']:.0f} s in all",
        f"trainable parameters: {summary.trainable:,} of {summary.total:,} ({summary.percent:.2f}%)",
        f"val/loss {before['val/loss']:.3f} -> {after['val/loss']:.3f}, "
        f"val/perplexity {before['val/perplexity']:.2f} -> {after['val/perplexity']:.2f}",
        f"exact greedy answers to {len(probe)} validation prompts: {matched_before:.0%} -> {matched_after:.0%}",
        f"sample: {prompt!r} -> {sample!r} (expected {response!r})",
        f"PEFT adapter: {peft_dir}  (peft.AutoPeftModelForCausalLM.from_pretrained({str(peft_dir)!r}))",
        f"vLLM adapter: {vllm_dir}  (vllm serve {base} --enable-lora --lora-modules mine={vllm_dir})",
    ]
    log.info("Summary\n  %s", "\n  ".join(lines))
    if cfg.readme is not None:
        shown = [line.replace(str(output), "<run>").replace(str(WEIGHTS.parent.parent) + "/", "") for line in lines]
        update_readme(Path(cfg.readme), "```text\n" + "\n".join(shown) + "\n```", "causal-lm")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="causal_lm")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

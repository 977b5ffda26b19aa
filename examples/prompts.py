"""Prompt/response data for causal language models: a JSONL file, tokenized with the prompt masked out of the loss.

Each row of the file is a JSON object with ``prompt`` and ``response`` (and optionally ``task``). An example
is ``template.format(prompt=...)`` followed by the response and the end-of-sequence token; its labels are
the token ids, with -100 (ignored by the loss) on the prompt's tokens. Batches are padded to their longest
example: padding gets attention mask 0 and label -100.

``examples/data/word_tasks.jsonl`` (the default) holds four character tasks over 400 made-up words:
``Repeat: kifah`` -> ``kifah``, ``Reverse: kifah`` -> ``hafik``, ``Lowercase: KIFAH`` -> ``kifah`` and
``Uppercase: kifah`` -> ``KIFAH``.
:func:`char_tokenizer` makes a character-level tokenizer of any text, for the tiny model built from a config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

#: The labels the loss ignores (the prompt's tokens and padding).
IGNORE = -100
#: The data file used by default.
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "word_tasks.jsonl"


def read_examples(path: str | Path, tasks: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The (prompt, response) pairs of a JSONL file, those of ``tasks`` only where given.

    Raises:
        ValueError: naming the line that is not a JSON object with string ``prompt`` and ``response``, an
            unknown task, or a selection without examples.
    """
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} must be a JSON object, got {line[:60]!r} ({err})") from err
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ValueError(f"{path}:{number} must have string 'prompt' and 'response' fields, got {line[:60]!r}")
        rows.append(row)
    if tasks is not None:
        known = sorted({str(row.get("task")) for row in rows})
        unknown = [task for task in tasks if task not in known]
        if unknown:
            raise ValueError(f"data.tasks {unknown!r} are not in {path}; its tasks are {known!r}")
        rows = [row for row in rows if row.get("task") in tasks]
    if not rows:
        raise ValueError(f"{path} has no examples{'' if tasks is None else f' of tasks {list(tasks)!r}'}")
    return [(row["prompt"], row["response"]) for row in rows]


def char_tokenizer(texts: Sequence[str]) -> Any:
    """A character-level Hugging Face tokenizer of the characters in ``texts`` (with ``<pad>``, ``<s>``,
    ``</s>`` and ``<unk>``): it saves, loads and decodes as any other."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for char in sorted(set("".join(texts))):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # every character, newlines too
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def encode(tokenizer: Any, template: str, prompt: str, response: str, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels of one example (the prompt's labels -100), cut to ``max_length``; None when
    nothing of the response is left."""
    prompt_ids = tokenizer(template.format(prompt=prompt), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (on the right): attention mask 0 and labels -100 on padding."""
    length = max(len(example["input_ids"]) for example in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        pad = length - len(example["input_ids"])
        batch["input_ids"].append(example["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
        batch["labels"].append(example["labels"] + [IGNORE] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


class PromptResponseData(L.LightningDataModule):
    """A JSONL file of prompt/response pairs, split into training and validation examples (fixed, seeded).

    Args:
        tokenizer: a Hugging Face tokenizer (its pad token, else its end-of-sequence token, pads).
        path: the JSONL file.
        tasks: the rows' ``task`` values to keep (None: every row).
        template: the text around the prompt, with ``{prompt}`` in it.
        max_length: examples are cut to this many tokens.
        val_fraction: share of the examples held out for validation.
        batch_size: examples per batch.
        seed: seed of the split and of the training order.
    """

    def __init__(
        self,
        tokenizer: Any,
        path: str | Path = DEFAULT_DATA,
        tasks: Sequence[str] | None = None,
        template: str = "{prompt}\n",
        max_length: int = 256,
        val_fraction: float = 0.2,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if "{prompt}" not in template:
            raise ValueError(f"data.template must contain {{prompt}}, got {template!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
        self.tokenizer = tokenizer
        self.pairs = read_examples(path, tasks)
        self.template, self.max_length = template, max_length
        self.val_fraction, self.batch_size, self.seed = val_fraction, batch_size, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def setup(self, stage: str | None = None) -> None:
        order = torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, int(len(order) * self.val_fraction))
        encoded = [(self.pairs[i], encode(self.tokenizer, self.template, *self.pairs[i], self.max_length)) for i in order]
        kept = [(pair, example) for pair, example in encoded if example is not None]
        self.val = [example for _, example in kept[:n_val]]
        self.train = [example for _, example in kept[n_val:]]
        self.val_pairs = [pair for pair, _ in kept[:n_val]]  # what the validation examples ask and answer

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=self._collate,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self._collate)

    def _collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

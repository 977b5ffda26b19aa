"""The causal-LM recipe (examples/causal_lm.py): masked prompt labels, padded batches, and a short run that
exports folders PEFT, AutoPeftModelForCausalLM and vLLM's loader read, also from a model folder by name."""

import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from test_hydra_configs import ROOT, composed
from vllm_loader import read_with_vllm

from prompts import IGNORE, DEFAULT_DATA, char_tokenizer, collate, encode, read_examples  # examples/ is on sys.path
from causal_lm import run

SHORT = ["model.pretrain.epochs=2", "trainer.max_epochs=2", "generate.examples=4", "generate.max_new_tokens=8"]


def test_prompt_tokens_and_padding_are_masked_out_of_the_loss():
    tokenizer = char_tokenizer(["Uppercase: ab\nAB", "x"])
    short = encode(tokenizer, "{prompt}\n", "Uppercase: ab", "AB", max_length=64)
    prompt = len("Uppercase: ab\n")
    assert short["labels"][:prompt] == [IGNORE] * prompt  # the prompt and its template
    assert short["labels"][prompt:] == short["input_ids"][prompt:] == tokenizer("AB", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    longer = encode(tokenizer, "{prompt}\n", "Uppercase: abab", "ABAB", max_length=64)
    batch = collate([short, longer], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(longer["input_ids"]))
    padding = len(longer["input_ids"]) - len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * len(short["input_ids"]) + [0] * padding
    assert batch["labels"][0, -padding:].tolist() == [IGNORE] * padding
    assert encode(tokenizer, "{prompt}\n", "Uppercase: ab", "AB", max_length=prompt) is None  # nothing left to learn
    assert tokenizer.decode(short["input_ids"], skip_special_tokens=True) == "Uppercase: ab\nAB"


def test_bad_data_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 must have string 'prompt' and 'response' fields"):
        read_examples(bad)
    with pytest.raises(ValueError, match=r"data.tasks \['sort'\] are not in .*; its tasks are \['lowercase', 'repeat', 'reverse', 'uppercase'\]"):
        read_examples(DEFAULT_DATA, ["sort"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run from the command line, as the README gives it (the tiny base built in a temporary folder)."""
    root = tmp_path_factory.mktemp("causal_lm")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "causal_lm.py"), *SHORT, f"model.cache_dir={root / 'weights'}",
         f"hydra.run.dir={root / 'run'}"], cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return root, done.stdout + done.stderr


def test_a_short_run_trains_and_exports_what_peft_and_vllm_load(trained, monkeypatch):
    root, output = trained
    result = json.loads((root / "run" / "result.json").read_text())
    assert result["val_loss_after"] < result["val_loss_before"]
    assert result["val_perplexity_after"] == pytest.approx(torch.tensor(result["val_loss_after"]).exp().item(), rel=1e-4)
    for line in ("val/loss", "exact greedy answers to 4 validation prompts", "sample: 'Uppercase:", "PEFT adapter:", "vLLM adapter:"):
        assert line in output
    base = result["model"]
    assert base.startswith(str(root / "weights" / "tiny-llama-"))  # the folder it was loaded from
    config = json.loads((root / "run" / "peft" / "adapter_config.json").read_text())
    assert (config["task_type"], config["base_model_name_or_path"]) == ("CAUSAL_LM", base)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(root / "run" / "peft").eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    from lightning_lora import load_adapter

    load_adapter(ours, root / "run" / "adapter.lora.safetensors")
    tokens = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, ours(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)
    served = read_with_vllm(root / "run" / "vllm", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, monkeypatch)
    assert len(served) == 28  # 7 projections in each of 4 layers


def test_a_model_folder_by_name_through_the_hub_preset(trained, tmp_path):
    root, _ = trained
    folder = next((root / "weights").iterdir())
    result = run(composed(["causal_lm=hub", f"model.name={folder}", "trainer.accelerator=cpu", "+trainer.limit_train_batches=4",
                           "+trainer.limit_val_batches=2", "+trainer.enable_progress_bar=false", "data.max_length=64",
                           "generate.examples=2", "generate.max_new_tokens=4"], tmp_path, "causal_lm"))
    assert result["model"] == str(folder) and (tmp_path / "peft" / "adapter_config.json").exists()
    assert load_file_dtypes(tmp_path / "adapter.lora.safetensors") == {torch.float32}  # float32 adapters on bfloat16
    with pytest.raises(Exception, match=r"Missing mandatory value: model.name"):
        run(composed(["causal_lm=hub"], tmp_path / "none", "causal_lm"))


def load_file_dtypes(path):
    from safetensors.torch import load_file

    return {tensor.dtype for tensor in load_file(path).values()}

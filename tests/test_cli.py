"""The ``lightning-lora`` console script: every command in-process (``main([...])``), and once as the
installed executable. Models are tiny and built here; nothing is downloaded."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lora import LoRAConfig, apply_lora, load_adapter, lora_modules, merge_and_unload, save_adapter
from lightning_lora.formats.adapter_file import read_adapter
from lightning_lora.lightning.checkpoint import LoRACheckpointIO, adapter_path_for
from lightning_lora.cli import main

COMMANDS = ["inspect", "merge", "export-peft", "import-peft", "check"]


def run(capsys, *args):
    """``main(args)``: (exit status, stdout, stderr); argparse's exits become their status."""
    capsys.readouterr()  # what the test itself printed before (transformers' progress bars)
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err, *fragments):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-lora: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def randomize(model, scale=0.1):
    """Non-zero adapters (and trainable modules), as training would leave them."""
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            for param in adapter.matrix_B.parameters():
                param.normal_(0, scale)
        for name, param in model.named_parameters():
            if param.requires_grad and "matrix_" not in name:
                param.add_(torch.randn_like(param) * scale)


def snapshot(folder):
    """Name -> bytes of every file under ``folder`` (or of the one file)."""
    folder = Path(folder)
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- plain PyTorch models, merged at the state-dict level -------------------------------------------


class WithBuffer(nn.Module):
    """A layer with a floating-point buffer that a state dict cannot tell from a parameter."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.full((dim,), 2.0))

    def forward(self, x):
        return self.linear(x) * self.scale


def sequential():
    return nn.Sequential(
        nn.Embedding(16, 8),  # 0
        nn.Linear(8, 12),  # 1: with bias
        nn.Linear(12, 6, bias=False),  # 2: without
        nn.Conv2d(6, 8, 3, groups=2),  # 3: grouped
        nn.Linear(8, 3),  # 4: a new head, fully trainable
    )


def adapt_and_save(model, folder, config):
    """Save the base state dict, adapt, train (randomly), save the adapter file; returns the paths."""
    base = folder / "base.safetensors"
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, base)
    apply_lora(model, config)
    randomize(model)
    adapter = folder / "run.lora.safetensors"
    save_adapter(model, adapter)
    return base, adapter


@pytest.fixture
def plain(tmp_path):
    model = sequential()
    config = LoRAConfig(r=4, alpha=8, bias="auto", targets=["0", "1", "2", "3"], rank_pattern={"2": 2}, trainable=["4"])
    base, adapter = adapt_and_save(model, tmp_path, config)
    return model, base, adapter


def test_merge_of_a_state_dict_equals_merge_and_unload(plain, tmp_path, capsys):
    model, base, adapter = plain
    before = snapshot(base)
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out)
    assert (code, err) == (0, ""), err
    assert str(out) in stdout
    merged = load_file(out)
    expected = merge_and_unload(model).state_dict()
    assert sorted(merged) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(merged[key], tensor), key
    assert snapshot(base) == before
    # the merged file loads into the original architecture
    sequential().load_state_dict(merged, strict=True)


def test_merge_refuses_a_wrong_state_dict_base(plain, tmp_path, capsys):
    _, base, adapter = plain
    other = tmp_path / "other.safetensors"
    save_file(sequential().state_dict(), other)  # same architecture, other weights
    before = snapshot(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run(capsys, "merge", "--base", other, "--adapter", adapter, "--out", out)
    assert code == 1 and stdout == ""
    assert_one_error_line(err, str(other), "not the base", "fingerprint", "--no-check-base")
    assert snapshot(tmp_path) == before and not out.exists()
    code, _, err = run(capsys, "merge", "--base", other, "--adapter", adapter, "--out", out, "--no-check-base")
    assert code == 0 and out.exists()


def test_merge_of_a_state_dict_with_buffers(tmp_path, capsys):
    """BatchNorm statistics are recognised as buffers; a buffer of unknown kind makes the check
    impossible, which is refused with a message naming --no-check-base."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    base, adapter = adapt_and_save(model, tmp_path, LoRAConfig(targets=["0", "2"]))
    out = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out)
    assert (code, err) == (0, "")
    expected = merge_and_unload(model).state_dict()
    assert all(torch.equal(load_file(out)[k], v) for k, v in expected.items())

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), WithBuffer(8))
    folder = tmp_path / "buffer"
    folder.mkdir()
    base, adapter = adapt_and_save(model, folder, LoRAConfig(targets=["0", "2.linear"]))
    out = folder / "merged.safetensors"
    code, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out)
    assert code == 1 and not out.exists()
    assert_one_error_line(err, "cannot be checked exactly", "buffers", "--no-check-base")
    code, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out, "--no-check-base")
    assert (code, err) == (0, "")
    expected = merge_and_unload(model).state_dict()
    assert all(torch.equal(load_file(out)[k], v) for k, v in expected.items())


def test_merge_argument_errors(plain, tmp_path, capsys):
    _, base, adapter = plain
    out = tmp_path / "merged.safetensors"
    cases = [
        (["--base", tmp_path / "missing.safetensors", "--adapter", adapter], ["--base", "missing.safetensors", "does not exist"]),
        (["--base", base, "--adapter", tmp_path / "missing.lora.safetensors"], ["--adapter", "does not exist"]),
        (["--base", tmp_path, "--adapter", adapter], ["--base", "config.json", str(tmp_path)]),
        (["--base", adapter, "--adapter", base], ["--adapter", "not a lightning_lora adapter file"]),
    ]
    for arguments, fragments in cases:
        code, _, err = run(capsys, "merge", *arguments, "--out", out)
        assert code == 1, arguments
        assert_one_error_line(err, *fragments)
    code, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", base)
    assert code == 1
    assert_one_error_line(err, "--out", "--base")
    assert not out.exists()
    code, _, err = run(capsys, "merge", "--adapter", adapter, "--out", out)  # a usage error stays argparse's
    assert code == 2 and "--base" in err


# --- inspect ----------------------------------------------------------------------------------------


def test_inspect_an_adapter_file(plain, capsys):
    _, _, adapter = plain
    stored = read_adapter(adapter)
    code, out, err = run(capsys, "inspect", adapter)
    assert (code, err) == (0, "")
    assert f"base fingerprint: {stored.base_fingerprint[:12]}\n" in out
    assert f"library version: {stored.library_version}\n" in out
    assert "  r = 4\n" in out and "  alpha = 8.0\n" in out and "  rank_pattern = {'2': 2}\n" in out
    assert "adapted modules (4):" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ") and "=" not in line.split()[0]}
    assert "adapter settings: kind=linear r=4 alpha=8.0 " in out  # the most common values ...
    assert "kind=embedding" in lines["0"] and "kind=conv" in lines["3"]  # ... and where modules differ
    assert "r=2" in lines["2"] and not any(item.startswith(("r=", "alpha=")) for n in "013" for item in lines[n])
    assert ("bias=True" in lines["1"]) != ("bias=False" in lines["2"])  # two with a bias, two without
    params = sum(t.numel() for t in stored.tensors.values())
    size = sum(t.numel() * t.element_size() for t in stored.tensors.values())
    assert f"parameters: {params:,}" in out and f"bytes: {size:,}" in out
    assert "trainable modules (1): 4" in out


def test_bad_paths_are_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nothing.lora.safetensors"
    code, out, err = run(capsys, "inspect", missing)
    assert code == 1 and out == ""
    assert_one_error_line(err, "PATH", str(missing), "does not exist", "adapter file")
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 1
    assert_one_error_line(err, str(tmp_path), "adapter_config.json")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint\nat all\n")
    code, _, err = run(capsys, "check", garbage)  # torch.load's own error is many lines long
    assert code == 1
    assert_one_error_line(err, "CKPT", str(garbage))
    code, _, err = run(capsys, "check", tmp_path / "missing.ckpt")
    assert code == 1
    assert_one_error_line(err, "CKPT", "missing.ckpt", "does not exist")


# --- check ------------------------------------------------------------------------------------------


def test_check_a_pair_and_a_stale_pair(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    apply_lora(model, LoRAConfig(targets=["0"]))
    io = LoRACheckpointIO(TorchCheckpointIO(), lambda: model)
    first, second = tmp_path / "epoch=0-step=3.ckpt", tmp_path / "epoch=0-step=4.ckpt"
    io.save_checkpoint({"state_dict": model.state_dict(), "epoch": 0, "global_step": 3}, first)
    randomize(model)
    io.save_checkpoint({"state_dict": model.state_dict(), "epoch": 0, "global_step": 4}, second)
    code, out, err = run(capsys, "check", first)
    assert (code, err) == (0, "")
    assert out == f"ok: {first} and {adapter_path_for(str(first))} belong together; every file matches its digest\n"
    shutil.copyfile(adapter_path_for(str(second)), adapter_path_for(str(first)))  # a stale companion
    code, out, err = run(capsys, "check", first)
    assert code == 1 and out == ""
    assert_one_error_line(err, "does not match the digests its companion", "belongs to another checkpoint", str(first))
    os.remove(adapter_path_for(str(first)))
    code, _, err = run(capsys, "check", first)
    assert code == 1
    assert_one_error_line(err, "no companion")


def test_check_of_an_adapter_file_and_inspect_of_a_checkpoint(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    apply_lora(model, LoRAConfig(r=2, targets=["0"], trainable=["2"]))
    io = LoRACheckpointIO(TorchCheckpointIO(), lambda: model)
    ckpt = tmp_path / "epoch=1-step=7.ckpt"
    io.save_checkpoint({"state_dict": model.state_dict(), "epoch": 1, "global_step": 7}, ckpt)
    companion = adapter_path_for(str(ckpt))
    code, out, err = run(capsys, "check", companion)
    assert code == 1 and out == ""
    assert_one_error_line(err, "CKPT must be a Lightning checkpoint (.ckpt)", "an adapter file", "'lightning-lora inspect' shows")
    code, out, err = run(capsys, "inspect", ckpt)
    assert (code, err) == (0, "")
    assert f"Lightning checkpoint: {ckpt}\nstep: epoch=1 global_step=7\n" in out
    assert "LoRA record: version 2, 1 adapted modules, trainable modules: 2\n" in out
    assert "base weights left out: 2 (filled from the base model on load" in out  # layer 0's weight and bias
    assert f"companion adapter file: {companion} (belongs to it)\n" in out
    os.remove(companion)
    code, out, _ = run(capsys, "inspect", ckpt)
    assert code == 0 and f"companion adapter file: {companion} (missing; lightning_lora.write_companion regenerates it)" in out


@pytest.mark.parametrize("argv, status, fragments", [
    (["inspect", "{tmp}/x.bin"], 1, ["PATH must be an adapter file", "which does not exist"]),
    (["inspect", "{junk}"], 1, ["PATH must be an adapter file", "is truncated or not a safetensors file"]),
    (["check", "{junk}"], 1, ["CKPT must be a Lightning checkpoint (.ckpt)", "not a zip archive"]),
    (["check", "{tmp}"], 1, ["CKPT must be a Lightning checkpoint (.ckpt, or a sharded checkpoint's folder)", "a folder without meta.pt"]),
    (["merge", "--base", "{junk}", "--adapter", "{junk}", "--out", "{tmp}/o.safetensors"], 1, ["--adapter must be an adapter file"]),
    (["merge", "--base", "{tmp}/none.safetensors", "--adapter", "{junk}", "--out", "{tmp}/o"], 1, ["--base must be a .safetensors", "which does not exist"]),
    (["merge", "--base", "{junk}", "--adapter", "{junk}", "--out", "{tmp}/o", "--dtype", "int8"], 2, ["argument --dtype: invalid choice: 'int8'"]),
    (["export-peft", "{junk}", "{tmp}/peft"], 1, ["ADAPTER must be an adapter file", "is truncated or not a safetensors file"]),
    (["export-peft", "{tmp}", "{tmp}/peft"], 1, ["ADAPTER must be an adapter file", "a folder"]),
    (["import-peft", "{tmp}", "{tmp}/a.lora.safetensors", "--base", "{tmp}"], 1, ["PEFT_DIR must be a PEFT adapter folder"]),
    (["nothing"], 2, ["argument COMMAND: invalid choice: 'nothing'"]),
])
def test_every_misuse_is_one_line(argv, status, fragments, tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01")
    code, out, err = run(capsys, *[arg.format(tmp=tmp_path, junk=junk) for arg in argv])
    assert (code, out) == (status, "")
    lines = err.strip().splitlines()
    assert "Traceback" not in err and all(fragment in lines[-1] for fragment in fragments), err
    if status == 1:
        assert_one_error_line(err)


# --- Hugging Face models ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, the same model adapted, and its adapter file."""
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder / "base")
    apply_lora(model, LoRAConfig(r=4, alpha=8, rank_pattern={"v_proj": 2}))
    randomize(model)
    save_adapter(model, folder / "run.lora.safetensors")
    return transformers, model, folder / "base", folder / "run.lora.safetensors"


TOKENS = torch.arange(12).reshape(2, 6) % 64


def test_merge_of_a_hugging_face_folder_gives_the_adapted_logits(llama, tmp_path, capsys):
    transformers, model, base, adapter = llama
    before = snapshot(base)
    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out)
    assert (code, err) == (0, ""), err
    assert str(out) in stdout
    merged = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not lora_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=0)
    assert snapshot(base) == before


def test_merge_keeps_the_base_dtype_unless_told(llama, tmp_path, capsys):
    transformers, model, _, _ = llama
    bf16 = tmp_path / "bf16"
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(model.config).to(torch.bfloat16).save_pretrained(bf16)  # a bfloat16 checkpoint
    trained = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)  # as one trains on it
    apply_lora(trained, LoRAConfig(r=4, alpha=8))
    randomize(trained, scale=0.5)
    save_adapter(trained, tmp_path / "a.lora.safetensors")
    expected = {k: v.to(torch.bfloat16) for k, v in merge_and_unload(copy.deepcopy(trained)).state_dict().items()}
    code, stdout, err = run(capsys, "merge", "--base", bf16, "--adapter", tmp_path / "a.lora.safetensors", "--out", tmp_path / "m")
    assert (code, err) == (0, ""), err
    assert stdout.endswith("(bfloat16)\n") and json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}  # half the bytes of float32
    assert all(torch.equal(merged[k], expected[k]) for k in merged)  # merged in float32, rounded once
    code, stdout, err = run(capsys, "merge", "--base", bf16, "--adapter", tmp_path / "a.lora.safetensors",
                            "--out", tmp_path / "m32", "--dtype", "float32")
    assert code == 0 and stdout.endswith("(float32)\n")
    assert {t.dtype for t in load_file(tmp_path / "m32" / "model.safetensors").values()} == {torch.float32}
    state = tmp_path / "bf16.safetensors"  # a plain state dict keeps each tensor's dtype
    save_file(load_file(bf16 / "model.safetensors"), state)
    code, stdout, err = run(capsys, "merge", "--base", state, "--adapter", tmp_path / "a.lora.safetensors", "--out", tmp_path / "m.safetensors")
    assert (code, err) == (0, "") and stdout.endswith("(bfloat16)\n")
    plain = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(plain[k], merged[k]) for k in merged)


def test_merge_refuses_a_wrong_hugging_face_base(llama, tmp_path, capsys):
    transformers, model, _, adapter = llama
    other = tmp_path / "other"
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(model.config).save_pretrained(other)
    before = snapshot(other)
    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", "--base", other, "--adapter", adapter, "--out", out)
    assert code == 1 and stdout == ""
    assert_one_error_line(err, "--base", str(other), "different base weights", "fingerprint", "--no-check-base")
    assert snapshot(other) == before and not out.exists()


def test_merge_of_gpt2_weights_as_a_plain_state_dict(tmp_path, capsys):
    """transformers' Conv1D layers (weight stored (in, out)) merge at the state-dict level too; the
    tied output layer, left out of model.safetensors, does not disturb the fingerprint check."""
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    randomize(model)
    save_adapter(model, tmp_path / "run.lora.safetensors")
    stored = load_file(tmp_path / "base" / "model.safetensors")
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", tmp_path / "base" / "model.safetensors", "--adapter", tmp_path / "run.lora.safetensors"]
    code, _, err = run(capsys, *args, "--out", out)
    assert (code, err) == (0, ""), err
    merged = load_file(out)
    expected = merge_and_unload(model).state_dict()
    assert sorted(merged) == sorted(stored)
    for key, tensor in merged.items():
        assert torch.equal(tensor, expected[key]), key
    assert any(not torch.equal(merged[key], stored[key]) for key in merged if "c_attn" in key)


def test_merge_of_a_wrapper_state_dict_and_of_the_bare_model(llama, tmp_path, capsys):
    """An adapter saved from a wrapper (names relative to its transformers model) merges into the
    wrapper's state dict and into the bare model's weights alike."""
    transformers, model, base, _ = llama
    wrapper = nn.Module()
    wrapper.model = transformers.LlamaForCausalLM.from_pretrained(base, local_files_only=True)
    wrapper.head = nn.Linear(32, 2)
    save_file({k: v.clone() for k, v in wrapper.state_dict().items()}, tmp_path / "wrapper.safetensors")
    apply_lora(wrapper, LoRAConfig(targets=["q_proj", "v_proj"]))
    randomize(wrapper)
    save_adapter(wrapper, tmp_path / "run.lora.safetensors")
    expected = merge_and_unload(wrapper).state_dict()
    for source, prefix in ((tmp_path / "wrapper.safetensors", ""), (base / "model.safetensors", "model.")):
        out = tmp_path / "merged.safetensors"
        code, _, err = run(capsys, "merge", "--base", source, "--adapter", tmp_path / "run.lora.safetensors", "--out", out, "--force")
        assert (code, err) == (0, ""), err  # the second replaces the first: --force
        merged = load_file(out)
        assert all(torch.equal(tensor, expected[prefix + key]) for key, tensor in merged.items())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft's use of transformers, not the CLI's
def test_inspect_a_peft_folder(llama, tmp_path, capsys):
    transformers, model, base, _ = llama
    fresh = transformers.LlamaForCausalLM.from_pretrained(base, local_files_only=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    peft.get_peft_model(fresh, config).save_pretrained(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    code, out, err = run(capsys, "inspect", tmp_path / "peft")
    assert (code, err) == (0, ""), err
    assert "  r = 4\n" in out and "  lora_alpha = 8\n" in out and "  rank_pattern = {'v_proj': 2}\n" in out
    assert "  use_rslora = False\n" in out and "  modules_to_save = None\n" in out
    assert "target_modules = " in out and "q_proj" in out and "lora_bias = " in out and "alpha_pattern = {}" in out
    count = sum(t.numel() for t in tensors.values())
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    assert f"tensors: {len(tensors)}, parameters: {count:,}, bytes: {size:,}\n" in out


def test_export_and_import_peft_round_trip(llama, tmp_path, capsys):
    transformers, model, base, adapter = llama
    peft_dir = tmp_path / "peft"
    code, out, err = run(capsys, "export-peft", adapter, peft_dir, "--base-model-name-or-path", "tiny-llama")
    assert (code, err) == (0, ""), err
    assert (peft_dir / "adapter_config.json").is_file() and (peft_dir / "adapter_model.safetensors").is_file()
    code, out, err = run(capsys, "inspect", peft_dir)
    assert code == 0 and "base_model_name_or_path: tiny-llama" in out and "  r = 4\n" in out
    assert json.loads((peft_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"  # recorded in the file
    code, _, _ = run(capsys, "export-peft", adapter, tmp_path / "features", "--task-type", "FEATURE_EXTRACTION")
    assert code == 0 and json.loads((tmp_path / "features" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    back = tmp_path / "back.lora.safetensors"
    code, out, err = run(capsys, "import-peft", peft_dir, back, "--base", base)
    assert (code, err) == (0, ""), err
    assert str(back) in out
    fresh = transformers.LlamaForCausalLM.from_pretrained(base, local_files_only=True).eval()
    load_adapter(fresh, back)  # the fingerprint is that of --base, the model it was trained on
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=0)
    code, _, err = run(capsys, "export-peft", adapter, tmp_path / "vllm", "--target", "vllm")
    assert (code, err) == (0, ""), err


def test_peft_command_errors(llama, tmp_path, capsys):
    _, _, base, adapter = llama
    code, _, err = run(capsys, "export-peft", tmp_path / "missing.lora.safetensors", tmp_path / "out")
    assert code == 1
    assert_one_error_line(err, "ADAPTER", "does not exist")
    code, _, err = run(capsys, "import-peft", tmp_path / "nowhere", tmp_path / "a.lora.safetensors", "--base", base)
    assert code == 1
    assert_one_error_line(err, "PEFT_DIR", "does not exist")
    code, _, err = run(capsys, "import-peft", tmp_path, tmp_path / "a.lora.safetensors", "--base", base)
    assert code == 1
    assert_one_error_line(err, "PEFT_DIR", str(tmp_path), "without adapter_config.json")
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    (peft_dir / "adapter_model.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "import-peft", peft_dir, tmp_path / "a.lora.safetensors", "--base", adapter)
    assert code == 1
    assert_one_error_line(err, "--base", "Hugging Face model folder")
    code, _, err = run(capsys, "export-peft", adapter, tmp_path / "out", "--target", "tgi")
    assert code == 2 and "--target" in err


# --- help -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], *[[name] for name in COMMANDS]])
def test_help_of_every_command(command, capsys):
    code, out, err = run(capsys, *command, "--help")
    assert code == 0 and err == ""
    assert out.startswith(f"usage: lightning-lora {' '.join(command)}".rstrip())
    if not command:
        assert all(name in out for name in COMMANDS)


def test_the_console_script_is_installed():
    script = shutil.which("lightning-lora", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert script is not None, "pip install -e . installs the lightning-lora command"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lightning-lora")

"""Exports and the command line's outputs: published whole, never over their own inputs, replaced on request.

``export_peft`` writes a folder beside the destination and renames it into place: a full disk or a
kill leaves the old export or none, never a mix (30 kills of a process exporting two adapters in
turn into one folder; a kill leaves at most hidden ``.<name>.*.tmp`` or ``.old`` folders beside it,
which nothing reads). The command line refuses an output that is an input, and replaces an
existing one only with ``--force``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_cli import run
from torch import nn

import lightning_lora.formats.files as files_module
from lightning_lora import LoRAConfig, apply_lora, export_peft, lora_modules, save_adapter


def adapted(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    apply_lora(model, LoRAConfig(r=2, targets=["0", "2"]))
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            adapter.matrix_B.weight.normal_()
    return model


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))} if folder.exists() else None


@pytest.mark.parametrize(
    ("out_dir", "error", "message"),
    [
        ("", ValueError, r"out_dir must be a folder path, got ''"),
        ("  ", ValueError, r"out_dir must be a folder path, got '  '"),
        (None, TypeError, r"out_dir must be a folder path \(str or os.PathLike\), got None \(NoneType\)"),
        (123, TypeError, r"out_dir must be a folder path \(str or os.PathLike\), got 123 \(int\)"),
        (torch.zeros(1), TypeError, r"out_dir must be a folder path \(str or os.PathLike\), got tensor\(\[0.\]\) \(Tensor\)"),
    ],
)
def test_a_destination_that_is_no_path_is_refused_and_nothing_is_written(out_dir, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        export_peft(adapted(0), out_dir)
    assert os.listdir(tmp_path) == []


def test_a_previous_export_is_replaced_whole_and_other_folders_need_overwrite(tmp_path):
    folder = tmp_path / "peft"
    export_peft(adapted(0), folder)
    first = snapshot(folder)
    (folder / "README.md").write_text("PEFT writes one too")
    export_peft(adapted(1), folder)  # a previous export: replaced, as a whole
    assert snapshot(folder).keys() == first.keys() and snapshot(folder) != first
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"out_dir .*peft' holds files that are not a PEFT export \(\['notes.txt'\]\); .*overwrite=True"):
        export_peft(adapted(2), folder)
    assert snapshot(folder) == before
    export_peft(adapted(2), folder, overwrite=True)
    assert set(snapshot(folder)) == {"adapter_config.json", "adapter_model.safetensors"}
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        export_peft(adapted(2), folder / "adapter_config.json")
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no staging left behind


def test_an_export_never_replaces_the_adapter_file_it_exports_from(tmp_path):
    save_adapter(adapted(0), tmp_path / "run.lora.safetensors")
    before = snapshot(tmp_path)
    for out_dir in (tmp_path, tmp_path / "run.lora.safetensors"):
        with pytest.raises(ValueError, match=r"holds the adapter file exported from .*: choose another folder"):
            export_peft(tmp_path / "run.lora.safetensors", out_dir, overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_full_disk_leaves_the_old_export(tmp_path, monkeypatch):
    folder = tmp_path / "peft"
    export_peft(adapted(0), folder)
    before = snapshot(folder)
    calls = []

    def full(fd):  # the second file's flush fails, as on a full disk
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        export_peft(adapted(1), folder)
    assert snapshot(folder) == before and sorted(os.listdir(tmp_path)) == ["peft"]


KILLS = """
import json, os, random, signal, sys, time, torch
from safetensors.torch import load_file
from torch import nn
from lightning_lora import LoRAConfig, apply_lora, export_peft, lora_modules
models = []
for seed, r in ((0, 8), (1, 4)):  # two adapters of other ranks: a config with the other's weights shows
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    apply_lora(model, LoRAConfig(r=r, targets=["0", "2"]))
    for adapter in lora_modules(model).values():
        torch.nn.init.normal_(adapter.matrix_B.weight)
    models.append(model)
folder, rng, found = sys.argv[1], random.Random(0), []
for trial in range(30):
    pid = os.fork()
    if pid == 0:  # the exporting process: the two adapters in turn, until it is killed
        i = 0
        while True:
            export_peft(models[i % 2], folder)
            i += 1
    time.sleep(rng.uniform(0.005, 0.1))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if not os.path.exists(folder):  # killed between the two renames: none under the name
        found.append(None)
        continue
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    ranks = sorted({t.shape[0] for key, t in weights.items() if "lora_A" in key})
    found.append([sorted(os.listdir(folder)), config["r"], ranks, len(weights)])
print(json.dumps(found))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked exporting processes")
def test_kills_during_exports_leave_one_whole_export(tmp_path):
    script = tmp_path / "kills.py"
    script.write_text(KILLS)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "peft")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == 30
    whole = [f for f in found if f is not None]
    for names, r, ranks, tensors in whole:  # a whole export: its config with its weights, nothing else
        assert names == ["adapter_config.json", "adapter_model.safetensors"] and ranks == [r] and tensors == 4
    assert {r for _, r, _, _ in whole} == {4, 8}  # both adapters were caught whole


def test_the_command_line_never_writes_over_an_input_and_replaces_only_with_force(tmp_path, capsys):
    from safetensors.torch import save_file

    model = adapted(0)
    save_adapter(model, tmp_path / "run.lora.safetensors")
    base = {key.replace(".original_module", ""): value for key, value in model.state_dict().items() if "matrix_" not in key}
    save_file(base, tmp_path / "base.safetensors")
    before = snapshot(tmp_path)
    merge = ["merge", "--base", tmp_path / "base.safetensors", "--adapter", tmp_path / "run.lora.safetensors"]
    for out, fragment in (
        (tmp_path / "run.lora.safetensors", "--out must be apart from --adapter (an input is never an output)"),
        (tmp_path / "base.safetensors", "--out must be apart from --base"),
    ):
        code, _, err = run(capsys, *merge, "--out", out, "--force")
        assert code == 1 and fragment in err and len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before
    assert run(capsys, *merge, "--out", tmp_path / "merged.safetensors")[0] == 0
    code, _, err = run(capsys, *merge, "--out", tmp_path / "merged.safetensors")
    assert code == 1 and "--out" in err and "exists; pass --force to replace it" in err
    assert run(capsys, *merge, "--out", tmp_path / "merged.safetensors", "--force")[0] == 0

    export = ["export-peft", tmp_path / "run.lora.safetensors"]
    code, _, err = run(capsys, *export, tmp_path, "--force")
    assert code == 1 and "OUT_DIR must be apart from ADAPTER" in err
    assert run(capsys, *export, tmp_path / "peft")[0] == 0
    code, _, err = run(capsys, *export, tmp_path / "peft")
    assert code == 1 and "OUT_DIR" in err and "exists; pass --force to replace it" in err
    assert run(capsys, *export, tmp_path / "peft", "--force")[0] == 0

    code, _, err = run(capsys, "import-peft", tmp_path / "peft", tmp_path / "peft" / "adapter_model.safetensors", "--base", tmp_path)
    assert code == 1 and "OUT must be apart from PEFT_DIR" in err
    help_text = " ".join(run(capsys, "--help")[1].split())
    assert "replaced only with --force" in help_text and "No input is ever an output" in help_text

"""Smoke tests of the benchmark scripts on a tiny model: tables, JSON, checks and the report."""

import argparse
import importlib
import importlib.util
import json
import multiprocessing
import sys
from pathlib import Path

import pytest
from conftest import launch_environment
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["--layers", "1", "--hidden", "32", "--ffn", "64", "--heads", "4", "--vocab", "50", "--batch", "2",
        "--seq-len", "8", "--r", "4", "--steps", "2", "--warmup", "1"]


def _load(name: str):
    """A benchmark script as a module (they are scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    if name in ("common", "report"):
        return importlib.import_module(name)  # the very modules the scripts import
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_step_prints_the_table_and_writes_json(tmp_path, capsys):
    step = _load("step")
    path = tmp_path / "step.json"
    step.main([*TINY, "--no-memory", "--targets", "query,value", "--json", str(path)])
    printed = capsys.readouterr().out
    payload = json.loads(path.read_text())
    kinds = [row["variant"] for row in payload["rows"]]
    assert kinds == ["floor", "full_ft", "lightning_lora", "lightning_lora_dora", "peft", "peft_dora", "reference"]
    assert payload["rows"][0]["vs_floor"] == 1.0
    assert all(row["ms"] > 0 and len(row["times_ms"]) == 2 for row in payload["rows"])
    numerics = payload["numerics"]["query,value"]
    assert numerics["ok"] and len(numerics["adapted"]) == 2
    assert "| floor (frozen, input grads only) |" in printed and "lightning-lora vs the reference" in printed
    ours = next(row for row in payload["rows"] if row["variant"] == "lightning_lora")
    assert ours["vs_peft"] > 0 and "numerics" in printed.lower()
    assert payload["dora_numerics"]["query,value"]["ok"] and "lightning-lora DoRA vs PEFT DoRA" in printed
    costs = payload["dora"]["query,value"]
    dora = {row["variant"]: row["ms"] for row in payload["rows"]}
    assert costs["lightning_lora"]["ratio"] == dora["lightning_lora_dora"] / dora["lightning_lora"]
    assert costs["peft"]["ratio"] == dora["peft_dora"] / dora["peft"]
    assert "DoRA step / LoRA step [query,value]: lightning-lora **" in printed


def test_step_on_the_moe_model_times_expert_adapters_against_peft(tmp_path, capsys):
    step = _load("step")
    path = tmp_path / "moe.json"
    step.main([*TINY, "--model", "moe", "--experts", "4", "--no-memory", "--json", str(path)])
    printed = capsys.readouterr().out
    payload = json.loads(path.read_text())
    assert [row["variant"] for row in payload["rows"]] == ["floor", "full_ft", "lightning_lora", "peft"]
    numerics = payload["numerics"]["attention+experts"]
    assert numerics["ok"] and len(numerics["adapted"]) == 4 and "lightning-lora vs PEFT" in printed
    rows = {row["variant"]: row for row in payload["rows"]}
    ratio = rows["lightning_lora"]["ms"] / rows["peft"]["ms"]
    assert f"lightning-lora / PEFT [attention+experts]: step time **{ratio:.3f}**" in printed


def test_step_on_the_moe_model_stops_when_the_experts_compute_something_else(monkeypatch):
    import lightning_lora.adapters.experts as experts_module

    step = _load("step")
    grouped = experts_module._grouped
    monkeypatch.setattr(experts_module, "_grouped", lambda x, w, offsets: 1.01 * grouped(x, w, offsets))
    with pytest.raises(SystemExit, match="lightning-lora's outputs or gradients differ from PEFT's beyond tolerance"):
        step.main([*TINY, "--model", "moe", "--experts", "4", "--no-memory"])


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh_interpreter"])
def test_step_memory_runs_in_a_process_per_variant(fork, monkeypatch):
    step = _load("step")
    common = _load("common")
    parser = argparse.ArgumentParser()
    common.add_arguments(parser)
    setting = common.setting_from_args(parser.parse_args([*TINY, "--targets", "query"]))
    if not fork:
        monkeypatch.setattr(step.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    runs = step.MemoryRuns(setting, with_peft=False)
    assert bool(runs._waiting) == (fork and "fork" in multiprocessing.get_all_start_methods())
    expected = {"floor", "full_ft", "lightning_lora[query]", "lightning_lora_dora[query]", "reference[query]"}
    if not runs._waiting:
        runs.specs = [("lightning_lora", "query")]  # one interpreter start is slow enough for a smoke test
        expected = {"lightning_lora[query]"}
    peaks = runs.measure()
    assert set(peaks) == expected and all(peak > 0 for peak in peaks.values())


def test_step_stops_when_the_adapter_computes_something_else(monkeypatch):
    step = _load("step")
    import lightning_lora.adapters.linear as layers

    fused = layers.lora_linear
    monkeypatch.setattr(layers, "lora_linear", lambda *args: fused(*args[:-2], 2 * args[-2], args[-1]))
    with pytest.raises(SystemExit, match="differ from the reference LoRA beyond tolerance"):
        step.main([*TINY, "--no-memory", "--no-peft"])


def test_step_stops_when_dora_computes_something_else(monkeypatch):
    step = _load("step")
    import lightning_lora.adapters.dora as layers

    fused = layers.dora_linear
    monkeypatch.setattr(layers, "dora_linear", lambda *args: fused(*args[:-1], 2 * args[-1]))
    with pytest.raises(SystemExit, match="lightning-lora DoRA's outputs or gradients differ from PEFT DoRA's"):
        step.main([*TINY, "--no-memory"])


def test_inference_checks_merged_against_unmerged(tmp_path, capsys):
    inference = _load("inference")
    path = tmp_path / "inference.json"
    inference.main([*TINY, "--no-peft", "--json", str(path)])
    payload = json.loads(path.read_text())
    assert [row["variant"] for row in payload["rows"]] == ["base", "lightning_lora", "merged", "reference"]
    numerics = next(iter(payload["numerics"].values()))
    assert numerics["ok"] and numerics["adapters_change_output"] > 10 * numerics["merged_vs_unmerged"]
    assert "| lightning-lora merged, query,value |" in capsys.readouterr().out


def test_callback_overhead_times_steps_and_hooks(tmp_path, capsys):
    callback_overhead = _load("callback_overhead")
    path = tmp_path / "callback.json"
    callback_overhead.main([*TINY, "--repeats", "1", "--json", str(path)])
    payload = json.loads(path.read_text())
    assert len(payload["times_ms"]["with"]) == len(payload["times_ms"]["without"]) == 2
    assert payload["ratio"] > 0 and 0 < payload["hook_ms"] < payload["ms_with"]
    assert "inside the callback's hooks" in capsys.readouterr().out


def test_checkpoint_digests_digest_each_byte_once_and_verify(tmp_path, capsys):
    digests = _load("checkpoint_digests")
    path = tmp_path / "digests.json"
    digests.main(["--gib", "0.01", "--repeats", "1", "--json", str(path)])
    payload = json.loads(path.read_text())
    assert payload["digested_per_written"] == 1.0 and payload["bytes"] > 0.01 * 2**30
    assert 0 < payload["ms"]["digest"] < payload["ms"]["save"] and payload["verify_gib_s"] > 0
    assert "bytes digested per byte written **1.000**" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        digests.main(["--gib", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs the qlora extra (torchao)")
def test_callback_setup_times_this_version_against_a_baseline_side_by_side(tmp_path, capsys):
    callback_overhead = _load("callback_overhead")
    path = tmp_path / "setup.json"
    root = Path(__file__).resolve().parents[1]
    callback_overhead.main([*TINY, "--setup", "--setup-layers", "2", "--repeats", "1", "--saves", "1",
                            "--baseline", str(root), "--json", str(path)])
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "callback_setup" and payload["setting"]["layers"] == 2
    assert set(payload["ms"]) == {"baseline", "this"} and all(v > 0 for side in payload["ms"].values() for v in side.values())
    assert set(payload["packages"].values()) == {str(root / "lightning_lora")}
    assert "| this / baseline |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        callback_overhead.main([*TINY, "--setup", "--baseline", str(tmp_path)])


def test_qlora_prints_memory_and_step_time_side_by_side(tmp_path, capsys):
    qlora = _load("qlora")
    path = tmp_path / "qlora.json"
    qlora.main([*TINY, "--json", str(path)])
    printed = capsys.readouterr().out
    payload = json.loads(path.read_text())
    sizes = payload["bytes"]
    assert sizes["quantized_layers"] == 5  # 6 linear layers, the last one left out as the output layer
    assert sizes["float16"] / sizes["nf4"] > 3 and sizes["all_base_nf4"] < sizes["all_base_unquantized"]
    assert all(payload["peak_mib"][v] > 0 and payload["ms"][v] > 0 for v in ("unquantized", "nf4"))
    assert payload["error"] < 1e-4 and "| quantized weights vs float16 |" in printed and ": ok" in printed


def test_gpu_preset_without_cuda_exits_with_a_clear_message():
    step = _load("step")
    with pytest.raises(SystemExit, match=r"torch.cuda.is_available\(\) is False.*use --preset cpu"):
        step.main(["--preset", "gpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_preset_runs_on_a_tiny_llama(tmp_path):
    step = _load("step")
    path = tmp_path / "gpu.json"
    step.main(["--preset", "gpu", *TINY, "--no-memory", "--json", str(path)])
    payload = json.loads(path.read_text())
    assert set(payload["numerics"]) == {"attention", "all linears"}
    assert all(n["ok"] for n in payload["numerics"].values())


def test_report_renders_and_rewrites_the_readme_section(tmp_path):
    report = _load("report")
    step = _load("step")
    results = tmp_path / "results"
    step.main([*TINY, "--no-memory", "--no-peft", "--json", str(results / "cpu-step.json")])
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{report.START}\nold\n{report.END}\n\nafter\n")
    report.main([str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.startswith("# Title") and text.endswith(f"{report.END}\n\nafter\n")
    assert "#### Preset `cpu`" in text and "| plain reference LoRA, query,value |" in text

    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="must contain the lines '<!-- perf:start -->' and then"):
        report.main([str(results), "--readme", str(readme)])
    with pytest.raises(SystemExit, match="does not exist"):
        report.main([str(tmp_path / "missing")])


def test_communication_prints_payloads_per_strategy(tmp_path, capsys):
    communication = _load("communication")
    path = tmp_path / "communication.json"
    communication.main(["--layers", "1", "--hidden", "32", "--ffn", "64", "--heads", "4", "--vocab", "50", "--r", "4",
                        "--targets", "q_proj,v_proj", "--shard-size", "4", "--json", str(path)])
    printed = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in printed if line.startswith("| q_proj")]
    hsdp, across = "HSDP, shard groups of 4", "HSDP, across nodes (in the row above)"
    assert [row[2] for row in rows] == ["DDP", "FSDP2", hsdp, across]
    # bfloat16 weights (the gpu preset), so 2 bytes per parameter and per gradient
    base = 50 * 32 + 32 + 4 * 32 * 32 + 32 + 3 * 32 * 64 + 32  # embedding, norms, q/k/v/o, gate/up/down, final norm
    trainable = 2 * (32 * 4 + 4 * 32)  # A and B of two 32 x 32 projections
    lora = {"DDP": 2 * trainable, "FSDP2": 2 * 2 * (base + trainable) + 2 * trainable}
    lora[hsdp], lora[across] = lora["FSDP2"] + 2 * trainable / 4, 2 * trainable / 4
    full = {"DDP": 2 * base, "FSDP2": 2 * 2 * base + 2 * base}
    full[hsdp], full[across] = full["FSDP2"] + 2 * base / 4, 2 * base / 4
    assert all(row[1] == f"{trainable:,}" for row in rows)
    assert [float(row[5]) for row in rows] == [round(lora[row[2]] / full[row[2]], 4) for row in rows]
    assert float(rows[0][5]) < 0.2 and float(rows[1][5]) > float(rows[0][5])  # FSDP2 still gathers the frozen base

    payload = json.loads(path.read_text())
    assert printed[0] == f"model: {payload['model']}" and payload["parameters"] == base
    assert payload["shard_size"] == 4 and len(payload["rows"]) == len(rows)
    for row, stored in zip(rows, payload["rows"]):
        assert stored["lora_bytes"] == lora[row[2]] and stored["full_bytes"] == full[row[2]]
        assert row == [f"{stored['targets']} (r={stored['r']})", f"{stored['trainable']:,}", stored["strategy"],
                       f"{stored['lora_bytes'] / 2**20:,.2f}", f"{stored['full_bytes'] / 2**20:,.2f}",
                       f"{stored['ratio']:.4f}"]
    with pytest.raises(SystemExit, match="--shard-size must be at least 2"):
        communication.main(["--shard-size", "1"])


GPU_FSDP2_CHECKS = [
    "meta init: every matrix_B is zero",
    "meta init: every matrix_A is not",
    "meta init: the adapted model computes what the base does",
    "mixed precision: forward in torch.bfloat16, adapter gradients in torch.float32",
    "LoRA trains",
    "adapters after training are the same on every rank (2 ranks",
    "adapters equal a one-rank run of the same global batch",
    "Lightning, 2 ranks: a sharded checkpoint folder every epoch",
    "Lightning: the companion adapter file holds whole tensors",
    "Lightning: resume on 2 ranks continues the run",
    "Lightning: the companion loads into a one-rank model, exactly the adapters of that epoch",
    "Lightning: the 2-rank sharded checkpoint resumes on one rank (2 -> 1)",
    "Lightning: a one-rank checkpoint resumes on 2 ranks (1 -> 2)",
]


def _gpu_fsdp2_dry_run(tmp_path, **env):
    """``benchmarks/gpu_fsdp2.py --device cpu`` on 2 gloo processes under torchrun (a free port: --standalone)."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(BENCHMARKS / "gpu_fsdp2.py"), "--device", "cpu", "--steps", "2",
               "--json", str(tmp_path / "fsdp2.json")]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240,
                          env={**launch_environment(), **env})
    checks = [line for line in done.stdout.splitlines() if line.startswith(("ok  ", "FAIL"))]
    return done, checks


def test_gpu_fsdp2_script_skips_without_cuda_and_its_cpu_dry_run_passes(tmp_path):
    import subprocess

    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_fsdp2.py")], check=False, capture_output=True,
                              text=True, timeout=120, env=launch_environment())
        assert done.returncode == 0 and done.stdout.startswith("skipped: no CUDA device"), done.stderr[-2000:]
    done, checks = _gpu_fsdp2_dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(checks) == len(GPU_FSDP2_CHECKS), checks
    for line, expected in zip(checks, GPU_FSDP2_CHECKS):
        assert line.startswith(f"ok   {expected}"), (line, expected)
    assert "all 13 checks passed" in done.stdout
    payload = json.loads((tmp_path / "fsdp2.json").read_text())
    assert payload["world_size"] == 2 and [row["rank"] for row in payload["rows"]] == [0, 1]
    assert all(row["lora_ms"] > 0 and row["full_ms"] > 0 and row["lora_peak_gib"] == 0 for row in payload["rows"])
    assert f"LoRA / full fine-tuning: time {payload['time_ratio']:.3f} (slowest rank)" in done.stdout
    assert [c["check"] for c in payload["checks"]] == [line[5:] for line in checks]
    assert all(c["ok"] for c in payload["checks"])
    for row in payload["rows"]:
        assert f"| {row['rank']} | {row['lora_ms']:.1f} | {row['full_ms']:.1f} |" in done.stdout


def test_gpu_fsdp2_checks_fail_when_adapters_are_left_out_of_fully_shard(tmp_path):
    done, checks = _gpu_fsdp2_dry_run(tmp_path, GPU_FSDP2_FAULT="unsharded-first-layer")
    assert done.returncode != 0 and "2 of 13 checks failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    failed = [line for line in checks if line.startswith("FAIL")]
    assert len(checks) == 13 and len(failed) == 2, checks
    assert failed[0].startswith("FAIL adapters after training are the same on every rank (2 ranks")
    assert failed[0].endswith("(false on rank 0, 1)")
    assert failed[1].startswith("FAIL adapters equal a one-rank run of the same global batch")

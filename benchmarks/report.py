"""Render benchmark results (the JSON files the benchmarks write) as markdown.

Usage::

    python benchmarks/report.py                          # print the tables of benchmarks/results/*.json
    python benchmarks/report.py --readme README.md       # also rewrite the README's performance section

``--readme`` replaces everything between the lines ``<!-- perf:start -->`` and ``<!-- perf:end -->``
(the markers stay). This module reads JSON only, so it runs without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
RESULTS = Path(__file__).resolve().parent / "results"
_ORDER = {"step": 0, "inference": 1, "callback": 2, "callback_setup": 3, "digests": 4}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 3 decimals below 10, else 1; None as a dash."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _spread(quartiles: Sequence[float] | None) -> str | None:
    """Per-round ratios as ``q1-q3``: the step-to-step noise around the ratio of medians."""
    return None if not quartiles else f"{quartiles[0]:.3f}-{quartiles[2]:.3f}"


def _numerics(label: str, compared: str, grads: str, n: dict[str, Any]) -> str:
    """One line of the numerics check of a step run: relative errors and the verdict."""
    ours = n["lightning_lora"]
    return (
        f"Numerics [{label}], {compared}: output {ours['output']:.1e}, input grad {ours['input_grad']:.1e}, "
        f"{grads} {ours['adapter_grads']:.1e} (relative; tolerance {n['tolerance']:.0e}): "
        + ("ok" if n["ok"] else "MISMATCH")
    )


def _shape(s: dict[str, Any]) -> str:
    extra = s.get("extra") or {}
    experts = f" ({extra['experts']} experts, top {extra['top_k']})" if s["model"] == "moe" and extra else ""
    return (
        f"{s['model']} {s['layers']} layers{experts}, hidden {s['hidden']}, FFN {s['ffn']}, batch {s['batch']} x "
        f"{s['seq_len']}, {s['dtype']}, r={s['r']}, alpha={s['alpha']:g}"
    )


def _machine(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    peft = f", peft {env['peft']}" if env.get("peft") else ""
    return f"{where}; torch {env['torch']}{peft}; {env['date']}"


def _disturbed(payload: dict[str, Any]) -> list[str]:
    counts = {r["label"]: r.get("disturbed_steps", 0) for r in payload["rows"]}
    if not any(counts.values()):
        return []
    detail = ", ".join(f"{label}: {n}" for label, n in counts.items() if n)
    return [f"Timed steps that other processes still interrupted after three repeats: {detail}."]


def render_step(payload: dict[str, Any]) -> str:
    """The training-step table and its numerics check."""
    s = payload["setting"]
    unit = "peak RSS MiB" if s["device"] == "cpu" else "peak MiB"
    table = markdown_table(
        ["variant", "ms/step", "/ floor", "per-round / floor (IQR)", "/ PEFT", "/ full FT", unit],
        [
            [r["label"], r["ms"], r["vs_floor"], _spread(r.get("vs_floor_rounds")), r["vs_peft"], r["vs_full_ft"],
             r["peak_mib"]]
            for r in payload["rows"]
        ],
    )
    lines = [
        f"Training step, preset `{s['preset']}`: {_shape(s)}, AdamW; median of {s['steps']} steps after "
        f"{s['warmup']} warm-up rounds ({_machine(payload)})",
        "",
        table,
        "",
    ]
    reference = "PEFT" if s["model"] == "moe" else "the reference"  # no plain reference adapts expert weights
    for label, n in payload["numerics"].items():
        lines.append(_numerics(label, f"lightning-lora vs {reference}", "adapter grads", n))
    for label, n in payload.get("dora_numerics", {}).items():
        lines.append(_numerics(label, "lightning-lora DoRA vs PEFT DoRA", "adapter grads (A, B, magnitude)", n))
    for label, costs in payload.get("dora", {}).items():
        parts = [
            f"{name} **{cost['ratio']:.3f}** (per round {_spread(cost['rounds'])})"
            for name, cost in (("lightning-lora", costs.get("lightning_lora")), ("PEFT", costs.get("peft")))
            if cost is not None
        ]
        if parts:
            lines.append(f"DoRA step / LoRA step [{label}]: " + "; ".join(parts))
    rows = {row["key"]: row for row in payload["rows"]}
    for label in s["target_sets"]:
        ours, peft = rows.get(f"lightning_lora[{label}]"), rows.get(f"peft[{label}]")
        if s["model"] == "moe" and ours is not None and peft is not None:
            memory = f", peak memory **{ours['peak_mib'] / peft['peak_mib']:.3f}**" if ours["peak_mib"] and peft["peak_mib"] else ""
            lines.append(f"lightning-lora / PEFT [{label}]: step time **{ours['ms'] / peft['ms']:.3f}**{memory}")
    return "\n".join(lines + _disturbed(payload))


def render_inference(payload: dict[str, Any]) -> str:
    """The inference table and its numerics check."""
    s = payload["setting"]
    table = markdown_table(
        ["variant", "ms/forward", "/ base", "per-round / base (IQR)", "/ PEFT"],
        [[r["label"], r["ms"], r["vs_base"], _spread(r.get("vs_base_rounds")), r["vs_peft"]] for r in payload["rows"]],
    )
    lines = [
        f"Inference (no grad), preset `{s['preset']}`: {_shape(s)}; median of {s['steps']} forwards after "
        f"{s['warmup']} warm-up rounds ({_machine(payload)})",
        "",
        table,
        "",
    ]
    for label, n in payload["numerics"].items():
        lines.append(
            f"Numerics [{label}]: merged vs unmerged {n['merged_vs_unmerged']:.1e}, unmerged vs reference "
            f"{n['unmerged_vs_reference']:.1e} (relative; tolerance {n['tolerance']:.0e}; the adapters change "
            f"the output by {n['adapters_change_output']:.1e}): " + ("ok" if n["ok"] else "MISMATCH")
        )
    return "\n".join(lines + _disturbed(payload))


def render_callback(payload: dict[str, Any]) -> str:
    """The step time with and without ``LoRACallback``, and the time inside its hooks."""
    s = payload["setting"]
    return (
        f"Callback overhead, preset `{s['preset']}` ({s['targets']}, logging every step): with LoRACallback "
        f"{payload['ms_with']:.1f} ms/step, `apply_lora` without it {payload['ms_without']:.1f} ms/step, ratio "
        f"**{payload['ratio']:.3f}** (median of {s['repeats']} x {s['steps']} steps each); inside the callback's "
        f"hooks {payload['hook_ms']:.2f} ms/step, **{payload['hook_share']:.2%}** of the step ({_machine(payload)})"
    )


def render_setup(payload: dict[str, Any]) -> str:
    """Setup and checkpoint-save times with ``LoRACallback`` on a deep model (this version, and a baseline)."""
    s = payload["setting"]
    ms = payload["ms"]
    lines = [
        f"Setup and save, preset `{s['preset']}` at {s['layers']} layers ({', '.join(s['target_sets'])}): median of "
        f"{s['repeats']} fresh processes per version ({_machine(payload)})",
        "",
        "| version | fit until training, LoRACallback | apply_lora + fit until training | save_checkpoint |",
        "|---|---|---|---|",
    ]
    for side, values in ms.items():
        version = f"{side} ({payload['commits'][side]})" if "commits" in payload else side
        lines.append(f"| {version} | {values['with']:.0f} ms | {values['without']:.0f} ms | {values['save']:.1f} ms |")
    if "baseline" in ms:
        ratio = {key: ms["this"][key] / ms["baseline"][key] for key in ("with", "without", "save")}
        lines.append(
            f"| this / baseline | **{ratio['with']:.3f}** | **{ratio['without']:.3f}** | **{ratio['save']:.3f}** |"
        )
    return "\n".join(lines)


def render_digests(payload: dict[str, Any]) -> str:
    """What recording and verifying checkpoint digests costs."""
    s, ms = payload["setting"], payload["ms"]
    return (
        f"Checkpoint digests, a {payload['bytes'] / 2**30:.2f} GiB checkpoint (median of {s['repeats']}; "
        f"{_machine(payload)}): save {ms['save']:.0f} ms, of which digesting {ms['digest']:.0f} ms "
        f"(**{payload['digest_share']:.1%}**, {payload['digest_gib_s']:.2f} GiB/s), bytes digested per byte written "
        f"**{payload['digested_per_written']:.3f}**; verification {ms['verify']:.0f} ms on one core, "
        f"**{payload['verify_gib_s']:.2f} GiB/s**, {payload['verify_vs_load']:.3f} x the time of `torch.load` of "
        f"the same file ({ms['load']:.0f} ms)"
    )


RENDERERS = {
    "step": render_step,
    "inference": render_inference,
    "callback": render_callback,
    "callback_setup": render_setup,
    "digests": render_digests,
}


def render(payloads: Sequence[dict[str, Any]]) -> str:
    """All results, grouped by preset, each benchmark in a fixed order."""
    ordered = sorted(payloads, key=lambda p: (p["setting"]["preset"], _ORDER.get(p["benchmark"], 9)))
    blocks = []
    preset = None
    for payload in ordered:
        if payload["setting"]["preset"] != preset:
            preset = payload["setting"]["preset"]
            blocks.append(f"#### Preset `{preset}`")
        blocks.append(RENDERERS[payload["benchmark"]](payload))
    return "\n\n".join(blocks) + "\n"


def load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The benchmark payloads in ``paths`` (files, or folders of ``*.json``).

    Raises:
        SystemExit: if a path does not exist, holds no JSON, or a file is not a benchmark result.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"results path {str(path)!r} does not exist")
    if not files:
        raise SystemExit(f"no *.json results in {[str(p) for p in paths]}; run the benchmarks with --json first")
    payloads = []
    for file in files:
        payload = json.loads(file.read_text())
        if payload.get("benchmark") not in RENDERERS:
            raise SystemExit(
                f"{file} is not a benchmark result: expected 'benchmark' to be one of {sorted(RENDERERS)}, "
                f"got {payload.get('benchmark')!r}"
            )
        payloads.append(payload)
    return payloads


def rewrite_readme(readme: Path, markdown: str) -> None:
    """Replace the text between the perf markers of ``readme`` with ``markdown``.

    Raises:
        SystemExit: if the file lacks either marker, or has them out of order.
    """
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise SystemExit(f"{readme} must contain the lines {START!r} and then {END!r}; found start={start >= 0}, "
                         f"end={end >= 0}")
    readme.write_text(text[: start + len(START)] + "\n\n" + markdown + "\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[RESULTS], help="result files or folders")
    parser.add_argument("--readme", type=Path, help="rewrite this file's section between the perf markers")
    args = parser.parse_args(argv)
    markdown = render(load(args.paths))
    if args.readme is not None:
        rewrite_readme(args.readme, markdown)
    else:
        sys.stdout.write(markdown)


if __name__ == "__main__":
    main()

"""One comparison table (and a plot) across the runs of a multirun of examples/train.py.

Runs as a Hydra callback at the end of every multirun (see conf/config.yaml), and by hand:

    python examples/sweep_summary.py multirun/2026-11-28/12-00-00 [--readme README.md]

It reads each job's result.json and writes comparison.md, comparison.csv and metric_vs_params.png
into the sweep directory; with --readme it also puts the table into that file between the
markers ``<!-- sweep:start -->`` and ``<!-- sweep:end -->``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
COLUMNS = [
    ("run", "overrides"),
    ("trainable params", "trainable_params"),
    ("trainable %", "trainable_percent"),
    ("adapter bytes", "adapter_bytes"),
    ("checkpoint bytes", "checkpoint_bytes"),
    ("val/acc before", "val_acc_before"),
    ("val/acc after", "val_acc_after"),
    ("s/step", "seconds_per_step"),
]


def load_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each job's result.json under ``sweep_dir``, in job order."""
    paths = sorted(sweep_dir.glob("*/result.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return [json.loads(path.read_text()) for path in paths]


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The comparison table, then each LoRA run's accuracy relative to a full fine-tuning run."""
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(_cell(result.get(key)) for _, key in COLUMNS) + " |" for result in results]
    full = next((r for r in results if r["adapter_bytes"] is None), None)
    relative = [
        f"- {r['overrides']}: {r['val_acc_after'] / full['val_acc_after']:.1%} of full fine-tuning's val/acc "
        f"({r['val_acc_after']:.4f} vs {full['val_acc_after']:.4f}) with {r['trainable_percent']:.2f}% of the "
        f"parameters trainable"
        for r in results
        if full is not None and r is not full
    ]
    return "\n".join([header, rule, *rows] + ([""] + relative if relative else []))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value) or "(defaults)"


def write_summary(sweep_dir: Path) -> Path | None:
    """Write comparison.md, comparison.csv and metric_vs_params.png; returns the table's path."""
    results = load_results(sweep_dir)
    if not results:
        log.warning("No result.json under %s: no comparison written", sweep_dir)
        return None
    table = sweep_dir / "comparison.md"
    table.write_text(markdown_table(results) + "\n")
    with open(sweep_dir / "comparison.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[key for _, key in COLUMNS])
        writer.writeheader()
        writer.writerows({key: result.get(key) for _, key in COLUMNS} for result in results)
    _plot(results, sweep_dir / "metric_vs_params.png")
    log.info("Comparison of %d runs:\n%s\n(written to %s)", len(results), table.read_text(), table)
    return table


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for result in results:
        axes.scatter(result["trainable_params"], result["val_acc_after"])
        axes.annotate(result["overrides"] or "(defaults)", (result["trainable_params"], result["val_acc_after"]), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("validation accuracy")
    axes.set_title("validation accuracy vs trainable parameters")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def update_readme(readme: Path, table: str, marker: str = "sweep") -> None:
    """Replace the text between the ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` lines of ``readme``."""
    text = readme.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    pattern = re.compile(f"({re.escape(start)}\n).*?({re.escape(end)})", re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no '{start}' ... '{end}' markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))


class SweepSummary(Callback):
    """Hydra callback: the comparison of all jobs when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(config.hydra.sweep.dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (holds 0/, 1/, ...)")
    parser.add_argument("--readme", type=Path, help="also put the table into this file between the sweep markers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = write_summary(args.sweep_dir)
    if table is None:
        raise SystemExit(f"no result.json under {args.sweep_dir}")
    if args.readme:
        update_readme(args.readme, table.read_text().strip())


if __name__ == "__main__":
    main()

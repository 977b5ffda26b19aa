"""Training step time of LoRA variants against the frozen floor, side by side in one process.

Variants (same model, batch, sequence length, dtype and seed):

- floor: every weight frozen, no adapters; forward and backward through the activations only
  (the embedding output requires grad, as it does in every variant);
- lightning-lora: this project's ``apply_lora`` (no adapter bias, dropout 0, like the others);
- lightning-lora DoRA: the same with ``use_dora=True``;
- PEFT LoRA and PEFT DoRA with their defaults (``get_peft_model``), when ``peft`` is installed;
- the plain reference ``original(x) + scaling * B(A(x))``;
- full fine-tuning.

With ``--model moe`` (or ``--preset moe``) the layers' MLPs are transformers' Qwen3-MoE blocks and the
adapters include the fused expert weights; the variants are then the floor, lightning-lora, PEFT
(``target_parameters``) and full fine-tuning, and lightning-lora's numerics are checked against PEFT's.

Each timed step includes the AdamW step of the trainable variants. Before timing, the outputs and
gradients of lightning-lora are compared with the reference's (same adapter weights, non-zero B),
and those of lightning-lora DoRA with PEFT DoRA's (same A, B and magnitudes); a mismatch stops the
run with exit status 1. DoRA's cost is reported as DoRA step / LoRA step, for this project and
for PEFT, from the same run. Peak memory is measured in a process of its own per
variant (CPU: peak RSS, ``VmHWM``; GPU: ``torch.cuda.max_memory_allocated``; see ``MemoryRuns``).

Usage::

    python benchmarks/step.py                      # the CPU preset
    python benchmarks/step.py --model moe          # mixture of experts: attention and expert weights, against PEFT
    python benchmarks/step.py --preset gpu --json benchmarks/results/gpu-step.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    TOLERANCE,
    ReferenceLoRA,
    Setting,
    Variant,
    add_arguments,
    adapted_names,
    build_base,
    build_training_variant,
    environment,
    loss_fn,
    make_batch,
    median_ms,
    peft_adapters,
    peft_available,
    peft_magnitudes,
    randomize_pairs,
    relative_error,
    round_ratio_quartiles,
    setting_from_args,
    time_interleaved,
    training_step,
    write_json,
)

from report import render_step  # noqa: E402

from lightning_lora import lora_modules  # noqa: E402


def variant_specs(s: Setting, with_peft: bool) -> list[tuple[str, str | None]]:
    """(kind, target set) of every variant: floor and full fine-tuning once, adapters per target set.

    On the MoE model: lightning-lora and PEFT only (DoRA and the plain reference adapt no expert weights).
    """
    if s.model == "moe":
        kinds = ["lightning_lora"] + (["peft"] if with_peft else [])
    else:
        kinds = ["lightning_lora", "lightning_lora_dora"] + (["peft", "peft_dora"] if with_peft else []) + ["reference"]
    return [("floor", None), ("full_ft", None)] + [(kind, label) for label in s.target_sets for kind in kinds]


def build_variants(s: Setting, base: nn.Module, with_peft: bool) -> list[Variant]:
    return [build_training_variant(kind, base, s, label) for kind, label in variant_specs(s, with_peft)]


def forward_backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and embedding output (with its gradient) of one forward and backward, no optimizer step."""
    h = model.embed(batch[0]).requires_grad_(True)
    out = model.body(h)
    loss_fn(out, batch[1]).backward()
    return out.detach(), h


def check_numerics(s: Setting, ours: Variant, reference: Variant, batch: tuple[torch.Tensor, torch.Tensor],
                   peft: Variant | None) -> dict[str, Any]:
    """Compare lightning-lora with the reference: output, input gradient, every A and B gradient.

    Both get the same non-zero adapter weights first (so the adapters change the output).
    PEFT is compared too when present, for information; it does not decide the outcome.

    Returns:
        The largest relative errors, the tolerance, and whether lightning-lora passed.
    """
    ref_layers = {n: m for n, m in reference.model.named_modules() if isinstance(m, ReferenceLoRA)}
    our_layers = lora_modules(ours.model)
    if list(our_layers) != list(ref_layers):
        raise SystemExit(f"lightning-lora adapted {list(our_layers)} but the reference adapted {list(ref_layers)}")
    randomize_pairs([(m.matrix_A, m.matrix_B) for m in our_layers.values()], s.seed)
    randomize_pairs([(m.A, m.B) for m in ref_layers.values()], s.seed)
    expected_out, expected_h = forward_backward(reference.model, batch)
    expected_grads = [p.grad for m in ref_layers.values() for p in (m.A.weight, m.B.weight)]

    def errors(model: nn.Module, pairs: list[tuple[nn.Linear, nn.Linear]]) -> dict[str, float]:
        out, h = forward_backward(model, batch)
        grads = [p.grad for a, b in pairs for p in (a.weight, b.weight)]
        return {
            "output": relative_error(out, expected_out),
            "input_grad": relative_error(h.grad, expected_h.grad),
            "adapter_grads": max(relative_error(g, e) for g, e in zip(grads, expected_grads)),
        }

    result: dict[str, Any] = {"tolerance": TOLERANCE[s.dtype]}
    result["lightning_lora"] = errors(ours.model, [(m.matrix_A, m.matrix_B) for m in our_layers.values()])
    if peft is not None:
        pairs = list(peft_adapters(peft.model).values())
        randomize_pairs(pairs, s.seed)
        result["peft"] = errors(peft.model, pairs)
    result["ok"] = max(result["lightning_lora"].values()) <= result["tolerance"]
    for variant in (ours, reference, peft):
        if variant is not None:
            variant.model.zero_grad(set_to_none=True)
    return result


def check_dora_numerics(s: Setting, ours: Variant, peft: Variant, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Compare lightning-lora DoRA with PEFT DoRA: output, input gradient, A, B and magnitude gradients.

    Both get the same non-zero A and B and the same magnitudes (PEFT's, each scaled by a seeded
    random factor in [1, 1.2)) first.

    Returns:
        The largest relative errors, the tolerance, and whether lightning-lora DoRA passed.
    """
    our_layers = lora_modules(ours.model)
    pairs = peft_adapters(peft.model)
    magnitudes = peft_magnitudes(peft.model)
    if list(our_layers) != list(pairs):
        raise SystemExit(f"lightning-lora DoRA adapted {list(our_layers)} but PEFT DoRA adapted {list(pairs)}")
    randomize_pairs([(m.matrix_A, m.matrix_B) for m in our_layers.values()], s.seed)
    randomize_pairs(list(pairs.values()), s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        for name, layer in our_layers.items():
            factor = 1 + 0.2 * torch.rand(magnitudes[name].shape, generator=generator)
            magnitudes[name].mul_(factor.to(magnitudes[name].device, magnitudes[name].dtype))
            layer.magnitude.copy_(magnitudes[name])
    return _compare(
        s, ours, peft, batch,
        [p for layer in our_layers.values() for p in (layer.matrix_A.weight, layer.matrix_B.weight, layer.magnitude)],
        [p for name, (a, b) in pairs.items() for p in (a.weight, b.weight, magnitudes[name])],
    )


def check_peft_numerics(s: Setting, ours: Variant, peft: Variant, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Compare lightning-lora with PEFT on the same non-zero adapters: output, input gradient, A and B gradients
    (on the MoE model, where expert weights are adapted as PEFT's ``target_parameters``).

    Returns:
        The largest relative errors, the tolerance, and whether lightning-lora passed.
    """
    our_layers = lora_modules(ours.model)
    pairs = peft_adapters(peft.model)
    if sorted(our_layers) != sorted(pairs):
        raise SystemExit(f"lightning-lora adapted {sorted(our_layers)} but PEFT adapted {sorted(pairs)}")
    randomize_pairs([(m.matrix_A, m.matrix_B) for m in our_layers.values()], s.seed)
    with torch.no_grad():
        for name, layer in our_layers.items():
            pairs[name][0].weight.copy_(layer.matrix_A.weight)
            pairs[name][1].weight.copy_(layer.matrix_B.weight)
    return _compare(
        s, ours, peft, batch,
        [p for layer in our_layers.values() for p in (layer.matrix_A.weight, layer.matrix_B.weight)],
        [p for name in our_layers for p in (pairs[name][0].weight, pairs[name][1].weight)],
    )


def _compare(
    s: Setting,
    ours: Variant,
    peft: Variant,
    batch: tuple[torch.Tensor, torch.Tensor],
    our_params: list[torch.Tensor],
    peft_params: list[torch.Tensor],
) -> dict[str, Any]:
    """One forward and backward of each on ``batch``: the relative errors of lightning-lora's output, input
    gradient and the gradients of ``our_params`` against PEFT's (``peft_params``, in the same order);
    the gradients are cleared after."""
    expected_out, expected_h = forward_backward(peft.model, batch)
    out, h = forward_backward(ours.model, batch)
    errors = {
        "output": relative_error(out, expected_out),
        "input_grad": relative_error(h.grad, expected_h.grad),
        "adapter_grads": max(relative_error(g.grad, e.grad) for g, e in zip(our_params, peft_params)),
    }
    for variant in (ours, peft):
        variant.model.zero_grad(set_to_none=True)
    return {"tolerance": TOLERANCE[s.dtype], "lightning_lora": errors, "ok": max(errors.values()) <= TOLERANCE[s.dtype]}


def dora_costs(times: dict[str, list[float]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per target set: DoRA step / LoRA step (ratio of medians and per-round quartiles), ours and PEFT's."""
    costs: dict[str, dict[str, Any]] = {}
    for label in labels:
        costs[label] = {}
        for name, lora, dora in (("lightning_lora", "lightning_lora", "lightning_lora_dora"), ("peft", "peft", "peft_dora")):
            lora_key, dora_key = f"{lora}[{label}]", f"{dora}[{label}]"
            if lora_key in times and dora_key in times:
                costs[label][name] = {
                    "ratio": median_ms(times[dora_key]) / median_ms(times[lora_key]),
                    "rounds": round_ratio_quartiles(times[dora_key], times[lora_key]),
                }
    return costs


class MemoryRuns:
    """Peak memory (MiB) of each variant, trained two steps in a process of its own.

    On a POSIX CPU run the processes are forked at construction, before the benchmark builds or
    runs anything (they then hold exactly the imported libraries, as a fresh process would after
    its imports), and wait until :meth:`measure` lets them go: this spares each one the imports,
    which take longer than its work. Elsewhere (CUDA cannot be forked safely) :meth:`measure`
    starts a fresh interpreter per variant. Either way the processes run side by side, one thread
    each; with ``with_peft`` every one has PEFT imported, so that their baselines agree.
    """

    def __init__(self, s: Setting, with_peft: bool) -> None:
        self.setting = s
        self.with_peft = with_peft
        self.specs = variant_specs(s, with_peft)
        self._waiting: dict[str, tuple[Any, Any]] = {}
        if s.device == "cpu" and "fork" in multiprocessing.get_all_start_methods():
            if with_peft:
                import peft  # noqa: F401  imported before the fork, so every process holds it
            context = multiprocessing.get_context("fork")
            for kind, label in self.specs:
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_forked_memory_run, args=(child_end, s, kind, label), daemon=True)
                process.start()
                self._waiting[_key(kind, label)] = (process, parent_end)

    def measure(self) -> dict[str, float]:
        """Run every variant's process now and collect the peaks.

        Raises:
            SystemExit: if one of the processes fails (with its error).
        """
        if self._waiting:
            for _, pipe in self._waiting.values():
                pipe.send("go")
            peaks = {}
            for key, (process, pipe) in self._waiting.items():
                status, value = pipe.recv()
                process.join()
                if status != "ok":
                    raise SystemExit(f"memory run of {key} failed: {value}")
                peaks[key] = value
            return peaks
        running = {}
        for kind, label in self.specs:
            command = [sys.executable, __file__, "--setting-json", json.dumps(self.setting.to_dict()), "--child", kind]
            if label is not None:
                command += ["--child-targets", label]
            if self.with_peft:
                command.append("--child-imports-peft")
            running[_key(kind, label)] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        peaks = {}
        for key, process in running.items():
            out, err = process.communicate()
            if process.returncode != 0:
                raise SystemExit(f"memory run of {key} failed:\n{err[-4000:]}")
            peaks[key] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        return peaks

    def close(self) -> None:
        """End processes that never ran (the benchmark stopped early)."""
        for process, _ in self._waiting.values():
            if process.is_alive():
                process.terminate()


def _key(kind: str, label: str | None) -> str:
    return kind if label is None else f"{kind}[{label}]"


def _forked_memory_run(pipe: Any, s: Setting, kind: str, label: str | None) -> None:
    pipe.recv()  # wait while the parent times the variants
    try:
        pipe.send(("ok", train_and_measure(s, kind, label)))
    except Exception as err:  # reported by the parent, which exits with it
        pipe.send(("error", repr(err)))


def train_and_measure(s: Setting, kind: str, label: str | None) -> float:
    """Build one variant alone, train two steps; returns this process's peak memory in MiB."""
    torch.set_num_threads(1)  # the processes run side by side; one thread each keeps them from thrashing
    base = build_base(s)
    variant = build_training_variant(kind, base, s, label, own_base=True)
    batch = make_batch(s)
    for _ in range(2):  # the second step holds the optimizer state and the next step's activations
        training_step(variant, batch)
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mib()


def child(s: Setting, kind: str, targets: str | None, imports_peft: bool) -> None:
    """The fresh-interpreter memory run: print the peak memory of one variant as JSON."""
    if imports_peft:
        import peft  # noqa: F401  every process of a run imports the same libraries, so baselines agree
    print(json.dumps({"peak_mib": train_and_measure(s, kind, targets)}))


def _peak_rss_mib() -> float:
    """This process's peak resident set size.

    Linux carries ``ru_maxrss`` over ``execve`` (and ``fork``) from the parent, so a child of a
    large process would report the parent's size; ``VmHWM`` belongs to this address space alone.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def run(s: Setting, memory: bool, with_peft: bool) -> dict[str, Any]:
    """Build, check, time and (optionally) measure every variant; returns the JSON payload."""
    memory_runs = MemoryRuns(s, with_peft) if memory else None  # before anything is built
    try:
        return _run(s, memory_runs, with_peft)
    finally:
        if memory_runs is not None:
            memory_runs.close()


def _run(s: Setting, memory_runs: MemoryRuns | None, with_peft: bool) -> dict[str, Any]:
    base = build_base(s)
    batch = make_batch(s)
    variants = build_variants(s, base, with_peft)
    by_key = {v.key: v for v in variants}
    numerics = {}
    for label in s.target_sets:
        ours = by_key[f"lightning_lora[{label}]"]
        if s.model == "moe":  # no plain reference of expert weights: PEFT's target_parameters are the reference
            if f"peft[{label}]" not in by_key:
                raise SystemExit("--model moe checks lightning-lora's numerics against PEFT's: install peft, or drop --no-peft")
            numerics[label] = check_peft_numerics(s, ours, by_key[f"peft[{label}]"], batch)
        else:
            numerics[label] = check_numerics(s, ours, by_key[f"reference[{label}]"], batch, by_key.get(f"peft[{label}]"))
        numerics[label]["adapted"] = adapted_names(ours.model)
    failed = {label: n for label, n in numerics.items() if not n["ok"]}
    if failed:
        print(json.dumps(failed, indent=2), file=sys.stderr)
        reference = "PEFT's" if s.model == "moe" else "the reference LoRA"
        raise SystemExit(f"lightning-lora's outputs or gradients differ from {reference} beyond tolerance")
    dora_numerics = {
        label: check_dora_numerics(s, by_key[f"lightning_lora_dora[{label}]"], by_key[f"peft_dora[{label}]"], batch)
        for label in s.target_sets
        if f"peft_dora[{label}]" in by_key
    }
    failed = {label: n for label, n in dora_numerics.items() if not n["ok"]}
    if failed:
        print(json.dumps(failed, indent=2), file=sys.stderr)
        raise SystemExit("lightning-lora DoRA's outputs or gradients differ from PEFT DoRA's beyond tolerance")

    times, disturbed = time_interleaved(
        {v.key: (lambda v=v: training_step(v, batch)) for v in variants}, s.warmup, s.steps, s.device
    )
    ms = {key: median_ms(t) for key, t in times.items()}
    peaks = memory_runs.measure() if memory_runs is not None else {}
    rows = []
    for v in variants:
        peft_key = f"{'peft_dora' if v.kind.endswith('dora') else 'peft'}[{v.targets}]"
        rows.append({
            "key": v.key,
            "variant": v.kind,
            "label": v.label,
            "targets": v.targets,
            "ms": ms[v.key],
            "vs_floor": ms[v.key] / ms["floor"],
            "vs_floor_rounds": round_ratio_quartiles(times[v.key], times["floor"]),
            "vs_full_ft": ms[v.key] / ms["full_ft"],
            "vs_peft": ms[v.key] / ms[peft_key] if peft_key in ms else None,
            "peak_mib": peaks.get(v.key),
            "times_ms": [1000.0 * t for t in times[v.key]],
            "disturbed_steps": disturbed[v.key],
        })
    return {
        "benchmark": "step",
        "setting": s.to_dict(),
        "environment": environment(s),
        "memory": "peak RSS of a fresh process per variant" if s.device == "cpu"
        else "torch.cuda.max_memory_allocated in a fresh process per variant",
        "numerics": numerics,
        "dora_numerics": dora_numerics,
        "dora": dora_costs(times, list(s.target_sets)),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--no-peft", action="store_true", help="leave PEFT out even if it is installed")
    parser.add_argument("--setting-json", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-targets", help=argparse.SUPPRESS)
    parser.add_argument("--child-imports-peft", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.setting_json:
        s = Setting(**json.loads(args.setting_json))
        if args.child:
            child(s, args.child, args.child_targets, args.child_imports_peft)
            return
    else:
        s = setting_from_args(args)
    torch.manual_seed(s.seed)
    payload = run(s, memory=not args.no_memory, with_peft=peft_available() and not args.no_peft)
    print(render_step(payload))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()

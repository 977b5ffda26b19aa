"""What the benchmarks share: presets, the models (plain PyTorch), the variants, timing and tables.

The protocol is that of ``BENCHMARKS.md``: every variant runs on the same model, batch, sequence
length, dtype and seed, in one process, interleaved round by round, and is reported as a ratio.
The frozen variants share one set of base weights (the same ``Parameter`` objects), so they read
the same memory and their numerics can be compared directly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import LoRAConfig, apply_lora, lora_modules, lora_parameters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Relative error (in norm) allowed between this project's LoRA and the reference, per dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEARS = ATTENTION + ["gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, dict[str, Any]] = {
    # BERT-base-shaped encoder at a third of the width: the CPU anchor of BENCHMARKS.md.
    "cpu": {
        "model": "bert",
        "layers": 6,
        "hidden": 384,
        "ffn": 1536,
        "heads": 12,
        "vocab": 30522,
        "batch": 16,
        "seq_len": 128,
        "dtype": "float32",
        "r": 8,
        "alpha": 16.0,
        "target_sets": {"query,value": ["query", "value"]},
        "device": "cpu",
        "warmup": 2,
        "steps": 10,
    },
    # Four Llama-7B-shaped decoder layers: the GPU anchor of BENCHMARKS.md.
    "gpu": {
        "model": "llama",
        "layers": 4,
        "hidden": 4096,
        "ffn": 11008,
        "heads": 32,
        "vocab": 32000,
        "batch": 4,
        "seq_len": 2048,
        "dtype": "bfloat16",
        "r": 16,
        "alpha": 32.0,
        "target_sets": {"attention": ATTENTION, "all linears": ALL_LINEARS},
        "device": "cuda",
        "warmup": 5,
        "steps": 20,
    },
    # A Llama-shaped decoder whose MLPs are transformers' Qwen3-MoE blocks (8 experts, top 2): adapters on
    # the attention's query and value projections and on the fused expert weights (PEFT: target_parameters).
    "moe": {
        "model": "moe",
        "layers": 4,
        "hidden": 384,
        "ffn": 512,  # each expert's intermediate size
        "heads": 12,
        "vocab": 8192,
        "batch": 8,
        "seq_len": 128,
        "dtype": "float32",
        "r": 8,
        "alpha": 16.0,
        "target_sets": {"attention+experts": ["q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj"]},
        "device": "cpu",
        "warmup": 2,
        "steps": 10,
        "extra": {"experts": 8, "top_k": 2},
    },
}


@dataclass
class Setting:
    """One benchmark configuration (a preset with command-line overrides)."""

    preset: str
    model: str  # "bert" (post-norm encoder), "llama" (pre-norm decoder with RoPE and SwiGLU) or "moe" (its MLPs MoE)
    layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int
    batch: int
    seq_len: int
    dtype: str  # a key of DTYPES
    r: int
    alpha: float
    target_sets: dict[str, list[str]]  # label -> module name patterns
    device: str
    warmup: int
    steps: int
    adapter_dtype: str | None = None  # this project's adapter_dtype (None: the model's dtype)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: a preset and overrides of its fields."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model and settings (default: cpu)")
    parser.add_argument("--model", choices=["bert", "llama", "moe"], help="model family")
    for name in ("layers", "hidden", "ffn", "heads", "vocab", "batch", "seq-len", "r", "steps", "warmup"):
        parser.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    parser.add_argument("--alpha", type=float, help="override the preset's alpha")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations dtype")
    parser.add_argument(
        "--targets",
        action="append",
        help="comma-separated module names to adapt; repeat for several target sets (default: the preset's)",
    )
    parser.add_argument("--adapter-dtype", choices=sorted(DTYPES), help="this project's adapter_dtype")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--experts", type=int, help="for --model moe: experts per layer (default 8)")
    parser.add_argument("--top-k", type=int, help="for --model moe: experts per token (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def setting_from_args(args: argparse.Namespace) -> Setting:
    """The preset named by ``--preset`` with the given overrides; exits if the device is missing."""
    values = dict(PRESETS[args.preset])
    for name in ("model", "layers", "hidden", "ffn", "heads", "vocab", "batch", "seq_len", "dtype", "r", "alpha",
                 "steps", "warmup", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if values["model"] == "moe":
        extra = {"experts": 8, "top_k": 2, **values.get("extra", {})}
        extra.update({key: value for key, value in (("experts", args.experts), ("top_k", args.top_k)) if value is not None})
        values["extra"] = extra
        if values["model"] != PRESETS[args.preset]["model"] and not args.targets:
            values["target_sets"] = PRESETS["moe"]["target_sets"]
    if args.targets:
        values["target_sets"] = {spec: [t for t in spec.split(",") if t] for spec in args.targets}
    setting = Setting(preset=args.preset, adapter_dtype=args.adapter_dtype, seed=args.seed, **values)
    if setting.steps < 1 or setting.warmup < 0:
        sys.exit(f"--steps must be >= 1 and --warmup >= 0, got steps={setting.steps}, warmup={setting.warmup}")
    if setting.hidden % setting.heads:
        sys.exit(f"--hidden must be a multiple of --heads, got hidden={setting.hidden}, heads={setting.heads}")
    if setting.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            f"--preset {setting.preset} runs on device {setting.device!r}, but torch.cuda.is_available() is "
            f"False on this machine (torch {torch.__version__}); run it on a machine with a CUDA GPU, or use "
            f"--preset cpu here"
        )
    return setting


# --- models ------------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with BERT's module names (``query``, ``key``, ``value``, ``dense``)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        return self.dense(attended.transpose(1, 2).reshape(b, t, c))


class BertLayer(nn.Module):
    """A post-norm BERT encoder layer: attention, add & norm, GELU feed-forward, add & norm."""

    def __init__(self, hidden: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.attention_norm = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.output_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = self.attention_norm(x + self.attention(x))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_tables(head_dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosines and sines ``(T, D)`` of rotary position embeddings."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq).repeat(1, 2)  # (T, D)
    return angles.cos(), angles.sin()


class LlamaAttention(nn.Module):
    """Causal multi-head attention with rotary position embeddings and Llama's module names."""

    def __init__(self, hidden: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        cos, sin = rotary_tables(hidden // heads, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.o_proj(attended.transpose(1, 2).reshape(b, t, c))


class LlamaMLP(nn.Module):
    """The SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """A pre-norm Llama decoder layer."""

    def __init__(self, hidden: int, ffn: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden, eps=1e-5)
        self.self_attn = LlamaAttention(hidden, heads, max_len)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=1e-5)
        self.mlp = LlamaMLP(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class MoELayer(nn.Module):
    """A pre-norm decoder layer whose MLP is transformers' Qwen3-MoE block: a router and fused 3-D experts."""

    def __init__(self, hidden: int, ffn: int, heads: int, max_len: int, experts: int, top_k: int) -> None:
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=ffn, num_experts=experts,
                                num_experts_per_tok=top_k, norm_topk_prob=True)
        config._experts_implementation = "grouped_mm"  # what from_pretrained chooses by default
        self.input_layernorm = nn.RMSNorm(hidden, eps=1e-5)
        self.self_attn = LlamaAttention(hidden, heads, max_len)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=1e-5)
        self.mlp = Qwen3MoeSparseMoeBlock(config)
        with torch.no_grad():  # its weights are created empty; transformers' own init would be normal(0, 0.02)
            for param in self.mlp.parameters():
                param.normal_(0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Encoder(nn.Module):
    """Token embeddings and a stack of layers, without an output head.

    ``embed`` and ``body`` are separate so that a benchmark can make the embedding output require
    grad: then every variant, the frozen floor included, runs backward through all activations.
    """

    def __init__(self, s: Setting) -> None:
        super().__init__()
        self.kind = s.model
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        if s.model == "bert":
            self.embed_positions = nn.Embedding(s.seq_len, s.hidden)
            self.embed_norm = nn.LayerNorm(s.hidden)
            self.layers = nn.ModuleList(BertLayer(s.hidden, s.ffn, s.heads) for _ in range(s.layers))
            self.norm: nn.Module = nn.Identity()
        elif s.model == "moe":
            experts, top_k = s.extra["experts"], s.extra["top_k"]
            self.layers = nn.ModuleList(MoELayer(s.hidden, s.ffn, s.heads, s.seq_len, experts, top_k) for _ in range(s.layers))
            self.norm = nn.RMSNorm(s.hidden, eps=1e-5)
        else:
            self.layers = nn.ModuleList(LlamaLayer(s.hidden, s.ffn, s.heads, s.seq_len) for _ in range(s.layers))
            self.norm = nn.RMSNorm(s.hidden, eps=1e-5)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        h = self.embed_tokens(tokens)
        if self.kind == "bert":
            h = self.embed_norm(h + self.embed_positions.weight[: tokens.shape[1]])
        return h

    def body(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(tokens))


def build_base(s: Setting) -> Encoder:
    """The base model of ``s``, seeded, on its device and dtype, every weight frozen."""
    torch.manual_seed(s.seed)
    with torch.device(s.device):  # initialised where it runs: a CPU init of the GPU preset takes long
        model = Encoder(s)
    return model.to(dtype=s.torch_dtype).requires_grad_(False)


def make_batch(s: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded token ids ``(B, T)`` and regression targets ``(B, T, C)`` (float32) on the device.

    The loss is the mean squared error to the targets. (The mean square of the output alone would
    be nearly constant after a final normalisation layer, its gradients mostly rounding noise.)
    """
    generator = torch.Generator().manual_seed(s.seed + 1)
    tokens = torch.randint(0, s.vocab, (s.batch, s.seq_len), generator=generator)
    targets = torch.randn(s.batch, s.seq_len, s.hidden, generator=generator)
    return tokens.to(s.device), targets.to(s.device)


def loss_fn(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), targets)


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that holds the very same parameters and buffers."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


# --- the adapter variants ----------------------------------------------------------------------


class ReferenceLoRA(nn.Module):
    """The plain LoRA of the protocol: ``original(x) + scaling * B(A(x))``, weights in the model dtype."""

    def __init__(self, original: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        factory = {"device": original.weight.device, "dtype": original.weight.dtype}
        self.original = original
        self.A = nn.Linear(original.in_features, r, bias=False, **factory)
        self.B = nn.Linear(r, original.out_features, bias=False, **factory)
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.original(x) + self.scaling * self.B(self.A(x))


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_reference_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float) -> dict[str, ReferenceLoRA]:
    """Wrap every ``nn.Linear`` whose name ends with one of ``targets`` in a :class:`ReferenceLoRA`."""
    adapters = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _matches(name, targets):
            parent_name, _, attribute = name.rpartition(".")
            adapters[name] = ReferenceLoRA(module, r, alpha)
            setattr(model.get_submodule(parent_name), attribute, adapters[name])
    return adapters


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def peft_version() -> str | None:
    if not peft_available():
        return None
    import peft

    return peft.__version__


def add_peft_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float, use_dora: bool = False) -> nn.Module:
    """PEFT's LoRA (or DoRA) with its defaults (``get_peft_model``) on the same targets, r, alpha, dropout 0.

    Returns the adapted model itself (PEFT modifies it in place), not the ``PeftModel`` wrapper.
    """
    from peft import LoraConfig, get_peft_model

    parameters = [t for t in targets if t.startswith("experts.")]  # expert weights: PEFT's target_parameters
    modules = [t for t in targets if t not in parameters]
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, target_parameters=parameters or None,
                        lora_dropout=0.0, use_dora=use_dora)
    return get_peft_model(model, config).get_base_model()


def peft_adapters(model: nn.Module) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    """Adapter name -> (lora_A, lora_B) of PEFT's default adapter, for every PEFT LoRA layer; the wrapper of an
    expert weight is named after the weight (``...experts.gate_up_proj``), as this project names it."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parameter = getattr(module, "parameter_name", None)
            key = f"{name.split('.base_layer')[0]}.{parameter}" if parameter else name
            found[key] = (module.lora_A["default"], module.lora_B["default"])
    return found


def peft_magnitudes(model: nn.Module) -> dict[str, nn.Parameter]:
    """Module name -> DoRA magnitude of PEFT's default adapter, for every PEFT DoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module.lora_magnitude_vector["default"].weight
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_magnitude_vector
    }


def our_config(s: Setting, targets: Sequence[str], use_dora: bool = False) -> LoRAConfig:
    """This project's config matching the reference: no adapter bias, dropout 0."""
    return LoRAConfig(r=s.r, alpha=s.alpha, bias=False, targets=list(targets), dropout=0.0,
                      adapter_dtype=s.adapter_dtype, use_dora=use_dora)


@dataclass
class Variant:
    """One model set up for one way of training (or of running inference)."""

    key: str  # unique, e.g. "lightning_lora[query,value]"
    kind: str  # floor, lightning_lora, peft, reference, full_ft, base, merged
    label: str
    targets: str | None  # the target set label, None for floor and full fine-tuning
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None


LABELS = {
    "floor": "floor (frozen, input grads only)",
    "lightning_lora": "lightning-lora",
    "lightning_lora_dora": "lightning-lora DoRA",
    "peft": "PEFT LoRA (defaults)",
    "peft_dora": "PEFT DoRA (defaults)",
    "reference": "plain reference LoRA",
    "full_ft": "full fine-tune",
}


def build_training_variant(kind: str, base: Encoder, s: Setting, target_label: str | None = None,
                           own_base: bool = False) -> Variant:
    """One training variant around ``base`` (shared unless ``own_base``: then ``base`` itself is used).

    Raises:
        ValueError: for an unknown ``kind``.
    """
    model = base if own_base else (copy.deepcopy(base) if kind == "full_ft" else sharing_copy(base))
    targets = s.target_sets[target_label] if target_label is not None else []
    params: list[nn.Parameter]
    if kind == "floor":
        params = []
    elif kind == "full_ft":
        model.requires_grad_(True)
        params = list(model.parameters())
    elif kind in ("lightning_lora", "lightning_lora_dora"):
        apply_lora(model, our_config(s, targets, use_dora=kind == "lightning_lora_dora"))
        params = list(lora_parameters(model))
    elif kind in ("peft", "peft_dora"):
        model = add_peft_lora(model, targets, s.r, s.alpha, use_dora=kind == "peft_dora")
        params = [p for p in model.parameters() if p.requires_grad]
    elif kind == "reference":
        adapters = add_reference_lora(model, targets, s.r, s.alpha)
        params = [p for a in adapters.values() for p in (a.A.weight, a.B.weight)]
    else:
        raise ValueError(f"kind must be one of {sorted(LABELS)}, got {kind!r}")
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    key = kind if target_label is None else f"{kind}[{target_label}]"
    label = LABELS[kind] if target_label is None else f"{LABELS[kind]}, {target_label}"
    return Variant(key, kind, label, target_label, model, optimizer)


def training_step(variant: Variant, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Forward, backward through every activation, optimizer step; returns the embedding output."""
    model = variant.model
    tokens, targets = batch
    h = model.embed(tokens)
    if not h.requires_grad:
        h.requires_grad_(True)  # the floor's input grads; the same for every variant
    loss_fn(model.body(h), targets).backward()
    if variant.optimizer is not None:
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
    return h


# --- numerics ----------------------------------------------------------------------------------


def randomize_pairs(pairs: list[tuple[nn.Linear, nn.Linear]], seed: int) -> list[torch.Tensor]:
    """Fill (A, B) pairs, in order, with the same seeded values; returns the values used."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        for a, b in pairs:
            for layer in (a, b):
                value = torch.randn(layer.weight.shape, generator=generator) * 0.05
                layer.weight.copy_(value)
                values.append(value)
    return values


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` in the 2-norm, computed in float64."""
    actual, expected = actual.double(), expected.double()
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-30))


# --- timing and output -------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class InterferenceMeter:
    """CPU seconds that other processes used while a measurement ran (Linux only).

    The machine's busy time comes from ``/proc/stat`` (steal time included), this process's own
    from ``os.times``; the difference is what others took. On a shared machine a step that others
    interrupted is measurably slower, so such steps are measured again (see :func:`time_interleaved`).
    """

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/stat")
        self._tick = os.sysconf("SC_CLK_TCK") if self.available else 100

    def _machine_busy(self) -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        guests = sum(fields[8:10])  # guest time is already counted in user time
        return (sum(fields) - idle - guests) / self._tick

    def read(self) -> tuple[float, float]:
        own = os.times()
        busy = self._machine_busy() if self.available else 0.0
        return busy, own.user + own.system

    def others(self, before: tuple[float, float], after: tuple[float, float]) -> float:
        """Seconds of CPU that other processes used between two :meth:`read` calls."""
        if not self.available:
            return 0.0
        return max(0.0, (after[0] - before[0]) - (after[1] - before[1]))


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, steps: int, device: str,
                     max_repeats: int = 3) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per call of each function, run round by round in a rotating order.

    Every round calls each function once; the order rotates so that no function always runs
    right after the same neighbour. The first ``warmup`` rounds are not recorded. A timed call
    during which other processes used more than 5% of one core (and at least two clock ticks) is
    measured again, up to ``max_repeats`` times; after that it is kept and counted.

    Returns:
        The recorded seconds per function, and per function the number of kept calls that other
        processes interfered with.
    """
    meter = InterferenceMeter()
    resolution = 2.0 / meter._tick
    keys = list(fns)
    times: dict[str, list[float]] = {key: [] for key in keys}
    disturbed = {key: 0 for key in keys}
    for round_index in range(warmup + steps):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            for _ in range(max_repeats + 1):
                synchronize(device)
                before = meter.read()
                start = time.perf_counter()
                fns[key]()
                synchronize(device)
                elapsed = time.perf_counter() - start
                others = meter.others(before, meter.read())
                if round_index < warmup or others <= max(0.05 * elapsed, resolution):
                    break
            else:
                disturbed[key] += 1
            if round_index >= warmup:
                times[key].append(elapsed)
    return times, disturbed


def round_ratio_quartiles(times: list[float], baseline: list[float]) -> list[float]:
    """Quartiles (25%, 50%, 75%) of the per-round ratios ``times[i] / baseline[i]``.

    The spread shows how far step-to-step noise reaches; the ratio of the medians is the result.
    """
    ratios = [t / b for t, b in zip(times, baseline)]
    if len(ratios) < 2:
        return ratios * 3
    return statistics.quantiles(ratios, n=4, method="inclusive")


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def environment(s: Setting) -> dict[str, Any]:
    """Versions and hardware, recorded with the results."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
    }
    if s.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")


def adapted_names(model: nn.Module) -> list[str]:
    """Names of this project's adapters in ``model`` (for checking that variants adapt the same modules)."""
    return list(lora_modules(model))

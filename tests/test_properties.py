"""Property-based round trips over random small models: merge/unmerge, save/load, merge_and_unload.

Each example draws a small model (an MLP, a stack of Conv1d/2d/3d with an optional linear head, or an
Embedding followed by linear layers), an input, and a ``LoRAConfig`` (r, alpha, bias, rsLoRA, dropout,
exact-name targets or ``all-linear``, sometimes ``rank_pattern`` / ``alpha_pattern`` and ``trainable``),
and seeds torch from a drawn integer, so every example is reproducible from its printed form.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

MAX_EXAMPLES = 200
RTOL = ATOL = 1e-5
#: Each adapter's update is about this large relative to the base weights, whatever its scaling.
UPDATE = 0.1
#: How much the weights of ``trainable`` modules move, as training would move them.
TRAINABLE_STEP = 0.1
MAX_RANK = 8
MAX_SIZE = 12
DTYPES = (torch.float32, torch.float64)
ADAPTER_DTYPES = (None, "float32", "float64")
ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.GELU)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
MAX_SPATIAL = {1: 7, 2: 6, 3: 4}

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

PROPERTY_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SIZES = st.integers(1, MAX_SIZE)
ALPHAS = st.floats(0.1, 64, allow_nan=False, allow_infinity=False)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of a generated model: its class and constructor arguments."""

    cls: type[nn.Module]
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> nn.Module:
        return self.cls(**dict(self.kwargs))

    def arg(self, key: str) -> Any:
        return dict(self.kwargs)[key]


def layer(cls: type[nn.Module], **kwargs: Any) -> Layer:
    return Layer(cls, tuple(kwargs.items()))


@dataclasses.dataclass(frozen=True)
class Arch:
    """A generated architecture: stages of layers (an ``nn.Sequential`` of ``nn.Sequential``) and its input."""

    stages: tuple[tuple[Layer, ...], ...]
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    num_embeddings: int | None = None  # token inputs in [0, num_embeddings); None: float inputs

    def build(self) -> nn.Module:
        """A new instance (weights from torch's global generator), in eval mode."""
        stages = OrderedDict(
            (f"stage{i}", nn.Sequential(*(spec.build() for spec in stage))) for i, stage in enumerate(self.stages)
        )
        return nn.Sequential(stages).to(self.dtype).eval()

    def inputs(self) -> torch.Tensor:
        if self.num_embeddings is not None:
            return torch.randint(0, self.num_embeddings, self.input_shape)
        return torch.randn(self.input_shape, dtype=self.dtype)

    def adaptable(self) -> dict[str, Layer]:
        """Exact module name -> layer, for every layer an adapter can wrap, in model order."""
        return {
            f"stage{i}.{j}": spec
            for i, stage in enumerate(self.stages)
            for j, spec in enumerate(stage)
            if issubclass(spec.cls, ADAPTABLE)
        }


@dataclasses.dataclass(frozen=True)
class Case:
    """One example: the architecture, the config and the settings each adapted module should get."""

    arch: Arch
    config: dict[str, Any]
    expected: dict[str, tuple[int, float]]  # adapted module -> (r, alpha), in model order
    seed: int


def valid_ranks(spec: Layer) -> list[int]:
    """The ranks an adapter on ``spec`` accepts: at most the larger of its weight's first two dims,
    and for a grouped convolution a multiple of its groups."""
    if spec.cls is nn.Linear:
        limit, groups = max(spec.arg("in_features"), spec.arg("out_features")), 1
    elif spec.cls is nn.Embedding:
        limit, groups = max(spec.arg("num_embeddings"), spec.arg("embedding_dim")), 1
    else:
        groups = spec.arg("groups")
        limit = max(spec.arg("out_channels"), spec.arg("in_channels") // groups)
    return [r for r in range(1, min(limit, MAX_RANK) + 1) if r % groups == 0]


def lacks_bias(spec: Layer) -> bool:
    """Whether merging an adapter with a bias into ``spec`` would add a bias it does not have."""
    return spec.cls is not nn.Embedding and not spec.arg("bias")


@st.composite
def linear_layers(draw: st.DrawFn, width: int) -> tuple[list[Layer], int]:
    """1..4 linear layers from ``width`` features, some followed by an activation; and the output width."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        out = draw(SIZES)
        layers.append(layer(nn.Linear, in_features=width, out_features=out, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(layer(draw(st.sampled_from(ACTIVATIONS))))
        width = out
    return layers, width


@st.composite
def leading_shape(draw: st.DrawFn, max_size: int = 3) -> tuple[int, ...]:
    """Zero to two leading (batch) dimensions."""
    return tuple(draw(st.lists(st.integers(1, max_size), max_size=2)))


@st.composite
def mlp_layers(draw: st.DrawFn) -> tuple[list[Layer], tuple[int, ...], None]:
    width = draw(SIZES)
    layers, _ = draw(linear_layers(width))
    return layers, (*draw(leading_shape()), width), None


@st.composite
def conv_layer(draw: st.DrawFn, dims: int, channels: int, size: list[int]) -> tuple[Layer, list[int]]:
    """A convolution that fits an input of ``channels`` x ``size``, and the spatial size of its output."""
    groups = draw(st.sampled_from([1, 2, 2]))  # grouped convolutions half the time or more
    if channels % groups:
        groups = 1
    out_channels = groups * draw(st.integers(1, MAX_SIZE // groups))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    padding: str | list[int] = draw(st.one_of(st.sampled_from(["same", "valid"]), st.lists(st.integers(0, 1), min_size=dims, max_size=dims)))
    stride = [1] * dims if padding == "same" else [draw(st.integers(1, 2)) for _ in range(dims)]
    pads = []  # (left, right) per dimension
    for i in range(dims):
        if padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            pads.append((total // 2, total - total // 2))
        else:
            side = 0 if padding == "valid" else padding[i]
            pads.append((side, side))
            padded = size[i] + 2 * side
            if padded < dilation[i] * (kernel[i] - 1) + 1:  # the kernel does not fit: shrink it
                dilation[i], kernel[i] = 1, min(kernel[i], padded)
    mode = draw(st.sampled_from(PADDING_MODES))
    widest = [max(pad) for pad in pads]
    if (mode == "reflect" and any(w >= n for w, n in zip(widest, size))) or (
        mode == "circular" and any(w > n for w, n in zip(widest, size))
    ):
        mode = "zeros"
    out_size = [
        (size[i] + sum(pads[i]) - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)
    ]
    conv = layer(
        CONV_TYPES[dims],
        in_channels=channels,
        out_channels=out_channels,
        kernel_size=tuple(kernel),
        stride=tuple(stride),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(dilation),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )
    return conv, out_size


@st.composite
def conv_layers(draw: st.DrawFn) -> tuple[list[Layer], tuple[int, ...], None]:
    dims = draw(st.integers(1, 3))
    size = [draw(st.integers(1, MAX_SPATIAL[dims])) for _ in range(dims)]
    channels = draw(SIZES)
    batch = draw(st.sampled_from([(), (1,), (2,), (3,)]))  # () is an unbatched input
    shape = (*batch, channels, *size)
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        conv, size = draw(conv_layer(dims, channels, size))
        layers.append(conv)
        channels = conv.arg("out_channels")
        if draw(st.booleans()):
            layers.append(layer(draw(st.sampled_from(ACTIVATIONS))))
    if draw(st.booleans()):  # a linear head over the flattened features
        layers.append(layer(nn.Flatten, start_dim=-(dims + 1)))
        layers.append(layer(nn.Linear, in_features=channels * math.prod(size), out_features=draw(SIZES), bias=draw(st.booleans())))
    return layers, shape, None


@st.composite
def embedding_layers(draw: st.DrawFn) -> tuple[list[Layer], tuple[int, ...], int]:
    num, dim = draw(SIZES), draw(SIZES)
    padding_idx = draw(st.one_of(st.none(), st.integers(-num, num - 1)))
    layers, _ = draw(linear_layers(dim))
    return [layer(nn.Embedding, num_embeddings=num, embedding_dim=dim, padding_idx=padding_idx), *layers], draw(leading_shape(4)), num


@st.composite
def archs(draw: st.DrawFn) -> Arch:
    layers, shape, num_embeddings = draw(st.one_of(mlp_layers(), conv_layers(), embedding_layers()))
    cuts = sorted(draw(st.sets(st.integers(1, len(layers) - 1), max_size=2))) if len(layers) > 1 else []
    bounds = [0, *cuts, len(layers)]
    stages = tuple(tuple(layers[a:b]) for a, b in zip(bounds, bounds[1:]))
    return Arch(stages, shape, draw(st.sampled_from(DTYPES)), num_embeddings)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    arch = draw(archs())
    layers = arch.adaptable()
    linear = [name for name, spec in layers.items() if spec.cls is nn.Linear]
    if linear and draw(st.booleans()):  # all-linear leaves out the output layer: the last of several
        targets, chosen = ["all-linear"], linear[:-1] if len(linear) > 1 else linear
    else:
        targets = draw(st.lists(st.sampled_from(list(layers)), min_size=1, unique=True))
        chosen = [name for name in layers if name in targets]
    ranks = {name: valid_ranks(layers[name]) for name in chosen}
    common = sorted(set.intersection(*(set(r) for r in ranks.values())))
    alpha = draw(ALPHAS)
    if common and not draw(st.booleans()):
        r, rank_pattern, alpha_pattern = draw(st.sampled_from(common)), {}, {}
    else:  # per-module overrides, and wherever the global r does not fit
        r = draw(st.integers(1, MAX_RANK))
        rank_pattern = {
            name: draw(st.sampled_from(ranks[name])) for name in chosen if r not in ranks[name] or draw(st.booleans())
        }
        alpha_pattern = {name: draw(ALPHAS) for name in chosen if draw(st.booleans())}
    others = [name for name, spec in layers.items() if name not in chosen and not (targets == ["all-linear"] and spec.cls is nn.Linear)]
    trainable = draw(st.lists(st.sampled_from(others), unique=True, max_size=2)) if others else []
    config = {
        "r": r,
        "alpha": alpha,
        "bias": draw(st.booleans()),
        "use_rslora": draw(st.booleans()),
        "dropout": draw(st.sampled_from([0.0, 0.25])),
        "adapter_dtype": draw(st.sampled_from(ADAPTER_DTYPES)),
        "targets": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "trainable": trainable,
    }
    expected = {name: (rank_pattern.get(name, r), alpha_pattern.get(name, alpha)) for name in chosen}
    return Case(arch, config, expected, draw(st.integers(0, 2**32 - 1)))


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def adapted_model(case: Case) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """The case's model adapted and "trained" (non-zero updates), its base state dict and an input."""
    torch.manual_seed(case.seed)
    model = case.arch.build()
    base = clone_state(model)
    x = case.arch.inputs()
    assert apply_lora(model, LoRAConfig(**case.config)) == list(case.expected)
    adapters = lora_modules(model)
    assert {name: (a.r, a.alpha) for name, a in adapters.items()} == case.expected
    with torch.no_grad():
        for adapter in adapters.values():
            for param in adapter.matrix_B.parameters():
                param.normal_(0, UPDATE / adapter.scaling)
        for name in case.config["trainable"]:
            for param in model.get_submodule(name).parameters():
                param.add_(torch.randn_like(param), alpha=TRAINABLE_STEP)
    return model, base, x


@PROPERTY_SETTINGS
@given(case=cases())
def test_merge_then_unmerge_round_trip(case):
    """merge_lora keeps the outputs; unmerge_lora restores every tensor bit for bit."""
    model, _, x = adapted_model(case)
    expected = model(x)
    before = clone_state(model)
    merge_lora(model)
    assert all(adapter.merged for adapter in lora_modules(model).values())
    torch.testing.assert_close(model(x), expected, rtol=RTOL, atol=ATOL)
    unmerge_lora(model)
    assert not any(adapter.merged for adapter in lora_modules(model).values())
    after = model.state_dict()
    assert list(after) == list(before)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    assert torch.equal(model(x), expected)


@PROPERTY_SETTINGS
@given(case=cases())
def test_save_then_load_round_trip(case, tmp_path):
    """An adapter file loaded into a fresh model with the same base weights gives the same outputs."""
    model, base, x = adapted_model(case)
    path = save_adapter(model, tmp_path / "adapter.lora.safetensors")
    fresh = case.arch.build()
    fresh.load_state_dict(base)
    assert load_adapter(fresh, path) == list(case.expected)
    saved, loaded = lora_state_dict(model), lora_state_dict(fresh)
    assert list(loaded) == list(saved)
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    assert torch.equal(fresh(x), model(x))


@PROPERTY_SETTINGS
@given(case=cases())
def test_merge_and_unload_loads_strictly_into_the_original_architecture(case):
    """merge_and_unload gives the original architecture (strict load) and the adapted outputs,
    or refuses, changing nothing, exactly when an adapter has a bias its original layer lacks."""
    model, _, x = adapted_model(case)
    expected = model(x)
    layers = case.arch.adaptable()
    lacking = [name for name in case.expected if case.config["bias"] and lacks_bias(layers[name])]
    if lacking:
        with pytest.raises(ValueError, match=re.escape(f"cannot unload modules {lacking[:5]!r}: their adapters have a bias")):
            merge_and_unload(model)
        assert list(lora_modules(model)) == list(case.expected)
        assert not any(adapter.merged for adapter in lora_modules(model).values())
        assert torch.equal(model(x), expected)
        return
    plain = merge_and_unload(model)
    assert plain is model and not lora_modules(plain)
    reference = case.arch.build()
    reference.load_state_dict(plain.state_dict(), strict=True)
    assert list(plain.state_dict()) == list(reference.state_dict())
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    torch.testing.assert_close(reference(x), expected, rtol=RTOL, atol=ATOL)

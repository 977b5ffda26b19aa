import math

import pytest
import torch
from torch import nn

from lightning_lora import LoRA
from lightning_lora.adapters import LoRAConv, LoRAEmbedding

RANK = 4
ALPHA = 8.0


def _train_like(layer: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for param in layer.matrix_B.parameters():
            param.normal_(0, scale)
        if getattr(layer.matrix_A, "bias", None) is not None:
            layer.matrix_A.bias.normal_(0, scale)


LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(2, 5, 12)),
    "linear_nobias": (lambda: nn.Linear(12, 10, bias=False), lambda: torch.randn(7, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 11)),
    "conv2d_stride_dilation": (
        lambda: nn.Conv2d(4, 8, 3, stride=2, dilation=2, padding=2),
        lambda: torch.randn(2, 4, 13, 11),
    ),
    "conv2d_groups": (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), lambda: torch.randn(2, 4, 9, 9)),
    "conv2d_reflect": (
        lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        lambda: torch.randn(2, 4, 8, 8),
    ),
    "conv2d_same_nobias": (
        lambda: nn.Conv2d(4, 6, (3, 5), padding="same", bias=False),
        lambda: torch.randn(1, 4, 7, 9),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1), lambda: torch.randn(1, 2, 5, 6, 6)),
    "embedding": (lambda: nn.Embedding(20, 6, padding_idx=0), lambda: torch.randint(0, 20, (3, 5))),
}


def _wrap(make, bias):
    module = make()
    cls = LoRAEmbedding if isinstance(module, nn.Embedding) else LoRAConv if isinstance(module, nn.modules.conv._ConvNd) else LoRA
    return module, cls(module, bias=bias, alpha=ALPHA, r=RANK)


def test_minerva_contract():
    layer = nn.Linear(128, 64)
    lora = LoRA(layer, alpha=2, r=8)
    assert lora.original_module is layer
    assert (lora.matrix_A.in_features, lora.matrix_A.out_features) == (128, 8)
    assert (lora.matrix_B.in_features, lora.matrix_B.out_features) == (8, 64)
    assert lora.scaling == 2 / 8
    assert torch.count_nonzero(lora.matrix_B.weight) == 0
    bound = math.sqrt(6 / ((1 + 5) * 128))  # kaiming_uniform_(a=sqrt(5)) bound for fan_in 128
    assert lora.matrix_A.weight.abs().max() <= bound
    _train_like(lora)
    x = torch.randn(16, 128)
    expected = layer(x) + lora.scaling * lora.matrix_B(lora.matrix_A(x))
    torch.testing.assert_close(lora(x), expected)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(LAYERS))
def test_identity_at_init(case, bias):
    make, make_input = LAYERS[case]
    module, lora = _wrap(make, bias)
    x = make_input()
    assert torch.equal(lora(x), module(x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(LAYERS))
def test_merged_equals_unmerged(case, bias):
    make, make_input = LAYERS[case]
    module, lora = _wrap(make, bias)
    _train_like(lora)
    x = make_input()
    unmerged = lora(x)
    original = {k: v.clone() for k, v in module.state_dict().items()}
    lora.merge()
    assert lora.merged
    merged = module(x)  # the original module alone now holds the update
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora(x), merged)
    lora.unmerge()
    assert module.state_dict().keys() == original.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in original.items())  # bit for bit
    assert torch.equal(lora(x), unmerged)


def test_conv_update_is_a_conv_with_the_original_geometry():
    conv = nn.Conv2d(4, 8, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode="reflect")
    lora = LoRAConv(conv, r=4, alpha=4)
    _train_like(lora)
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(lora.matrix_A, attr) == getattr(conv, attr)
    assert lora.matrix_B.kernel_size == (1, 1)
    x = torch.randn(2, 4, 15, 15)
    reference = nn.Conv2d(4, 8, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode="reflect")
    reference.load_state_dict(conv.state_dict())
    with torch.no_grad():
        reference.weight += lora.delta_weight()
        reference.bias += lora.delta_bias()
    torch.testing.assert_close(lora(x), reference(x), rtol=1e-5, atol=1e-5)


def test_merge_creates_and_removes_a_bias():
    layer = nn.Linear(6, 5, bias=False)
    lora = LoRA(layer, bias=True, r=2)
    _train_like(lora)
    x = torch.randn(3, 6)
    before = lora(x)
    lora.merge()
    assert layer.bias is not None
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    lora.unmerge()
    assert layer.bias is None


def test_bfloat16_merge_is_no_further_from_float64_than_unmerged():
    lora = LoRA(nn.Linear(64, 32), alpha=16, r=8).to(torch.bfloat16)
    _train_like(lora, scale=0.05)
    reference = LoRA(nn.Linear(64, 32), alpha=16, r=8).double()
    reference.load_state_dict({k: v.double() for k, v in lora.state_dict().items()})
    x = torch.randn(256, 64).to(torch.bfloat16)
    target = reference(x.double())
    unmerged_error = (lora(x).double() - target).norm()
    lora.merge()
    merged_error = (lora(x).double() - target).norm()
    assert merged_error <= unmerged_error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_unmerge_restores_low_precision_weights_bit_for_bit(dtype):
    layer = nn.Linear(64, 32).to(dtype)
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    lora = LoRA(layer, alpha=16, r=8)
    _train_like(lora, scale=0.05)
    lora.merge()
    assert not torch.equal(layer.weight, original["weight"])
    lora.unmerge()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in original.items())


def test_bfloat16_merge_that_would_drift_is_refused():
    layer = nn.Linear(64, 32).to(torch.bfloat16)
    lora = LoRA(layer, r=8, alpha=8)
    _train_like(lora, scale=1e-5)  # an update far below bfloat16's resolution of the weights
    before = layer.weight.clone()
    with pytest.raises(RuntimeError, match=r"merging would change the update by .*torch.bfloat16 weights"):
        lora.merge()
    assert torch.equal(layer.weight, before) and not lora.merged


def test_merge_twice_and_unmerge_unmerged_fail():
    lora = LoRA(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="LoRA is not merged; nothing to unmerge"):
        lora.unmerge()
    lora.merge()
    with pytest.raises(RuntimeError, match=r"LoRA is already merged; call unmerge\(\) first"):
        lora.merge()


def test_adapter_dtype_float32_on_bfloat16_model_computes_in_bfloat16():
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    lora = LoRA(layer, adapter_dtype="float32")
    assert lora.matrix_A.weight.dtype == torch.float32
    _train_like(lora)
    out = lora(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lora.matrix_B.weight.grad.dtype == torch.float32


def test_adapters_follow_the_original_dtype_by_default():
    lora = LoRA(nn.Linear(8, 8).double())
    assert lora.matrix_A.weight.dtype == lora.matrix_B.weight.dtype == torch.float64


def test_dropout_applies_to_adapter_input_only():
    lora = LoRA(nn.Linear(8, 8), dropout=0.5)
    _train_like(lora)
    x = torch.randn(4, 8)
    lora.eval()
    torch.testing.assert_close(lora(x), lora.original_module(x) + lora.scaling * lora.matrix_B(lora.matrix_A(x)))
    assert isinstance(LoRA(nn.Linear(8, 8)).dropout, nn.Identity)


def test_conv_rank_must_divide_groups():
    with pytest.raises(ValueError, match=r"r must be a multiple of the convolution's groups \(4\).*got r=2"):
        LoRAConv(nn.Conv2d(8, 8, 3, groups=4), r=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"r": 0}, "r must be a positive integer, got 0"), ({"alpha": -1}, "alpha must be a positive finite number, got -1")],
)
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRA(nn.Linear(4, 4), **kwargs)


META_CASES = [
    (lambda: nn.Linear(8, 6), lambda: torch.randn(2, 8)),
    (lambda: nn.Conv2d(4, 6, 3), lambda: torch.randn(2, 4, 7, 7)),
    (lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (3, 5))),
]


@pytest.mark.parametrize(("make", "inputs"), META_CASES)
def test_adapters_created_on_the_meta_device_are_the_identity_once_materialised(make, inputs):
    """What Lightning's ModelParallelStrategy and torchtitan do with a model built on the meta device:
    ``to_empty``, then ``reset_parameters`` on every module that has parameters of its own."""
    from lightning_lora import LoRAConfig, apply_lora

    with torch.device("meta"):
        model = nn.Sequential(make())
    apply_lora(model, LoRAConfig(targets=["0"], bias=True))
    model.to_empty(device="cpu")
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()
    adapter = model[0]
    assert all(torch.count_nonzero(p) == 0 for p in adapter.matrix_B.parameters())
    assert torch.count_nonzero(adapter.matrix_A.weight) > 0
    x = inputs()
    assert torch.equal(model(x), adapter.original_module(x))

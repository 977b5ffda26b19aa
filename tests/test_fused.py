"""The fused LoRA linear path computes what the separate layers compute, in every setting it runs in."""

import lightning as L
import pytest
import torch
from conftest import Block
from lightning_models import Classifier, data
from torch import nn

from lightning_lora import LoRA, LoRACallback, LoRAConfig, apply_lora, lora_modules
from lightning_lora.adapters import LoRABase
from lightning_lora.adapters.fused import lora_linear

RANK = 4
ALPHA = 8.0
IN, OUT = 12, 10
FUSED = "_LoRALinearFunctionBackward"
BF16_TOLERANCE = 1e-2  # relative, in norm: a few bfloat16 roundings (2**-8 each)
SHAPES = {"1d": (IN,), "2d": (7, IN), "3d": (2, 5, IN), "4d": (2, 3, 4, IN)}


def _layer(bias: bool = True, base_bias: bool = True, **kwargs) -> LoRA:
    layer = LoRA(nn.Linear(IN, OUT, bias=base_bias), bias=bias, alpha=ALPHA, r=RANK, **kwargs)
    with torch.no_grad():  # a trained adapter: every parameter non-zero
        for param in [*layer.matrix_A.parameters(), *layer.matrix_B.parameters()]:
            param.normal_(0, 0.3)
    layer.original_module.requires_grad_(False)
    return layer


def _reference(layer: LoRA, x: torch.Tensor) -> torch.Tensor:
    """The plain definition, through the separate modules."""
    return layer.original_module(x) + layer.scaling * layer.matrix_B(layer.matrix_A(layer.dropout(x)))


def _outputs_and_grads(layer: LoRA, x: torch.Tensor, fn) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(layer, x)
    out.float().square().sum().backward()
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = [x.grad] + [p.grad for p in params]
    layer.zero_grad(set_to_none=True)
    return [out.detach()] + grads


def _assert_close_in_norm(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Low-precision results differ elementwise where values cancel; compare them as a whole."""
    error = torch.linalg.vector_norm((got.double() - expected.double())) / torch.linalg.vector_norm(expected.double())
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


def _assert_same(layer: LoRA, x: torch.Tensor, **tolerance) -> None:
    fused = _outputs_and_grads(layer, x, lambda m, t: m(t))
    plain = _outputs_and_grads(layer, x, _reference)
    assert len(fused) == len(plain)
    for got, expected in zip(fused, plain):
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False], ids=["adapter_bias", "no_adapter_bias"])
@pytest.mark.parametrize("base_bias", [True, False], ids=["base_bias", "no_base_bias"])
def test_float32_matches_the_separate_layers(shape, bias, base_bias):
    layer = _layer(bias=bias, base_bias=base_bias)
    x = torch.randn(SHAPES[shape])
    assert type(layer(x.requires_grad_()).grad_fn).__name__ == FUSED
    _assert_same(layer, x, rtol=1e-5, atol=1e-5)


def test_trainable_base_weight_and_bias_get_their_gradients():
    layer = _layer()
    layer.original_module.requires_grad_(True)
    _assert_same(layer, torch.randn(3, 4, IN), rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_empty_inputs():
    layer = _layer()
    _assert_same(layer, torch.randn(IN, 6).t(), rtol=1e-5, atol=1e-5)
    _assert_same(layer, torch.randn(0, 3, IN), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inference_matches_without_an_autograd_node(mode):
    layer = _layer()
    x = torch.randn(2, 5, IN)
    with mode():
        out = layer(x)
        expected = _reference(layer, x)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_input_without_grad_still_trains_the_adapter():
    layer = _layer()
    layer(torch.randn(4, IN)).sum().backward()
    assert all(p.grad is not None for p in [*layer.matrix_A.parameters(), *layer.matrix_B.parameters()])


@pytest.mark.parametrize("bias", [True, False], ids=["adapter_bias", "no_adapter_bias"])
def test_dropout_matches_the_separate_layers_with_the_same_mask(bias):
    layer = _layer(bias=bias, dropout=0.5)
    x = torch.randn(2, 6, IN)
    torch.manual_seed(1)
    fused = _outputs_and_grads(layer, x, lambda m, t: m(t))
    torch.manual_seed(1)
    plain = _outputs_and_grads(layer, x, _reference)
    for got, expected in zip(fused, plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layer.eval()  # no dropout: the adapter reads x itself
    _assert_same(layer, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["adapter_bias", "no_adapter_bias"])
def test_bfloat16_autocast_matches_the_separate_layers(bias):
    layer = _layer(bias=bias)
    x = torch.randn(4, 8, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == FUSED
        fused = _outputs_and_grads(layer, x, lambda m, t: m(t))
        plain = _outputs_and_grads(layer, x, _reference)
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32  # input and A grads
    for got, expected in zip(fused, plain):
        _assert_close_in_norm(got, expected, BF16_TOLERANCE)


def test_bfloat16_model_with_float32_adapter_weights():
    layer = LoRA(nn.Linear(IN, OUT).to(torch.bfloat16), alpha=ALPHA, r=RANK, adapter_dtype="float32")
    nn.init.normal_(layer.matrix_B.weight, 0, 0.3)
    layer.original_module.requires_grad_(False)
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    fused = _outputs_and_grads(layer, x, lambda m, t: m(t))
    plain = _outputs_and_grads(layer, x, LoRABase.forward)  # the separate layers, in the input's dtype
    assert fused[0].dtype == torch.bfloat16 and fused[2].dtype == torch.float32
    for got, expected in zip(fused, plain):
        _assert_close_in_norm(got, expected, BF16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_matches_the_separate_layers(dtype):
    layer = _layer().cuda()
    x = torch.randn(4, 8, IN, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        assert type(layer(x.requires_grad_()).grad_fn).__name__ == FUSED
        fused = _outputs_and_grads(layer, x, lambda m, t: m(t))
        plain = _outputs_and_grads(layer, x, _reference)
    for got, expected in zip(fused, plain):
        _assert_close_in_norm(got, expected, BF16_TOLERANCE)


@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no_biases"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
def test_float64_gradcheck(biases, dropout):
    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, weight, a_weight, b_weight = make(2, 3, IN), make(OUT, IN), make(RANK, IN), make(OUT, RANK)
    bias, a_bias, b_bias = (make(OUT), make(RANK), make(OUT)) if biases else (None, None, None)
    mask = (torch.rand(2, 3, IN) > 0.5).double() * 2  # a fixed dropout mask, p = 0.5

    def fn(x, weight, bias, a_weight, a_bias, b_weight, b_bias):
        dropped = x * mask if dropout else None
        return lora_linear(x, weight, bias, a_weight, a_bias, b_weight, b_bias, 0.7, dropped)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, a_weight, a_bias, b_weight, b_bias))


def test_layer_float64_gradcheck():
    layer = _layer().double()
    x = torch.randn(3, IN, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())
    trainable = {name: p for name, p in params.items() if p.requires_grad}

    def fn(x, *values):
        return torch.func.functional_call(layer, {**params, **dict(zip(trainable, values))}, (x,))

    assert type(layer(x).grad_fn).__name__ == FUSED
    assert torch.autograd.gradcheck(fn, (x, *trainable.values()))


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_subclasses_and_hooks_use_the_separate_layers():
    sub = LoRA(_ScaledLinear(IN, OUT), alpha=ALPHA, r=RANK)
    x = torch.randn(3, IN, requires_grad=True)
    out = sub(x)
    assert type(out.grad_fn).__name__ != FUSED
    torch.testing.assert_close(out, _reference(sub, x))

    layer = _layer()
    calls = []
    handle = layer.original_module.register_forward_hook(lambda module, args, output: calls.append(output))
    out = layer(x)
    assert len(calls) == 1 and type(out.grad_fn).__name__ != FUSED
    handle.remove()
    assert type(layer(x).grad_fn).__name__ == FUSED


def test_mismatched_inputs_raise_as_before():
    layer = _layer()
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        layer(torch.randn(3, IN + 1))
    with pytest.raises(RuntimeError, match="dtype"):
        layer(torch.randn(3, IN, dtype=torch.float64))


def test_merged_layer_runs_the_original_alone():
    layer = _layer()
    x = torch.randn(3, IN)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), layer.original_module(x))
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def _compiled_block_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    eager = Block(dim=16)
    apply_lora(eager, LoRAConfig(r=RANK, alpha=ALPHA, targets=["attn.qkv", "mlp.fc1", "mlp.fc2"]))
    for adapter in lora_modules(eager).values():
        nn.init.normal_(adapter.matrix_B.weight, 0, 0.1)
    compiled = torch.compile(eager, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):  # new values each step: no recompilation
            x = torch.randn(2, 5, 16)
            got = _outputs_and_grads(compiled, x, lambda m, t: m(t))
            expected = _outputs_and_grads(eager, x, lambda m, t: m(t))
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_torch_compile_fullgraph_without_recompiles():
    _compiled_block_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_without_recompiles():
    _compiled_block_matches_eager("inductor")


def test_lightning_bf16_mixed_on_cpu_trains_through_the_fused_path(tmp_path):
    model = Classifier()
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:
                for adapter in lora_modules(pl_module).values():
                    adapter.register_forward_hook(
                        lambda m, args, out: seen.append((out.dtype, type(out.grad_fn).__name__))
                    )

    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoRACallback(r=RANK, alpha=ALPHA, targets=["attn.qkv", "mlp.fc1"]), Probe()],
    )
    trainer.fit(model, data())
    assert seen and all(entry == (torch.bfloat16, FUSED) for entry in seen)
    adapters = lora_modules(model).values()  # matrix_B starts at zero: non-zero means it trained
    assert all(torch.isfinite(a.matrix_B.weight).all() and a.matrix_B.weight.abs().sum() > 0 for a in adapters)
    assert trainer.callback_metrics["train_loss"].isfinite()

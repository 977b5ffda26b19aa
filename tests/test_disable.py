"""Switching adapters off: the base model's outputs bit for bit, no merge, no copy, nestable."""

import pytest
import torch
from conftest import TinyModel, randomize_adapters

from lightning_lora import LoRAConfig, apply_lora, disable_adapters, merge_lora, set_adapters_enabled

CONFIG = LoRAConfig(r=4, alpha=8, targets=["qkv", "fc1", "embed"])


@pytest.fixture
def models():
    base = TinyModel().eval()
    adapted = TinyModel().eval()
    adapted.load_state_dict(base.state_dict())
    apply_lora(adapted, CONFIG)
    randomize_adapters(adapted)
    return base, adapted


def test_disable_gives_the_base_outputs_bit_for_bit_and_restores(models, tokens):
    base, adapted = models
    expected, adapted_out = base(tokens), adapted(tokens)
    assert not torch.equal(adapted_out, expected)
    weights = {k: v.clone() for k, v in adapted.state_dict().items()}
    with disable_adapters(adapted) as same:
        assert same is adapted
        assert torch.equal(adapted(tokens), expected)
        with disable_adapters(adapted):  # nested
            assert torch.equal(adapted(tokens), expected)
        assert torch.equal(adapted(tokens), expected)  # still off after the inner block
    assert torch.equal(adapted(tokens), adapted_out)
    assert all(torch.equal(v, weights[k]) for k, v in adapted.state_dict().items())  # nothing merged or copied


def test_exception_safe_and_the_plain_switch(models, tokens):
    base, adapted = models
    adapted_out = adapted(tokens)
    with pytest.raises(KeyError):
        with disable_adapters(adapted):
            raise KeyError("inside")
    assert torch.equal(adapted(tokens), adapted_out)
    set_adapters_enabled(adapted, False)
    assert torch.equal(adapted(tokens), base(tokens))
    set_adapters_enabled(adapted, True)
    assert torch.equal(adapted(tokens), adapted_out)
    with pytest.raises(TypeError, match="enabled must be True or False, got 0"):
        set_adapters_enabled(adapted, 0)
    merge_lora(adapted)
    with pytest.raises(RuntimeError, match="cannot disable merged adapters"):
        set_adapters_enabled(adapted, False)


def test_under_autocast_and_training(models, tokens):
    base, adapted = models
    adapted.train(), base.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base(tokens)
        with disable_adapters(adapted):
            assert torch.equal(adapted(tokens), expected)


def test_torch_compile_compiles_each_state_once(models, tokens):
    from torch._dynamo.testing import CompileCounter

    base, adapted = models
    counter = CompileCounter()
    compiled = torch.compile(adapted, backend=counter)
    on = compiled(tokens)
    with disable_adapters(adapted):
        off = compiled(tokens)
    for _ in range(3):  # switching back and forth reuses both graphs
        torch.testing.assert_close(compiled(tokens), on)
        with disable_adapters(adapted):
            torch.testing.assert_close(compiled(tokens), off)
    torch.testing.assert_close(off, base(tokens))
    assert counter.frame_count == 2

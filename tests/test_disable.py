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


def test_blocks_left_in_any_order_restore_what_they_found(models, tokens):
    base, adapted = models
    on, off = adapted(tokens), base(tokens)
    outer, inner = disable_adapters(adapted), disable_adapters(adapted)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer block ends first
    assert torch.equal(adapted(tokens), off)  # the inner one still holds them off
    inner.__exit__(None, None, None)
    assert torch.equal(adapted(tokens), on)


def test_a_block_switches_adapters_off_for_its_own_thread_only(models, tokens):
    import threading

    base, adapted = models
    on, off = adapted(tokens), base(tokens)
    inside, done = threading.Event(), threading.Event()
    seen = []

    def reference():  # e.g. DPO's reference forward, beside the training forward
        with disable_adapters(adapted):
            inside.set()
            seen.append(torch.equal(adapted(tokens), off))
            done.wait(10)

    thread = threading.Thread(target=reference)
    thread.start()
    inside.wait(10)
    results = [torch.equal(adapted(tokens), on) for _ in range(20)]  # while the other thread's block is open
    done.set()
    thread.join()
    assert all(results) and seen == [True]
    assert torch.equal(adapted(tokens), on)


def test_merging_switching_and_adding_adapters_inside_a_block_are_refused(models, tokens):
    from lightning_lora import lora_modules, merge_and_unload

    base, adapted = models
    weights = {k: v.clone() for k, v in adapted.state_dict().items()}
    with disable_adapters(adapted):
        with pytest.raises(RuntimeError, match=r"cannot merge module '.*': LoRA\w* is switched off \(inside a disable_adapters block"):
            merge_lora(adapted)
        with pytest.raises(RuntimeError, match=r"is switched off"):
            merge_and_unload(adapted)
        with pytest.raises(RuntimeError, match=r"cannot switch adapters inside a disable_adapters block: it holds modules \["):
            set_adapters_enabled(adapted, True)
        with pytest.raises(RuntimeError, match=r"cannot add adapters inside a disable_adapters block"):
            apply_lora(adapted, LoRAConfig(r=2, targets=["fc2"]))
        assert torch.equal(adapted(tokens), base(tokens))
    assert "blocks.0.mlp.fc2" not in lora_modules(adapted) and not any(a.merged for a in lora_modules(adapted).values())
    assert all(torch.equal(v, weights[k]) for k, v in adapted.state_dict().items())

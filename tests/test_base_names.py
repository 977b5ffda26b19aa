"""Pretrained weights loaded by the base model's own names into adapted models, eager and built on meta."""

import sys

import pytest
import torch
from conftest import TinyModel, run_script
from hf_models import llama, logits, qwen3_moe
from lightning.fabric.utilities.init import _materialize_distributed_module

from lightning_lora import LoRAConfig, apply_lora, load_base_weights, lora_modules, merge_lora

TOKENS = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))
MOE = ["all-linear", "experts.gate_up_proj", "experts.down_proj"]
CASES = {"llama-lora": (llama, ["all-linear"], False), "llama-dora": (llama, ["all-linear"], True), "qwen3_moe": (qwen3_moe, MOE, False)}


def pretrained(build):
    torch.manual_seed(0)
    base = build()
    return base, {k: v.clone() for k, v in base.state_dict().items()}


def materialised(build, config, base):
    """Built on the meta device, adapted, then materialised as Lightning's ModelParallelStrategy does."""
    with torch.device("meta"):
        model = build()
    apply_lora(model, config)
    torch.manual_seed(1)
    _materialize_distributed_module(model, torch.device("cpu"))
    with torch.no_grad():  # non-persistent buffers (rotary tables) are computed, not loaded
        buffers = dict(base.named_buffers())
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name.replace("original_module.", "")])
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("built", ["eager", "meta"])
def test_pretrained_weights_by_the_base_models_names_load_strictly_and_the_model_is_the_base(case, built):
    build, targets, dora = CASES[case]
    base, state = pretrained(build)
    config = LoRAConfig(r=4, targets=targets, use_dora=dora)
    if built == "meta":
        model = materialised(build, config, base)
    else:
        torch.manual_seed(1)  # another random base
        model = build()
        apply_lora(model, config)
    assert not torch.equal(logits(model, TOKENS), logits(base, TOKENS))
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "matrix_" in k}
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(model, TOKENS), logits(base, TOKENS))  # adapters still the identity
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in adapters.items())  # adapter tensors kept their values
    for name, layer in lora_modules(model).items():
        if dora:  # the magnitude follows the loaded weight: its row norms, not the random base's
            norms = torch.linalg.vector_norm(state[f"{name}.weight"], dim=1)
            torch.testing.assert_close(layer.magnitude.detach(), norms, rtol=0, atol=1e-6)


def test_dora_built_on_meta_is_the_identity_of_its_materialised_base_before_any_load():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = TinyModel()
    apply_lora(model, LoRAConfig(r=4, targets=["qkv", "fc1"], use_dora=True))
    _materialize_distributed_module(model, torch.device("cpu"))
    for layer in lora_modules(model).values():  # the base was reset after the layer: the magnitude follows it
        norms = torch.linalg.vector_norm(layer.original_module.weight.detach(), dim=1)
        assert torch.isfinite(layer.magnitude).all()
        torch.testing.assert_close(layer.magnitude.detach(), norms, rtol=0, atol=1e-6)
        x = torch.randn(3, layer.original_module.in_features)
        torch.testing.assert_close(layer(x), layer.original_module(x), rtol=0, atol=1e-6)


def test_a_missing_base_weight_and_an_unexpected_key_still_fail_strict_loading():
    base, state = pretrained(llama)
    model = llama()
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.q_proj.weight"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "model.layers.1.self_attn.q_proj.original_module.weight"'):
        model.load_state_dict(missing)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "model.layers.0.self_attn.q_proj.weight_typo"'):
        model.load_state_dict({**state, "model.layers.0.self_attn.q_proj.weight_typo": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.self_attn.q_proj.original_module.weight"):
        model.load_state_dict({**state, "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    adapted = dict(before)  # by the adapted names, an adapter tensor is not optional
    adapted.pop("model.layers.0.self_attn.q_proj.matrix_A.weight")
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "model.layers.0.self_attn.q_proj.matrix_A.weight"'):
        model.load_state_dict(adapted)


def test_the_base_models_name_wins_where_both_are_given_as_set_model_state_dict_passes_them():
    base, state = pretrained(llama)
    model = llama()
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj"]))
    both = {**model.state_dict(), **state}  # the adapted names hold the random base
    model.load_state_dict(both)
    assert torch.equal(logits(model, TOKENS), logits(base, TOKENS))


def test_set_model_state_dict_takes_the_base_models_names_but_keeps_what_the_state_dict_lacks():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    torch.manual_seed(0)
    base = TinyModel()
    state = base.state_dict()
    tokens = torch.randint(0, 32, (2, 6))
    full = StateDictOptions(full_state_dict=True)
    for given, loaded in ((state, True), ({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}, False)):
        torch.manual_seed(1)
        model = TinyModel()
        apply_lora(model, LoRAConfig(r=4, targets=["qkv"]))
        result = set_model_state_dict(model, given, options=full)
        assert result.missing_keys == [] and torch.equal(model(tokens), base(tokens)) == loaded  # README: not strict


def test_a_merged_layer_refuses_base_weights_and_load_base_weights_checks_its_argument():
    _, state = pretrained(llama)
    model = llama()
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj"]))
    merge_lora(model)
    with pytest.raises(RuntimeError, match="cannot load base weights into 'model.layers.0.self_attn.q_proj' while its adapter "
                                           "is merged.*unmerge first"):
        model.load_state_dict(state)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(merged)  # its own state, by the adapted names, still loads
    with pytest.raises(TypeError, match="state_dict must be a mapping of names to tensors, got list"):
        load_base_weights(model, list(state.items()))


def test_load_base_weights_on_one_device_is_load_state_dict():
    base, state = pretrained(llama)
    model = llama()
    apply_lora(model, LoRAConfig(r=4, targets=["all-linear"], use_dora=True))
    result = load_base_weights(model, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(model, TOKENS), logits(base, TOKENS))


def test_load_from_checkpoint_of_the_base_models_checkpoint_into_a_class_that_adapts_itself(tmp_path):
    import lightning as L
    from lightning_models import Classifier, data

    class Adapted(Classifier):
        def __init__(self):
            super().__init__()
            apply_lora(self, LoRAConfig(r=4, targets=["qkv", "fc1"], use_dora=True))

    torch.manual_seed(0)
    base = Classifier()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(base, data())  # a Lightning checkpoint of the base model, by its own names
    trainer.save_checkpoint(tmp_path / "base.ckpt")
    torch.manual_seed(1)
    adapted = Adapted.load_from_checkpoint(tmp_path / "base.ckpt")  # strict
    tokens = torch.randint(0, 32, (4, 6))
    assert torch.equal(adapted(tokens), base(tokens))


def _run_meta_built(folder, world, variant, pretrained_state):
    """tests/meta_init_run.py on ``world`` processes (Lightning launches the others): its exit and stderr."""
    from pathlib import Path

    torch.save(pretrained_state, folder / "pretrained.pt")
    script = Path(__file__).parent / "meta_init_run.py"
    done = run_script(script, folder, world, variant)
    return done.returncode, done.stderr


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_model_built_on_meta_under_model_parallel_strategy_loads_pretrained_weights_and_trains_on_two_processes(tmp_path, variant):
    torch.manual_seed(0)
    base = TinyModel()
    code, err = _run_meta_built(tmp_path, 2, variant, base.state_dict())
    assert code == 0, err[-5000:]
    tokens = torch.randint(0, 32, (32, 6), generator=torch.Generator().manual_seed(0))
    expected = base(tokens[:4]).detach()
    for rank in (0, 1):  # right after the load, the sharded adapted model computes the pretrained base
        torch.testing.assert_close(torch.load(tmp_path / f"start.rank{rank}.pt", weights_only=True), expected, rtol=0, atol=1e-6)
    end = [torch.load(tmp_path / f"end.rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert end[0]["adapters"].keys() == end[1]["adapters"].keys()
    assert all(torch.equal(end[0]["adapters"][k], end[1]["adapters"][k]) for k in end[0]["adapters"])  # one model
    assert torch.isfinite(end[0]["losses"]).all() and torch.isfinite(end[1]["losses"]).all()
    trained_b = [v for k, v in end[0]["adapters"].items() if "matrix_B" in k]
    assert trained_b and all(v.abs().sum() > 0 for v in trained_b)
    if variant == "dora":  # trained from the pretrained weights' row norms, and finite
        assert all(torch.isfinite(v).all() for k, v in end[0]["adapters"].items() if k.endswith("magnitude"))


def test_a_pretrained_state_dict_missing_a_base_weight_fails_the_run_under_model_parallel_strategy(tmp_path):
    torch.manual_seed(0)
    state = TinyModel().state_dict()
    state.pop("blocks.1.mlp.fc1.weight")
    code, err = _run_meta_built(tmp_path, 1, "lora", state)
    assert code != 0 and 'Missing key(s) in state_dict: "blocks.1.mlp.fc1.original_module.weight"' in err, err[-3000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

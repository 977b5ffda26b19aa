import pytest
import torch
from conftest import TinyModel, randomize_adapters
from torch import nn

from lightning_lora import (
    LoRA,
    LoRAConfig,
    apply_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    lora_summary,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

ATTENTION = ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"r": 0}, ValueError, "r must be a positive integer, got 0"),
        ({"r": "abc"}, TypeError, r"r must be a positive integer, got 'abc' \(str\)"),
        ({"r": True}, TypeError, "r must be a positive integer, got True"),
        ({"alpha": -1}, ValueError, "alpha must be a positive finite number, got -1"),
        ({"bias": "maybe"}, TypeError, "bias must be True, False or 'auto', got 'maybe'"),
        ({"targets": "qkv"}, TypeError, "targets must be a list of module name patterns, got 'qkv'"),
        ({"targets": []}, ValueError, "targets must name at least one module pattern"),
        ({"targets": ["qkv", "qkv"]}, ValueError, "targets must not repeat a pattern"),
        ({"exclude": [3]}, TypeError, "exclude must hold non-empty strings, got 3"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"rank_pattern": {"qkv": 0}}, ValueError, r"rank_pattern\['qkv'\] must be a positive integer, got 0"),
        ({"alpha_pattern": ["qkv"]}, TypeError, "alpha_pattern must be a mapping from module pattern to value"),
        ({"use_rslora": 1}, TypeError, "use_rslora must be True or False, got 1"),
        ({"adapter_dtype": "fp32"}, ValueError, r"adapter_dtype must be None or one of .*got 'fp32'"),
        ({"targets": ["re:(["]}, ValueError, r"targets pattern 're:\(\[' is not a valid regular expression"),
        ({"exclude": ["re:a)"]}, ValueError, r"exclude pattern 're:a\)' is not a valid regular expression"),
        ({"trainable": ["re:*"]}, ValueError, r"trainable pattern 're:\*' is not a valid regular expression"),
        ({"rank_pattern": {"re:[": 2}}, ValueError, r"rank_pattern pattern 're:\[' is not a valid regular expression"),
        ({"alpha_pattern": {"re:(": 2}}, ValueError, r"alpha_pattern pattern 're:\(' is not a valid regular expression"),
    ],
)
def test_config_rejects_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoRAConfig(**kwargs)


def test_config_per_layer_overrides_and_rslora():
    config = LoRAConfig(r=4, alpha=8, rank_pattern={"fc1": 16}, alpha_pattern={"re:.*fc2": 2})
    assert config.scaling_for("blocks.0.attn.qkv") == 2.0
    assert (config.rank_for("blocks.0.mlp.fc1"), config.scaling_for("blocks.0.mlp.fc1")) == (16, 0.5)
    assert config.scaling_for("blocks.0.mlp.fc2") == 0.5
    assert LoRAConfig(r=16, alpha=8, use_rslora=True).scaling_for("x") == 2.0
    assert LoRAConfig(adapter_dtype=torch.float32).adapter_dtype == "float32"
    assert LoRAConfig(**LoRAConfig(targets=["qkv"]).to_dict()) == LoRAConfig(targets=["qkv"])


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["blocks.0.attn.qkv"], ["blocks.0.attn.qkv"]),
        (["qkv"], ATTENTION),
        (["attn.qkv"], ATTENTION),
        (["blocks.*.attn.qkv"], ATTENTION),
        (["re:blocks\\.[01]\\.attn\\.qkv"], ATTENTION),
        (["embed"], ["embed"]),
    ],
)
def test_target_patterns(tiny_model, targets, expected):
    assert apply_lora(tiny_model, LoRAConfig(targets=targets)) == expected
    assert list(lora_modules(tiny_model)) == expected


def test_all_linear_with_exclude_and_trainable_head(tiny_model):
    names = apply_lora(tiny_model, LoRAConfig(exclude=["fc2"], trainable=["head"]))
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1")]
    assert tiny_model.head.weight.requires_grad
    assert "head.weight" in lora_state_dict(tiny_model)
    assert "head.weight" not in lora_state_dict(tiny_model, include_trainable=False)


def test_unmatched_target_lists_closest_names(tiny_model):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"targets pattern 'qvk' matched no module; closest names: 'blocks.0.attn.qkv'"):
        apply_lora(tiny_model, LoRAConfig(targets=["proj", "qvk"]))
    assert not lora_modules(tiny_model)
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in tiny_model.state_dict().items())


def test_unsupported_module_type_is_a_type_error(tiny_model):
    with pytest.raises(TypeError, match=r"cannot adapt module 'blocks.0.norm' of type LayerNorm: LoRA supports Linear"):
        apply_lora(tiny_model, LoRAConfig(targets=["qkv", "norm"]))
    assert not lora_modules(tiny_model)


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (LoRAConfig(exclude=["nothing_like_this"]), ValueError, "exclude pattern 'nothing_like_this' matched no module"),
        (LoRAConfig(rank_pattern={"fc9": 2}), ValueError, "rank_pattern pattern 'fc9' matched no module"),
        (LoRAConfig(targets=["head"], trainable=["head"]), ValueError, "matched by both targets and trainable"),
        (LoRAConfig(targets=["qkv"], exclude=["qkv"]), ValueError, "removed every module matched by targets"),
    ],
)
def test_bad_selections(tiny_model, config, error, message):
    with pytest.raises(error, match=message):
        apply_lora(tiny_model, config)
    assert not lora_modules(tiny_model)


def test_multihead_attention_out_proj():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    assert apply_lora(model, LoRAConfig()) == ["fc"]
    with pytest.raises(TypeError, match="reads out_proj's weight directly"):
        apply_lora(nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2)}), LoRAConfig(targets=["out_proj"]))


def test_tied_weights_are_refused():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "out": nn.Linear(4, 10, bias=False)})
    model["out"].weight = model["embed"].weight
    with pytest.raises(ValueError, match="share one weight"):
        apply_lora(model, LoRAConfig(targets=["embed", "out"]))
    apply_lora(model, LoRAConfig(targets=["out"], bias=False))
    with pytest.raises(ValueError, match=r"cannot merge module 'out': its weight is shared with \['embed.weight'"):
        merge_lora(model)


def test_apply_is_idempotent_and_rejects_other_settings(tiny_model, tokens):
    config = LoRAConfig(r=2, targets=["qkv"])
    names = apply_lora(tiny_model, config)
    randomize_adapters(tiny_model)
    before = tiny_model(tokens)
    assert apply_lora(tiny_model, config) == names
    assert torch.equal(tiny_model(tokens), before)
    assert isinstance(tiny_model.blocks[0].attn["qkv"].original_module, nn.Linear)
    with pytest.raises(ValueError, match=r"module 'blocks.0.attn.qkv' is already adapted with other settings: r=2 \(now 8\)"):
        apply_lora(tiny_model, LoRAConfig(r=8, targets=["qkv", "fc1"]))
    assert list(lora_modules(tiny_model)) == names


def test_gradients_reach_only_adapters_and_trainable(tiny_model, tokens):
    apply_lora(tiny_model, LoRAConfig(targets=["qkv", "fc1", "embed"], trainable=["head"]))
    randomize_adapters(tiny_model)
    tiny_model(tokens).sum().backward()
    trainable = {id(p) for p in lora_parameters(tiny_model)}
    for name, param in tiny_model.named_parameters():
        if id(param) in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name
    summary = lora_summary(tiny_model)
    assert summary.trainable == sum(p.numel() for p in lora_parameters(tiny_model))
    assert "adapted modules" in str(summary)


def test_state_dict_keys_are_clean_and_selected_by_type(tiny_model):
    tiny_model.lora_head = nn.Linear(3, 3)  # a user module whose name contains "lora" must not leak in
    apply_lora(tiny_model, LoRAConfig(targets=["qkv"]))
    compiled = torch.compile(tiny_model)
    keys = set(lora_state_dict(compiled))
    assert keys == {f"blocks.{i}.attn.qkv.{m}.weight" for i in range(2) for m in ("matrix_A", "matrix_B")}  # no bias by default
    assert set(lora_modules(compiled)) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}


@pytest.mark.parametrize("bias", [True, False])
def test_merge_and_unload_round_trip_strict(bias, tokens):
    model = TinyModel()
    reference = TinyModel()
    original_keys = list(model.state_dict())
    apply_lora(model, LoRAConfig(bias=bias, targets=["all-linear", "embed"]))
    randomize_adapters(model)
    expected = model(tokens)
    merge_and_unload(model)
    assert not lora_modules(model)
    assert list(model.state_dict()) == original_keys
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    reference.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(reference(tokens), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_a_bias_the_original_lacks():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    apply_lora(model, LoRAConfig(r=2, bias=True))
    with pytest.raises(ValueError, match=r"cannot unload modules \['0'\]: their adapters have a bias"):
        merge_and_unload(model)
    assert isinstance(model[0], LoRA) and not model[0].merged


def test_merge_lora_is_all_or_nothing(tokens):
    model = TinyModel()
    apply_lora(model, LoRAConfig(targets=["qkv"]))
    randomize_adapters(model)
    model.blocks[1].attn["qkv"].merge()
    with pytest.raises(RuntimeError, match="cannot merge module 'blocks.1.attn.qkv': LoRA is already merged"):
        merge_lora(model)
    assert not model.blocks[0].attn["qkv"].merged
    with pytest.raises(RuntimeError, match=r"cannot unmerge: modules \['blocks.0.attn.qkv'\] are not merged"):
        unmerge_lora(model)
    model.blocks[1].attn["qkv"].unmerge()
    expected = model(tokens)
    merge_lora(model)
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_apply_lora_needs_a_config_object(tiny_model):
    with pytest.raises(TypeError, match="config must be a LoRAConfig, got dict"):
        apply_lora(tiny_model, {"r": 4})


def test_new_adapters_take_the_mode_of_the_module_they_wrap(tiny_model, tokens):
    tiny_model.eval()
    apply_lora(tiny_model, LoRAConfig(targets=["qkv"], dropout=0.5))
    randomize_adapters(tiny_model)
    assert not any(adapter.training for adapter in lora_modules(tiny_model).values())
    assert torch.equal(tiny_model(tokens), tiny_model(tokens))  # no dropout at inference
    tiny_model.train()
    assert all(adapter.dropout.training for adapter in lora_modules(tiny_model).values())


def test_plan_changes_nothing_and_install_can_be_undone(tiny_model, tokens):
    from lightning_lora.surgery import install, lora_config, plan_adapters

    before_modules = [type(m) for m in tiny_model.modules()]
    flags = [p.requires_grad for p in tiny_model.parameters()]
    plan = plan_adapters(tiny_model, LoRAConfig(r=2, targets=["qkv"], rank_pattern={"blocks.1.attn.qkv": 4}))
    assert [type(m) for m in tiny_model.modules()] == before_modules
    assert {name: spec.r for name, spec in plan.specs.items()} == {"blocks.0.attn.qkv": 2, "blocks.1.attn.qkv": 4}
    assert plan.specs["blocks.0.attn.qkv"].adapter_dtype == "float32"
    installed = install(tiny_model, plan)
    assert list(installed.created) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert lora_config(tiny_model) == plan.config
    installed.undo()
    assert [type(m) for m in tiny_model.modules()] == before_modules
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert lora_config(tiny_model) is None


def test_config_targets_none_means_the_models_declaration(tiny_model):
    assert LoRAConfig().targets_for(None) == ["all-linear"]
    tiny_model.lora_targets = ["fc1"]
    assert apply_lora(tiny_model, LoRAConfig()) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]


def test_every_adapter_lists_its_own_parameters():
    from lightning_lora.adapters import LoRAConv, LoRAEmbedding

    layers = [LoRA(nn.Linear(4, 5)), LoRAConv(nn.Conv2d(2, 3, 3), r=2, bias=False), LoRAEmbedding(nn.Embedding(7, 4))]
    for layer in layers:
        params = layer.adapter_params()
        assert {id(p) for p in params.values()} == {
            id(p) for name, p in layer.named_parameters() if not name.startswith("original_module.")
        }
        state = layer.state_dict()
        assert all(torch.equal(state[key], param) for key, param in params.items())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kind": "lstm"}, r"kind must be one of \['linear', 'transformers_conv1d', 'conv', 'embedding', 'experts', 'experts_transposed'\], got 'lstm'"),
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"alpha": "8"}, r"alpha must be a positive number, got '8' \(str\)"),
        ({"adapter_dtype": "int8"}, r"adapter_dtype must be one of .*got 'int8'"),
    ],
)
def test_adapter_spec_validates_every_field(values, message):
    from lightning_lora.adapters import AdapterSpec

    good = {"kind": "linear", "r": 4, "alpha": 8.0, "bias": True, "dropout": 0.0, "use_rslora": False, "adapter_dtype": "float32"}
    spec = AdapterSpec(**good)
    assert AdapterSpec.from_dict(spec.to_dict()) == spec and spec.scaling == 2.0
    with pytest.raises((TypeError, ValueError), match=message):
        AdapterSpec(**{**good, **values})
    with pytest.raises(ValueError, match=message):
        AdapterSpec.from_dict({**good, **values})
    with pytest.raises(ValueError, match=r"an adapter spec must have the fields \['r'\]"):
        AdapterSpec.from_dict({k: v for k, v in good.items() if k != "r"})


def test_explicit_settings_and_reconcile_without_lightning():
    from lightning_lora.config import explicit_settings, reconcile

    stored = LoRAConfig(r=2, alpha=8, targets=["qkv"])
    assert explicit_settings({"r": 8, "alpha": 16.0, "exclude": (), "rank_pattern": None, "use_rslora": 1}) == {"use_rslora": 1}
    assert explicit_settings({"exclude": [], "rank_pattern": {}, "bias": False}) == {}
    assert explicit_settings({"bias": True}) == {"bias": True}
    assert reconcile(stored, {}, "adapter_path 'a'") is stored
    assert reconcile(stored, {"r": 2, "targets": ("qkv",)}, "adapter_path 'a'") is stored
    with pytest.raises(ValueError, match=r"adapter_path 'a' was trained with other settings: alpha=16.0 \(file: 8.0\)"):
        reconcile(stored, {"alpha": 16}, "adapter_path 'a'")
    inner = LoRAConfig(targets=["blocks.0.qkv"], trainable=["head"], rank_pattern={"blocks.0.qkv": 8})
    under_model = {"trainable": ["model.head"], "targets": ["model.blocks.0.qkv"], "rank_pattern": {"model.blocks.0.qkv": 8}}
    assert reconcile(inner, under_model, "adapter_path 'a'", root="model") is inner  # names under adapter_root
    with pytest.raises(ValueError, match=r"trainable=\['model.head'\] \(file: \['head'\]\)"):
        reconcile(inner, {"trainable": ["model.head"]}, "adapter_path 'a'")


@pytest.mark.parametrize("bias", [True, False])
def test_param_shapes_are_known_before_allocation(bias):
    from lightning_lora.adapters import AdapterSpec, build_adapter, kind_named

    modules = {
        "linear": nn.Linear(6, 5),
        "conv": nn.Conv2d(4, 6, (3, 2), groups=2),
        "conv1d": nn.Conv1d(3, 2, 3),
        "embedding": nn.Embedding(7, 5, padding_idx=0),
    }
    for name, module in modules.items():
        kind = "conv" if name.startswith("conv") else name
        spec = AdapterSpec(kind=kind, r=2, alpha=1.0, bias=bias, dropout=0.0, use_rslora=False, adapter_dtype="float32")
        layer = build_adapter(module, spec, name)
        actual = {key: tuple(param.shape) for key, param in layer.adapter_params().items()}
        assert kind_named(kind).shapes(module, spec) == actual, name


def test_all_linear_leaves_out_the_output_layer_and_warns_on_output_only_targets(tiny_model):
    assert "head" not in apply_lora(tiny_model, LoRAConfig(targets=["all-linear"]))
    lone = nn.Sequential(nn.Linear(4, 4))
    assert apply_lora(lone, LoRAConfig(r=2, targets=["all-linear"])) == ["0"]  # a lone linear layer is the model
    with pytest.warns(UserWarning, match=r"targets select only output or tied layers \['head'\]"):
        apply_lora(TinyModel(), LoRAConfig(targets=["head"]))
    tied = nn.ModuleDict({"embed": nn.Embedding(10, 4), "mid": nn.Linear(4, 4), "out": nn.Linear(4, 10, bias=False)})
    tied["out"].weight = tied["embed"].weight
    with pytest.warns(UserWarning, match=r"only output or tied layers \['out'\]"):
        apply_lora(tied, LoRAConfig(targets=["out"], bias=False))

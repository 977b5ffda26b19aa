"""Adapter kinds and variants as plug-ins: a user's layer type, a kind and a variant defined here alone.

- ``MyLinear``, a layer of this file with its own forward, registered with the built-in ``linear``
  kind by one call, goes through ``apply_lora``, adapter files, merge/unmerge, ``Trainer.fit`` with
  ``LoRACallback`` and the PEFT export like an ``nn.Linear``;
- ``HeadKind`` is a new kind for ``HeadLinear``, whose weight is 3-D ``(heads, head_dim, in)``;
- ``Gated`` is a new variant: a trained gate on the update.
"""

import json
import math

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_lora import (
    LoRACallback,
    LoRAConfig,
    apply_lora,
    export_peft,
    load_adapter,
    lora_modules,
    merge_and_unload,
    merge_lora,
    register_adapter_kind,
    save_adapter,
    unmerge_lora,
)
from lightning_lora.adapters import LoRA, LoRABase, Variant, register_variant, registry
from lightning_lora.adapters.base import ZeroLinear
from lightning_lora.surgery import AdapterPlan, install, plan_adapters


class MyLinear(nn.Module):
    """A user's linear layer: weight (out, in), its own forward (no nn.Linear anywhere)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x):
        return torch.einsum("...i,oi->...o", x, self.weight) + self.bias


class HeadLinear(nn.Module):
    """A projection to several heads whose weight is held (heads, head_dim, in): a layout no built-in kind has."""

    def __init__(self, in_features, heads, head_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, head_dim, in_features) / math.sqrt(in_features))

    def forward(self, x):  # (..., in) -> (..., heads * head_dim)
        return torch.einsum("...i,hdi->...hd", x, self.weight).flatten(-2)


class HeadKind(LoRABase):
    """The kind of HeadLinear: A (in -> r), B (r -> heads * head_dim); the update merges into the 3-D weight."""

    kind = "head_linear"
    all_linear = True

    def create(self, spec):
        heads, head_dim, in_features = self.original_module.weight.shape
        self.matrix_A = nn.Linear(in_features, spec.r, bias=False, **self.factory)
        self.matrix_B = ZeroLinear(spec.r, heads * head_dim, bias=False, **self.factory)

    @classmethod
    def param_shapes(cls, original_module, spec):
        heads, head_dim, in_features = original_module.weight.shape
        return {"matrix_A.weight": (spec.r, in_features), "matrix_B.weight": (heads * head_dim, spec.r)}

    def update(self, x):
        return self.matrix_B(self.matrix_A(self.dropout(x)))

    def delta_weight(self):
        delta = self.scaling * (self.matrix_B.weight.float() @ self.matrix_A.weight.float())
        return delta.reshape(self.original_module.weight.shape)


class Gated(Variant):
    """A variant with a trained gate per layer on the update: ``base(x) + gate * scaling * B A x``."""

    name = "gated"

    def __init__(self, layer):
        super().__init__(layer)
        layer.register_parameter("gate", nn.Parameter(torch.empty((), **layer.factory)))

    @classmethod
    def param_shapes(cls, kind, original_module, spec):
        return {"gate": ()}

    def params(self):
        return {"gate": self.layer.gate}

    def reset(self):
        nn.init.ones_(self.layer.gate)

    def forward(self, x):
        layer = self.layer
        return layer.original_module(x) + layer.gate * layer.scaling * layer.update(x)

    def merged(self, weight, delta):
        return weight + self.layer.gate.detach().float() * delta

    def merged_bias(self, delta):
        return self.layer.gate.detach().float() * delta

    def unmerged(self, merged, delta):
        return merged - self.layer.gate.detach().float() * delta


@pytest.fixture(autouse=True)
def registry_restored():
    """Each test registers what it needs; the registry is as it was afterwards."""
    saved = [dict(table) for table in (registry._KINDS, registry._TYPES, registry._VARIANTS)]
    yield
    for table, before in zip((registry._KINDS, registry._TYPES, registry._VARIANTS), saved):
        table.clear()
        table.update(before)


class Net(nn.Module):
    def __init__(self, layer=MyLinear):
        super().__init__()
        self.inner = layer(8, 12) if layer is MyLinear else layer(8, 3, 4)
        self.act = nn.GELU()
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(self.act(self.inner(x)))


def _trained(model):
    """Non-zero adapters, as after training."""
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            for key, param in adapter.adapter_params().items():
                param.add_(torch.randn_like(param) * 0.3) if key != "gate" else param.fill_(0.7)


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def test_an_unregistered_layer_type_is_refused_naming_register_adapter_kind():
    with pytest.raises(TypeError, match=r"cannot adapt module 'inner' of type MyLinear: LoRA supports Linear, .*"
                                        r"register other layer types with lightning_lora.register_adapter_kind\(MyLinear, kind\)"):
        apply_lora(Net(), LoRAConfig(targets=["inner"]))


def test_a_users_linear_registered_with_one_call_goes_through_everything(tmp_path):
    register_adapter_kind(MyLinear, "linear")
    torch.manual_seed(0)
    model = Net()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(X)
    assert apply_lora(model, LoRAConfig(r=4, alpha=8, bias=True, targets=["all-linear"])) == ["inner"]  # all-linear takes it
    adapter = lora_modules(model)["inner"]
    assert type(adapter) is LoRA and torch.equal(model(X), plain)  # the identity at init
    _trained(model)
    adapted = model(X)
    inner = model.inner.original_module  # the same update, computed by hand
    hidden = inner(X) + adapter.scaling * adapter.matrix_B(adapter.matrix_A(X))
    expected = model.out(model.act(hidden))
    torch.testing.assert_close(adapted, expected)

    merge_lora(model)
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    assert torch.equal(model.inner.original_module.weight, base["inner.weight"])  # bit for bit
    assert torch.equal(model.inner.original_module.bias, base["inner.bias"])

    save_adapter(model, tmp_path / "mine.lora.safetensors")
    fresh = Net()
    fresh.load_state_dict(base)
    load_adapter(fresh, tmp_path / "mine.lora.safetensors")
    assert torch.equal(fresh(X), adapted)
    merged = merge_and_unload(fresh)
    assert type(merged.inner) is MyLinear
    torch.testing.assert_close(merged(X), adapted, rtol=1e-5, atol=1e-6)

    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert config["target_modules"] == ["inner"] and set(tensors) == {
        "base_model.model.inner.lora_A.weight", "base_model.model.inner.lora_B.weight", "base_model.model.inner.lora_B.bias"
    }


class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_a_users_linear_trains_with_the_callback(tmp_path):
    register_adapter_kind(MyLinear, "linear")
    torch.manual_seed(0)
    module = _Module()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 8)), batch_size=8)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LoRACallback(r=2, alpha=4, targets=["inner"])])
    trainer.fit(module, data)
    adapter = lora_modules(module)["net.inner"]
    assert adapter.matrix_B.weight.abs().sum() > 0  # trained
    assert torch.equal(adapter.original_module.weight, base["net.inner.weight"])  # frozen
    (companion,) = tmp_path.rglob("*.lora.safetensors")  # the checkpoint's adapter file
    fresh = _Module()
    fresh.load_state_dict(base)
    load_adapter(fresh, companion)
    assert torch.equal(fresh.net(X), module.net(X))


def test_a_kind_of_ones_own_for_a_new_layout(tmp_path):
    register_adapter_kind(HeadLinear, HeadKind)
    torch.manual_seed(0)
    model = Net(HeadLinear)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(X)
    assert apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["inner"], bias=False)) == ["inner"]
    assert torch.equal(model(X), plain)
    _trained(model)
    adapted = model(X)
    merge_lora(model)
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    assert torch.equal(model.inner.original_module.weight, base["inner.weight"])
    save_adapter(model, tmp_path / "heads.lora.safetensors")
    fresh = Net(HeadLinear)
    fresh.load_state_dict(base)
    load_adapter(fresh, tmp_path / "heads.lora.safetensors")
    assert torch.equal(fresh(X), adapted)
    with pytest.raises(ValueError, match=r"adapters of kind 'head_linear' have no PEFT format"):
        export_peft(model, tmp_path / "peft")


def test_registration_errors_name_what_is_wrong():
    with pytest.raises(TypeError, match=r"layer_type must be an nn.Module subclass, got 3 \(int\)"):
        register_adapter_kind(3, "linear")
    with pytest.raises(ValueError, match=r"kind must be one of \['linear', 'transformers_conv1d', 'conv', 'embedding', 'experts', 'experts_transposed'\], got 'linaer'"):
        register_adapter_kind(MyLinear, "linaer")
    with pytest.raises(TypeError, match=r"kind must be a kind's name or a subclass of LoRABase, got <class 'int'>"):
        register_adapter_kind(MyLinear, int)

    class Incomplete(LoRABase):
        kind = "incomplete"

    with pytest.raises(ValueError, match=r"kind Incomplete must implement \['create', 'param_shapes', 'update', 'delta_weight'\]"):
        register_adapter_kind(MyLinear, Incomplete)

    class Clash(HeadKind):
        kind = "linear"

    with pytest.raises(ValueError, match=r"kind name 'linear' is taken by LoRA, got Clash"):
        register_adapter_kind(HeadLinear, Clash)
    register_adapter_kind(MyLinear, "linear")
    register_adapter_kind(MyLinear, "linear")  # the same registration again changes nothing
    with pytest.raises(ValueError, match=r"layer_type MyLinear is registered already with kind 'linear' \(LoRA\), got kind 'conv'"):
        register_adapter_kind(MyLinear, "conv")
    with pytest.raises(ValueError, match=r"layer_type Linear is registered already with kind 'linear'"):
        register_adapter_kind(nn.Linear, HeadKind)


def test_a_variant_of_ones_own(tmp_path):
    register_variant(Gated)
    torch.manual_seed(0)
    model = Net(nn.Linear)
    model.inner = nn.Linear(8, 12)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(X)
    plan = plan_adapters(model, LoRAConfig(r=2, alpha=4, bias=True, targets=["inner"]))
    gated = AdapterPlan({name: type(spec)(**{**spec.__dict__, "variant": "gated"}) for name, spec in plan.specs.items()},
                        plan.config, plan.trainable)
    install(model, gated)
    layer = lora_modules(model)["inner"]
    assert layer.variant.name == "gated" and set(layer.adapter_params()) == {
        "matrix_A.weight", "matrix_A.bias", "matrix_B.weight", "matrix_B.bias", "gate"
    }
    assert torch.equal(model(X), plain)
    _trained(model)
    adapted = model(X)
    hidden = layer.original_module(X) + 0.7 * layer.scaling * layer.matrix_B(layer.matrix_A(X))
    torch.testing.assert_close(adapted, model.out(model.act(hidden)))
    merge_lora(model)
    torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    assert torch.equal(layer.original_module.weight, base["inner.weight"])
    save_adapter(model, tmp_path / "gated.lora.safetensors")
    stored = json.loads(load_file_metadata(tmp_path / "gated.lora.safetensors")["modules"])["inner"]
    assert stored["variant"] == "gated" and stored["use_dora"] is False and stored["shapes"]["gate"] == []
    fresh = Net(nn.Linear)
    fresh.inner = nn.Linear(8, 12)
    fresh.load_state_dict(base)
    load_adapter(fresh, tmp_path / "gated.lora.safetensors")
    assert torch.equal(fresh(X), adapted)
    with pytest.raises(ValueError, match=r"PEFT has no LoRA variant 'gated'; the adapter cannot be exported"):
        export_peft(model, tmp_path / "peft")


def test_variant_errors():
    with pytest.raises(TypeError, match=r"variant must be a subclass of Variant, got 3"):
        register_variant(3)

    class Nameless(Variant):
        pass

    with pytest.raises(ValueError, match=r"variant Nameless must have a non-empty name, got ''"):
        register_variant(Nameless)
    with pytest.raises(ValueError, match=r"variant must be None or one of \['dora'\], got 'gated'"):
        LoRA(nn.Linear(4, 4), variant="gated")  # not registered in this test
    register_variant(Gated)
    with pytest.raises(ValueError, match=r"use_dora=True and variant='gated' contradict each other"):
        LoRA(nn.Linear(4, 4), use_dora=True, variant="gated")


def load_file_metadata(path):
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]

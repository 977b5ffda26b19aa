"""Unit tests of clean module names (naming) and of planning (plan), without training anything."""

import pytest
import torch
from conftest import TinyModel
from torch import nn

from lightning_lora import LoRAConfig, apply_lora, lora_modules
from lightning_lora.naming import absolute, relative, resolve_root, sites, walk
from lightning_lora.surgery import install, plan_adapters
from lightning_lora.surgery.plan import output_layers, quantizable, survey


class Wrapped(nn.Module):
    """Stands for torch.compile's and activation checkpointing's wrappers: they hold the module under a
    name that never appears in clean names."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


class DistributedDataParallel(nn.Module):  # recognised by class name, as DDP's own
    def __init__(self, inner):
        super().__init__()
        self.module = inner


def test_clean_names_see_through_wrappers_and_the_innermost_module_wins():
    model = TinyModel()
    wrapped = DistributedDataParallel(Wrapped(model))
    assert list(sites(wrapped)) == list(sites(model))
    assert sites(wrapped)["blocks.0.attn.qkv"].module is model.blocks[0].attn["qkv"]
    assert all(site.module is not wrapped for site in sites(wrapped).values())


def test_walk_visits_shared_modules_once_parents_first_and_base_view_names_the_original():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.ReLU())})
    assert [site.name for site in walk(model)] == ["", "a", "b", "b.1"]  # "b.0" is "a", visited once
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Sequential(nn.Linear(4, 4), nn.ReLU())})
    apply_lora(model, LoRAConfig(r=2, targets=["a"]))
    adapter = model["a"]
    assert [(site.name, site.module) for site in walk(model, base_view=True)][1:3] == [("a", adapter), ("a", adapter.original_module)]
    assert [site.name for site in walk(model, into_adapters=False)] == ["", "a", "b", "b.0", "b.1"]
    assert "a.matrix_A" in [site.name for site in walk(model)]


def test_relative_absolute_and_root():
    model = nn.ModuleDict({"model": TinyModel()})
    assert relative("model.blocks.0", "model") == "blocks.0" and relative("head", "model") is None
    assert absolute("blocks.0", "model") == "model.blocks.0" and absolute("x", "") == "x"
    assert resolve_root(model, model["model"]) == "model" and resolve_root(model, None) == ""
    with pytest.raises(ValueError, match=r"root must name a module of the model, got 'modle'"):
        resolve_root(model, "modle")
    with pytest.raises(ValueError, match=r"root must be a submodule of the model, got a Linear that is not part of it"):
        resolve_root(model, nn.Linear(1, 1))
    with pytest.raises(TypeError, match=r"root must be a module name, a module or None, got 3 \(int\)"):
        resolve_root(model, 3)


def test_a_plan_changes_nothing_and_install_carries_it_out():
    model = TinyModel()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    plan = plan_adapters(model, LoRAConfig(r=2, targets=["qkv"], trainable=["head"]))
    assert list(plan.specs) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and plan.trainable == ("head",)
    assert all(spec.kind == "linear" and spec.r == 2 and not spec.bias for spec in plan.specs.values())
    assert model.state_dict(keep_vars=True) == before and not lora_modules(model)  # nothing changed
    assert all(p.requires_grad for p in model.parameters())
    installation = install(model, plan)
    assert list(installation.adapters) == list(plan.specs) and set(installation.trainable) == {"head"}
    assert installation.summary.modules == list(plan.specs)
    assert installation.summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    installation.undo()
    assert model.state_dict(keep_vars=True) == before and all(p.requires_grad for p in model.parameters())


def test_a_plan_of_an_adapted_model_keeps_its_adapters_and_a_stale_plan_looks_the_modules_up_again():
    model = TinyModel()
    plan = plan_adapters(model, LoRAConfig(targets=["qkv"]))
    model.blocks[0].attn["qkv"] = nn.Linear(16, 48)  # the model changed since it was planned
    installed = install(model, plan)
    assert installed.adapters["blocks.0.attn.qkv"].original_module is model.blocks[0].attn["qkv"].original_module
    again = plan_adapters(model, LoRAConfig(targets=["qkv"]))
    assert again.specs == plan.specs and not install(model, again).created


def test_survey_finds_output_layers_and_tied_weights():
    model = TinyModel()
    assert output_layers(model) == {"head"}  # the last linear layer of a model without a transformers head
    assert output_layers(nn.Sequential(nn.Linear(2, 2))) == set()  # a lone linear layer is the whole model

    class LM(nn.Module):  # a transformers-like model: get_output_embeddings and config mark it
        config = {}

        def __init__(self):
            super().__init__()
            self.embed, self.proj, self.lm_head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

        def get_output_embeddings(self):
            return self.lm_head

    found = survey(LM())
    assert found.outputs == {"lm_head"} and found.linear_layers() == ["proj", "lm_head"]
    assert found.tied(found.sites["lm_head"].module) and not found.tied(found.sites["proj"].module)
    assert quantizable(LM()) == []  # the output layer and the tied weight stay, proj does not fit NF4 blocks


def test_plans_refuse_what_cannot_be_installed():
    with pytest.raises(TypeError, match=r"config must be a LoRAConfig, got dict"):
        plan_adapters(TinyModel(), {"r": 4})
    attention = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
    with pytest.raises(TypeError, match=r"cannot adapt module 'attn.out_proj': nn.MultiheadAttention reads out_proj's weight"):
        plan_adapters(attention, LoRAConfig(targets=["out_proj"]))
    with pytest.raises(ValueError, match=r"exclude \['qkv'\] removed every module matched by targets \['qkv'\]"):
        plan_adapters(TinyModel(), LoRAConfig(targets=["qkv"], exclude=["qkv"]))
    model = TinyModel()
    apply_lora(model, LoRAConfig(r=2, targets=["qkv"]))
    with pytest.raises(ValueError, match=r"module 'blocks.0.attn.qkv' is already adapted with other settings: r=2 \(now 4\)"):
        plan_adapters(model, LoRAConfig(r=4, targets=["qkv"]))


def test_the_fingerprint_of_a_plan_free_model_is_stable_under_adaptation():
    from lightning_lora.formats import base_fingerprint

    model = TinyModel()
    before = base_fingerprint(model)
    apply_lora(model, LoRAConfig(targets=["all-linear"]))
    assert base_fingerprint(model) == before
    with torch.no_grad():
        model.blocks[0].norm.weight.add_(1)
    assert base_fingerprint(model) != before


def test_a_lazy_module_anywhere_is_refused_before_anything_changes():
    from lightning_lora import apply_lora, lora_modules

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"not initialised yet \(\['2'\], e.g. nn.LazyLinear"):
        apply_lora(model, LoRAConfig(r=2, targets=["0"]))
    assert not lora_modules(model) and type(model[0]) is nn.Linear and model[0].weight.requires_grad
    model(torch.randn(2, 4))  # materialised: now it adapts
    assert list(apply_lora(model, LoRAConfig(r=2, targets=["0"]))) == ["0"]

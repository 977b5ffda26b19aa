"""Every config composes and instantiates; bad overrides fail while composing, naming the key."""

import re
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict

import lightning_lora
from lightning_lora import LoRACallback

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "examples"))


def composed(overrides, tmp_path, config="config"):
    """The composed ``conf/<config>.yaml``, as the Hydra app would run it with its output in ``tmp_path``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("lora", ["default", "attention", "all_linear", "dora", "qlora", "none"])
@pytest.mark.parametrize("extra", [[], ["experiment=quick"], ["trainer=cpu"]])
def test_every_config_composes_and_instantiates(lora, extra, tmp_path):
    cfg = composed([f"lora={lora}", *extra], tmp_path)
    assert isinstance(instantiate(cfg.model), L.LightningModule)
    assert isinstance(instantiate(cfg.data), L.LightningDataModule)
    assert isinstance(instantiate(cfg.trainer), L.Trainer)
    assert instantiate(cfg.logger).save_dir == str(tmp_path)
    if lora == "none":
        assert cfg.lora is None and cfg.model.lr == 1e-3
    else:
        callback = instantiate(cfg.lora)
        assert isinstance(callback, LoRACallback)
        assert callback.config.trainable == ["model.head"]


def test_preset_values(tmp_path):
    assert composed(["lora=attention"], tmp_path).lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert composed(["lora=all_linear"], tmp_path).lora.targets == ["all-linear"]
    qlora = instantiate(composed(["lora=qlora"], tmp_path).lora).config
    assert (qlora.targets, qlora.quantize, qlora.adapter_dtype) == (["all-linear"], "nf4", "float32")
    assert instantiate(composed(["lora.quantize=nf4"], tmp_path).lora).config.quantize == "nf4"
    with pytest.raises(InstantiationException, match=r"quantize must be None or one of \['nf4'\], got 'int4'"):
        instantiate(composed(["lora.quantize=int4"], tmp_path).lora)
    dora = instantiate(composed(["lora=dora"], tmp_path).lora)
    assert dora.config.use_dora is True and dora.config.bias is False
    assert instantiate(composed(["lora.use_dora=true"], tmp_path).lora).config.use_dora is True
    callback = instantiate(composed(["lora.r=16", "lora.alpha=32", "lora.bias=false", "lora.targets=[q_proj,v_proj]"], tmp_path).lora)
    assert (callback.config.r, callback.config.alpha, callback.config.bias) == (16, 32.0, False)
    assert callback.config.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=abc", r"Value 'abc' of type 'str' could not be converted to Integer\n\s+full_key: lora.r"),
        ("lora.rank=8", r"Key 'rank' not in 'LoRACallbackConf'\n\s+full_key: lora.rank"),
    ],
)
def test_bad_overrides_fail_while_composing(override, message, tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        composed([override], tmp_path)
    assert re.search(message, str(info.value.__cause__))


def test_out_of_range_value_fails_on_instantiation(tmp_path):
    cfg = composed(["lora.alpha=-1"], tmp_path)
    with pytest.raises(InstantiationException, match=r"alpha must be a positive finite number, got -1.0"):
        instantiate(cfg.lora)
    with pytest.raises(InstantiationException, match=r"bias must be True, False or 'auto', got 'maybe'"):
        instantiate(composed(["lora.bias=maybe"], tmp_path).lora)
    for value, expected in (("true", True), ("false", False), ("auto", "auto")):
        assert instantiate(composed([f"lora.bias={value}"], tmp_path).lora).config.bias == expected


@pytest.mark.parametrize("key", ["use_rslora", "use_dora", "save_base_weights", "log_grad_norm", "log_per_layer", "merge_on_end"])
@pytest.mark.parametrize("value", ["2", "yes", "maybe", "0"])
def test_flags_are_true_or_false_and_nothing_else(key, value, tmp_path):
    cfg = composed([f"lora.{key}={value}"], tmp_path)  # OmegaConf's bool would take 2 and yes for true
    shown = repr(int(value)) if value.isdigit() else repr(value)
    with pytest.raises(InstantiationException, match=rf"{key} must be True or False, got {re.escape(shown)}"):
        instantiate(cfg.lora)
    for flag in (True, False):
        callback = instantiate(composed([f"lora.{key}={str(flag).lower()}"], tmp_path).lora)
        assert getattr(callback.config if key in ("use_rslora", "use_dora") else callback, key) is flag


def test_settings_that_do_not_go_together_fail_on_instantiation(tmp_path):
    with pytest.raises(InstantiationException, match=r"export_peft='vllm' cannot serve adapters made with use_dora=True"):
        instantiate(composed(["lora=dora", "lora.export_peft=vllm"], tmp_path).lora)
    with pytest.raises(InstantiationException, match=r"merge_on_end=True cannot merge into a quantized base"):
        instantiate(composed(["lora=qlora", "lora.merge_on_end=true"], tmp_path).lora)
    cfg = composed([], tmp_path)
    cfg.lora.rank_pattern["re:("] = 4  # as a YAML preset would hold it
    with pytest.raises(InstantiationException, match=r"rank_pattern pattern 're:\(' is not a valid regular expression"):
        instantiate(cfg.lora)


def test_users_own_app_gets_the_lora_group_from_the_package(tmp_path):
    assert lightning_lora.lightning.LoRACallbackConf  # importing the package registers lora/schema
    (tmp_path / "config.yaml").write_text("defaults:\n  - lora: schema\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("config", overrides=["lora.r=8", "lora.targets=[fc1]"])
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["lora.rank=8"])
    callback = instantiate(cfg.lora)
    assert isinstance(callback, LoRACallback)
    assert (callback.config.r, callback.config.targets) == (8, ["fc1"])


def test_dict_settings_are_overridable(tmp_path):
    cfg = composed(["lora.rank_pattern={q_proj:8}", "lora.alpha_pattern={q_proj:16}", "lora.exclude=[k_proj]"], tmp_path)
    callback = instantiate(cfg.lora)
    assert callback.config.rank_pattern == {"q_proj": 8}
    assert callback.config.alpha_pattern == {"q_proj": 16.0}
    assert callback.config.exclude == ["k_proj"]


def test_empty_targets_fail_on_instantiation(tmp_path):
    with pytest.raises(InstantiationException, match="targets must name at least one module pattern"):
        instantiate(composed(["lora.targets=[]"], tmp_path).lora)

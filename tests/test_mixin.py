import os
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import MixinClassifier, data
from test_callback import trainer

from lightning_lora import LoRACallback, lora_modules


class AdaptsInInit(MixinClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.apply_lora(r=4, alpha=8)


def _trained(tmp_path, model, *callbacks):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, checkpoint, *callbacks, max_epochs=1).fit(model, data())
    return tmp_path / "ckpt" / "last.ckpt"


def test_mixin_methods(tmp_path):
    model = AdaptsInInit()
    assert set(lora_modules(model)) == {f"net.blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1")}
    assert sum(p.numel() for p in model.lora_parameters()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all("matrix_" in key for key in model.lora_state_dict())
    tokens = next(iter(data()))[0]
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            adapter.matrix_B.weight.normal_()
    expected = model(tokens)
    model.save_adapter(tmp_path / "m.lora.safetensors")
    model.merge_lora()
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_lora()
    other = MixinClassifier()
    other.load_state_dict({k.replace(".original_module", ""): v for k, v in model.state_dict().items() if "matrix_" not in k})
    other.load_adapter(tmp_path / "m.lora.safetensors")
    assert torch.equal(other(tokens), expected)
    with pytest.raises(ValueError, match=r"pass either config or LoRAConfig fields, not both \(got \['r'\]\)"):
        MixinClassifier().apply_lora(config=object(), r=2)


def test_mixin_alone_writes_slim_checkpoints_that_load_safely(tmp_path):
    torch.manual_seed(0)
    model = AdaptsInInit()
    path = _trained(tmp_path, model)
    checkpoint = torch.load(path, weights_only=True)
    assert not any(key.endswith("original_module.weight") for key in checkpoint["state_dict"])
    torch.manual_seed(0)  # same base weights, as a user reloading their pretrained model
    restored = MixinClassifier.load_from_checkpoint(path)
    tokens = next(iter(data()))[0]
    model.eval(), restored.eval()
    assert torch.equal(restored(tokens), model(tokens))
    assert set(lora_modules(restored)) == set(lora_modules(model))


def test_slim_checkpoint_into_other_base_fails(tmp_path):
    torch.manual_seed(0)
    path = _trained(tmp_path, AdaptsInInit())
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="checkpoint was trained on different base weights"):
        MixinClassifier.load_from_checkpoint(path)


def test_only_base_weights_may_be_missing(tmp_path):
    torch.manual_seed(0)
    path = _trained(tmp_path, AdaptsInInit())
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["net.blocks.0.attn.qkv.matrix_A.weight"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"net.blocks.0.attn.qkv.matrix_A.weight\""):
        MixinClassifier.load_from_checkpoint(tmp_path / "broken.ckpt")


def test_mixin_with_callback_uses_declared_targets_and_callback_settings(tmp_path):
    model = MixinClassifier()
    path = _trained(tmp_path, model, LoRACallback(save_base_weights=True))
    assert set(lora_modules(model)) == {f"net.blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1")}
    checkpoint = torch.load(path, weights_only=True)
    assert "net.blocks.0.attn.qkv.original_module.weight" in checkpoint["state_dict"]
    assert os.path.exists(str(path).replace(".ckpt", ".lora.safetensors"))


def test_under_model_parallel_strategy_the_mixins_setup_slims_checkpoints_and_without_it_one_warning_says_the_size():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_lora.lightning import LoRACheckpointIO

    def attached(cls):
        trainer = L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), accelerator="cpu",
                            devices=1, logger=False)
        model = cls()
        model.trainer = trainer
        return trainer, model

    trainer, model = attached(MixinClassifier)
    model.setup("fit")  # wraps the strategy's checkpoint IO, save and load, as LoRACallback does
    assert isinstance(trainer.strategy.checkpoint_io, LoRACheckpointIO)
    assert "save_checkpoint" in vars(trainer.strategy) and "load_checkpoint" in vars(trainer.strategy)

    class OwnSetup(MixinClassifier):
        def setup(self, stage):  # without super().setup(stage)
            pass

    trainer, model = attached(OwnSetup)
    model.apply_lora(targets=["qkv"])
    model.setup("fit")
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    with pytest.warns(UserWarning, match=rf"LoRAMixin: checkpoints under ModelParallelStrategy keep the frozen base weights "
                                         rf"\({frozen / 2**30:.3f} GiB per checkpoint.*OwnSetup.setup does not call "
                                         rf"super\(\).setup\(stage\)"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.on_save_checkpoint({"state_dict": model.state_dict()})  # once

import csv
import os
import random
import subprocess
import sys

import lightning as L
import lightning.pytorch.cli as cli_module
import numpy
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_models import Classifier, LazyClassifier, MixinClassifier, data

import lightning_lora.lightning.metrics as metrics_module
from lightning_lora import LoRACallback, LoRAConfig, lora_modules, lora_parameters, lora_state_dict, read_adapter, save_adapter


def trainer(tmp_path, *callbacks, **kwargs):
    settings = {
        "max_epochs": 2,
        "default_root_dir": tmp_path,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "deterministic": True,
        "logger": CSVLogger(tmp_path, name="logs"),
    }
    settings.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **settings)


def csv_rows(trainer_):
    with open(os.path.join(trainer_.logger.log_dir, "metrics.csv")) as file:
        return list(csv.DictReader(file))


def adapter_values(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "matrix_" in k}


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_base_frozen_adapters_trained(tmp_path):
    model = Classifier()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, LoRACallback(r=4, alpha=8, targets=["qkv", "fc1"])).fit(model, data(), data())
    adapted = set(lora_modules(model))
    assert adapted == {f"net.blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1")}
    for key, value in model.state_dict().items():
        if "matrix_" in key:
            continue
        assert torch.equal(value, base[key.replace(".original_module", "")]), key
    assert all(torch.count_nonzero(model.state_dict()[f"{n}.matrix_B.weight"]) > 0 for n in adapted)


def test_logged_grad_norm_and_scaling(tmp_path):
    class NormRecorder(Callback):
        def __init__(self):
            self.norms = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.double().reshape(-1) for p in lora_parameters(pl_module)]
            self.norms.append(torch.cat(grads).norm().item())

    recorder = NormRecorder()
    run = trainer(tmp_path, LoRACallback(r=4, alpha=8, targets=["qkv"]), recorder, max_epochs=1, log_every_n_steps=2)
    run.fit(Classifier(), data())
    rows = [row for row in csv_rows(run) if row.get("lora/grad_norm")]
    assert [int(row["step"]) for row in rows] == [1, 3, 5, 7]
    for row in rows:
        assert float(row["lora/grad_norm"]) == pytest.approx(recorder.norms[int(row["step"])], rel=1e-5)
        assert float(row["lora/scaling"]) == 8 / 4


def test_grad_norm_only_on_logging_steps_and_per_layer(tmp_path, monkeypatch):
    calls = []
    original = metrics_module._grad_norm
    monkeypatch.setattr(metrics_module, "_grad_norm", lambda layer: calls.append(1) or original(layer))
    callback = LoRACallback(targets=["qkv"], log_per_layer=True, rank_pattern={"blocks.0.attn.qkv": 16})
    run = trainer(tmp_path, callback, max_epochs=1, log_every_n_steps=4)
    run.fit(Classifier(), data())
    assert len(calls) == 2 * 2  # two logging steps of eight, two adapted layers
    row = [row for row in csv_rows(run) if row.get("lora/grad_norm")][0]
    assert row["lora/grad_norm/net.blocks.0.attn.qkv"] and row["lora/grad_norm/net.blocks.1.attn.qkv"]
    assert float(row["lora/scaling/net.blocks.0.attn.qkv"]) == 16 / 16
    assert float(row["lora/scaling/net.blocks.1.attn.qkv"]) == 16 / 8


def test_grad_norm_once_per_accumulation_window_with_clipping(tmp_path):
    run = trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5)
    run.fit(Classifier(), data())
    rows = [row for row in csv_rows(run) if row.get("lora/grad_norm")]
    assert len(rows) == 4  # eight batches, four optimizer steps


def test_checkpoints_with_adapter_files_and_top_k_deletion(tmp_path):
    top_k = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, save_last=True)
    every = ModelCheckpoint(dirpath=tmp_path / "weights", save_weights_only=True, every_n_epochs=1, save_top_k=-1)
    run = trainer(tmp_path, LoRACallback(targets=["qkv"]), top_k, every, max_epochs=4)
    run.fit(Classifier(), data(), data(seed=1))
    for folder in ("ckpt", "weights"):
        names = sorted(os.listdir(tmp_path / folder))
        checkpoints = [n for n in names if n.endswith(".ckpt")]
        assert sorted(n for n in names if n.endswith(".lora.safetensors")) == sorted(
            n.removesuffix(".ckpt") + ".lora.safetensors" for n in checkpoints
        )
    assert len(os.listdir(tmp_path / "ckpt")) == 2 * 3  # top 2 + last
    assert len(os.listdir(tmp_path / "weights")) == 2 * 4
    run.save_checkpoint(tmp_path / "manual.ckpt")
    assert (tmp_path / "manual.lora.safetensors").exists()


def test_remote_fsspec_paths(tmp_path):
    import fsspec

    model = Classifier()
    run = trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1)
    run.fit(model, data())
    run.save_checkpoint("memory://lora-test/model.ckpt")
    fs = fsspec.filesystem("memory")
    assert fs.exists("/lora-test/model.lora.safetensors")
    assert read_adapter("memory://lora-test/model.lora.safetensors").modules


def test_default_checkpoint_is_slim(tmp_path):
    model = Classifier(dim=256)
    run = trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1)
    run.fit(model, data())
    run.save_checkpoint(tmp_path / "slim.ckpt")
    adapter_bytes = sum(p.numel() * p.element_size() for p in lora_parameters(model))
    optimizer_bytes = 2 * adapter_bytes  # AdamW: exp_avg and exp_avg_sq
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert base_bytes > 4 * 2**20  # the test means something only if the base outweighs the margin
    assert os.path.getsize(tmp_path / "slim.ckpt") < adapter_bytes + optimizer_bytes + 2**20
    full = trainer(tmp_path, LoRACallback(targets=["qkv"], save_base_weights=True), max_epochs=1)
    full.fit(Classifier(dim=256), data())
    full.save_checkpoint(tmp_path / "full.ckpt")
    assert os.path.getsize(tmp_path / "full.ckpt") > base_bytes


@pytest.mark.parametrize("save_base_weights", [False, True])
def test_exact_resume(tmp_path, save_base_weights):
    base_state = Classifier().state_dict()

    def fresh():
        model = Classifier()
        model.load_state_dict(base_state)
        return model

    def callback():
        return LoRACallback(targets=["qkv", "fc1"], save_base_weights=save_base_weights)

    torch.manual_seed(1)
    straight = LossRecorder()
    uninterrupted = fresh()
    trainer(tmp_path / "a", callback(), straight, max_epochs=4).fit(uninterrupted, data())

    torch.manual_seed(1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", callback(), checkpoint, max_epochs=2).fit(fresh(), data())
    resumed = LossRecorder()
    continued = fresh()
    torch.manual_seed(2)  # the adapters' fresh init differs: everything must come from the checkpoint
    trainer(tmp_path / "c", callback(), resumed, max_epochs=4).fit(continued, data(), ckpt_path=tmp_path / "b" / "last.ckpt")
    assert resumed.losses == straight.losses[len(straight.losses) // 2 :]
    final, expected = lora_state_dict(continued), lora_state_dict(uninterrupted)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[key], expected[key]) for key in final), "resumed adapters differ bit for bit"


def shuffled(seed=0):
    """``data()`` in a random order each epoch, drawn from torch's global generator (as most loaders are)."""
    loader = data(seed=seed)
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True)


class Draws(Callback):
    """Numbers drawn from Python's and NumPy's generators at each step (as augmentations draw them)."""

    def __init__(self):
        self.draws = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draws.append((random.random(), float(numpy.random.rand())))


def test_exact_resume_with_dropout_and_shuffling_restores_the_random_states(tmp_path):
    base_state = Classifier().state_dict()

    def run(root, *callbacks, max_epochs, ckpt_path=None, seed=1):
        L.seed_everything(seed, verbose=False)
        model = Classifier()
        model.load_state_dict(base_state)
        lora = LoRACallback(targets=["qkv", "fc1"], dropout=0.3)
        trainer(root, lora, *callbacks, max_epochs=max_epochs).fit(model, shuffled(), ckpt_path=ckpt_path)
        return model

    straight, straight_draws = LossRecorder(), Draws()
    uninterrupted = run(tmp_path / "a", straight, straight_draws, max_epochs=4)
    run(tmp_path / "b", Draws(), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True), max_epochs=2)
    resumed, resumed_draws = LossRecorder(), Draws()
    continued = run(tmp_path / "c", resumed, resumed_draws, max_epochs=4, ckpt_path=tmp_path / "b" / "last.ckpt", seed=2)
    half = len(straight.losses) // 2
    assert resumed.losses == straight.losses[half:]  # the same dropout masks and the same batches
    assert resumed_draws.draws == straight_draws.draws[half:]
    final, expected = lora_state_dict(continued), lora_state_dict(uninterrupted)
    assert all(torch.equal(final[key], expected[key]) for key in expected), "resumed adapters differ bit for bit"
    state = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["callbacks"]["LoRACallback"]["random_states"]
    assert len(state["ranks"]) == 1 and state["end_of_epoch"] is True


def test_random_states_of_another_world_size_or_inside_an_epoch_are_named(tmp_path):
    from lightning_lora.lightning.random_state import restore_states, saved_states

    torch.manual_seed(0)
    saved = saved_states(end_of_epoch=False)
    expected = torch.rand(3)
    with pytest.warns(UserWarning, match=r"x.ckpt was written by 2 processes and resumes on 1: their random states are not restored"):
        restore_states({**saved, "ranks": saved["ranks"] * 2}, 1, "x.ckpt")
    assert not torch.equal(torch.rand(3), expected)  # nothing restored
    with pytest.warns(UserWarning, match=r"x.ckpt was taken inside an epoch: the random states are restored, but"):
        restore_states(saved, 1, "x.ckpt")
    assert torch.equal(torch.rand(3), expected)
    with pytest.warns(UserWarning, match=r"x.ckpt holds no random states \(written by an older lightning_lora\)"):
        restore_states(None, 1, "x.ckpt")


def test_resume_from_inside_an_epoch_warns_that_it_is_not_exact(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    resumed = Classifier()
    resumed.load_state_dict(model.state_dict())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path, LoRACallback(targets=["qkv"], dropout=0.1), checkpoint, max_epochs=1).fit(model, data())
    with pytest.warns(UserWarning, match=r"step=3.ckpt was taken inside an epoch"):
        trainer(tmp_path / "b", LoRACallback(targets=["qkv"], dropout=0.1), max_epochs=1).fit(
            resumed, data(), ckpt_path=tmp_path / "epoch=0-step=3.ckpt"
        )


def test_resume_slim_checkpoint_on_other_base_fails(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, LoRACallback(targets=["qkv"]), checkpoint, max_epochs=1).fit(Classifier(), data())
    other = Classifier()
    recorder = LossRecorder()
    with pytest.raises(ValueError, match="checkpoint was trained on different base weights"):
        trainer(tmp_path, LoRACallback(targets=["qkv"]), recorder, max_epochs=2).fit(
            other, data(), ckpt_path=tmp_path / "last.ckpt"
        )
    assert recorder.losses == []


def test_adapter_reload_in_fresh_process_reproduces_predictions(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    torch.save(model.state_dict(), tmp_path / "base.pt")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(tmp_path, LoRACallback(r=4, alpha=8, targets=["qkv", "fc1"]), checkpoint, max_epochs=2)
    run.fit(model, data())
    tokens = next(iter(data(seed=5)))[0]
    model.eval()
    expected = model(tokens)
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from lightning_models import Classifier
import lightning_lora
model = Classifier()
model.load_state_dict(torch.load({str(tmp_path / 'base.pt')!r}))
lightning_lora.load_adapter(model, {str(tmp_path / 'ckpt' / 'last.lora.safetensors')!r})
model.eval()
torch.save(model(torch.load({str(tmp_path / 'tokens.pt')!r})), {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_adapter_path_starts_every_stage_from_the_file(tmp_path):
    model = Classifier()
    base = model.state_dict()
    trainer(tmp_path, LoRACallback(r=2, targets=["qkv"]), max_epochs=1).fit(model, data())
    save_adapter(model, tmp_path / "a.lora.safetensors")
    expected = trainer(tmp_path, max_epochs=1).validate(model, data(), verbose=False)

    fresh = Classifier()
    fresh.load_state_dict(base)
    callback = LoRACallback(adapter_path=tmp_path / "a.lora.safetensors")
    assert trainer(tmp_path, callback).validate(fresh, data(), verbose=False) == expected
    assert callback.config.r == 2  # the stored settings, read in setup
    trainer(tmp_path, callback, max_epochs=1).fit(fresh, data())  # continues from the loaded adapters
    assert fresh.net.blocks[0].attn["qkv"].r == 2
    predictions = trainer(tmp_path, callback).predict(fresh, data())
    assert len(predictions) == 8


def test_adapter_path_contradicting_arguments(tmp_path):
    model = Classifier()
    trainer(tmp_path, LoRACallback(r=2, targets=["qkv"]), max_epochs=1).fit(model, data())
    save_adapter(model, tmp_path / "a.lora.safetensors")
    contradicting = LoRACallback(r=16, adapter_path=tmp_path / "a.lora.safetensors")  # the constructor reads no file
    with pytest.raises(ValueError, match=r"was trained with other settings: r=16 \(file: 2\)"):
        trainer(tmp_path, contradicting).validate(_base_of(model), data(), verbose=False)
    agreeing = LoRACallback(r=2, adapter_path=tmp_path / "a.lora.safetensors")
    trainer(tmp_path, agreeing).validate(_base_of(model), data(), verbose=False)
    assert agreeing.config.r == 2


def _base_of(model):
    """A fresh Classifier holding ``model``'s base weights."""
    fresh = Classifier()
    fresh.load_state_dict({k.replace(".original_module", ""): v for k, v in model.state_dict().items() if "matrix_" not in k})
    return fresh


def test_missing_adapter_path_fails_in_setup(tmp_path):
    callback = LoRACallback(adapter_path=tmp_path / "nonexistent" / "a.lora.safetensors")
    model = Classifier()
    with pytest.raises(FileNotFoundError, match="a.lora.safetensors"):
        trainer(tmp_path, callback, max_epochs=1).fit(model, data())
    assert not lora_modules(model) and "configure_model" not in vars(model)


def test_merge_on_end_and_stages_after_fit(tmp_path):
    model = Classifier()
    run = trainer(
        tmp_path,
        LoRACallback(targets=["qkv"], merge_on_end=True),
        EarlyStopping(monitor="val_loss", patience=1),
        LearningRateMonitor(),
        max_epochs=2,
    )
    run.fit(model, data(), data(seed=1))
    assert all(layer.merged for layer in lora_modules(model).values())
    run.validate(model, data(seed=1), verbose=False)
    run.test(model, data(seed=1), verbose=False)
    assert len(run.predict(model, data())) == 8
    trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1).fit(model, data())  # unmerges to train
    assert not any(layer.merged for layer in lora_modules(model).values())


def test_fast_dev_run_and_bf16_mixed(tmp_path):
    trainer(tmp_path, LoRACallback(targets=["qkv"]), fast_dev_run=True).fit(Classifier(), data(), data())
    model = Classifier()
    run = trainer(tmp_path, LoRACallback(targets=["qkv"], adapter_dtype="float32"), max_epochs=1, precision="bf16-mixed")
    run.fit(model, data())
    assert model.net.blocks[0].attn["qkv"].matrix_B.weight.abs().sum() > 0


def test_layers_created_in_configure_model_are_adapted(tmp_path):
    model = LazyClassifier()
    trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1).fit(model, data())
    assert set(lora_modules(model)) == {"net.blocks.0.attn.qkv", "net.blocks.1.attn.qkv"}
    assert "configure_model" not in vars(model)


def test_optimizer_without_adapters_is_an_error(tmp_path):
    class Stale(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.head.parameters(), lr=0.1)

    with pytest.raises(MisconfigurationException, match="the optimizer does not hold 4 of the 4 LoRA parameters"):
        trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1).fit(Stale(), data())


def test_optimizer_over_all_parameters_warns(tmp_path):
    class AllParams(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.warns(UserWarning, match="the optimizer holds .* frozen parameters"):
        trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1).fit(AllParams(), data())


def test_repeated_fit_is_idempotent(tmp_path):
    model = Classifier()
    callback = LoRACallback(targets=["qkv"])
    trainer(tmp_path, callback, max_epochs=1).fit(model, data())
    names = set(lora_modules(model))
    trainer(tmp_path, callback, max_epochs=1).fit(model, data())
    assert set(lora_modules(model)) == names
    assert not any("matrix_A.original_module" in k for k in model.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"r": 0}, ValueError, "r must be a positive integer, got 0"),
        ({"alpha": -1}, ValueError, "alpha must be a positive finite number, got -1"),
        ({"targets": "qkv"}, TypeError, "targets must be a list of module name patterns"),
        ({"log_grad_norm": "yes"}, TypeError, "log_grad_norm must be True or False, got 'yes'"),
        ({"adapter_path": 3}, TypeError, "adapter_path must be a path or None, got 3"),
        ({"config": {"r": 2}}, TypeError, "config must be a LoRAConfig, got dict"),
        ({"config": LoRAConfig(), "r": 16}, ValueError, r"pass either config or the separate arguments.*\['r'\]"),
    ],
)
def test_constructor_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoRACallback(**kwargs)


def test_targets_default_to_the_model_declaration(tmp_path):
    model = MixinClassifier()
    trainer(tmp_path, LoRACallback(), max_epochs=1).fit(model, data())
    assert set(lora_modules(model)) == {f"net.blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "mlp.fc1")}
    plain = Classifier()
    trainer(tmp_path, LoRACallback(), max_epochs=1).fit(plain, data())
    assert len(lora_modules(plain)) == 8  # all-linear: 4 per block; the output head is left out


class FailingSetup(Classifier):
    def setup(self, stage):
        raise RuntimeError("setup failed")


class FailingCallback(Callback):
    def setup(self, trainer, pl_module, stage):
        raise RuntimeError("another callback failed")


@pytest.mark.parametrize("failure", ["model", "callback"])
def test_a_fit_that_fails_before_configure_model_leaves_nothing_behind(tmp_path, failure):
    model = FailingSetup() if failure == "model" else Classifier()
    extra = [] if failure == "model" else [FailingCallback()]
    with pytest.raises(RuntimeError, match="failed"):
        trainer(tmp_path, LoRACallback(targets=["qkv"]), *extra, max_epochs=1).fit(model, data())
    assert "configure_model" not in vars(model)
    if failure == "model":
        model.setup = lambda stage: None  # the user fixes the model
    trainer(tmp_path, max_epochs=1).fit(model, data())  # a later fit without LoRACallback
    assert not lora_modules(model)


def test_a_model_that_reaches_fit_unadapted_is_an_error(tmp_path):
    class ReplacesConfigureModel(Classifier):
        def setup(self, stage):
            self.configure_model = lambda: None  # hides the callback's hook-in

    model = ReplacesConfigureModel()
    recorder = LossRecorder()
    with pytest.raises(MisconfigurationException, match="the model reached fit without LoRA adapters .* train every weight"):
        trainer(tmp_path, LoRACallback(targets=["qkv"]), recorder, max_epochs=1).fit(model, data())
    assert recorder.losses == []


def test_unsupported_strategies_are_recognised_by_type(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    class Renamed(FSDPStrategy):  # a user subclass whose name says nothing
        pass

    from lightning.pytorch.strategies import DeepSpeedStrategy

    class Other(DeepSpeedStrategy):
        pass

    for strategy in (Renamed, Other):
        fake = SimpleNamespace(strategy=strategy.__new__(strategy))
        with pytest.raises(MisconfigurationException, match=rf"got {strategy.__name__}; to shard the model use ModelParallelStrategy\(data_parallel_size="):
            LoRACallback().setup(fake, Classifier(), "fit")


def test_export_peft_is_refused_with_model_parallel_strategy():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    fake = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    with pytest.raises(MisconfigurationException, match=r"export_peft='peft' is not available with ModelParallelStrategy; .*lightning-lora export-peft ADAPTER OUT_DIR"):
        LoRACallback(export_peft="peft").setup(fake, Classifier(), "fit")


def test_configure_model_that_loads_pretrained_weights_loads_them_into_the_base(tmp_path):
    """On one device or DDP the adapters come after configure_model, so weights it loads by their
    plain names reach the base layers."""
    pretrained = Classifier().state_dict()

    class Loading(Classifier):
        def configure_model(self):
            self.load_state_dict(pretrained)  # strict: every plain name must be there

    model = Loading()
    trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1).fit(model, data())
    qkv = model.net.blocks[0].attn["qkv"]
    assert torch.equal(qkv.original_module.weight, pretrained["net.blocks.0.attn.qkv.weight"])


def test_two_lora_callbacks_are_refused(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `LoRACallback`"):
        trainer(tmp_path, LoRACallback(targets=["qkv"]), LoRACallback(targets=["fc1"]), max_epochs=1)  # Lightning's check
    model = Classifier()
    two = trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1)
    two.callbacks.append(LoRACallback(targets=["fc1"]))  # past Lightning's check
    with pytest.raises(MisconfigurationException, match="the Trainer has more than one LoRACallback"):
        two.fit(model, data())
    assert not lora_modules(model) and "configure_model" not in vars(model)


def test_empty_targets_are_an_error_not_all_linear():
    with pytest.raises(ValueError, match="targets must name at least one module pattern, got an empty list"):
        LoRACallback(targets=[])


def test_checkpoint_io_passes_bare_state_dicts_through(tmp_path):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from lightning_lora import apply_lora
    from lightning_lora.lightning import LoRACheckpointIO

    model = Classifier()
    apply_lora(model, LoRAConfig(targets=["qkv"]))
    io = LoRACheckpointIO(TorchCheckpointIO(), lambda: model)
    io.save_checkpoint(model.state_dict(), tmp_path / "spawn.ckpt")  # what the spawn launcher saves
    assert set(torch.load(tmp_path / "spawn.ckpt", weights_only=True)) == set(model.state_dict())
    assert not (tmp_path / "spawn.lora.safetensors").exists()


PRECISIONS = ["bf16-true", "16-true", "64-true", "bf16-mixed", "16-mixed", "32-true"]  # 16-mixed: Lightning runs bf16-mixed on CPU


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_and_reload_in_every_cpu_precision(tmp_path, precision):
    from lightning_lora import load_adapter

    base_state = Classifier().state_dict()

    def fresh():
        model = Classifier()
        model.load_state_dict(base_state)
        return model

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trained = fresh()
    trainer(tmp_path, LoRACallback(targets=["qkv"]), checkpoint, max_epochs=1, precision=precision).fit(trained, data())
    resumed = fresh()
    trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=2, precision=precision).fit(
        resumed, data(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert resumed.trainer.global_step == 16
    plain = fresh()  # the float32 base
    load_adapter(plain, tmp_path / "last.lora.safetensors")
    assert set(lora_modules(plain)) == {"net.blocks.0.attn.qkv", "net.blocks.1.attn.qkv"}


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_keeps_float32_adapters_and_resumes_exactly(tmp_path, precision):
    """Lightning casts the whole model; adapters asked for in float32 stay float32 (master weights)."""
    base_state = Classifier().state_dict()
    seen = []

    class DtypeRecorder(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(({p.dtype for p in lora_parameters(pl_module)}, pl_module.net.head.weight.dtype))

    def fit(folder, max_epochs, *extra, ckpt_path=None):
        torch.manual_seed(0)
        model = Classifier()
        model.load_state_dict(base_state)
        lora = LoRACallback(targets=["qkv"], adapter_dtype="float32")
        trainer(folder, lora, *extra, max_epochs=max_epochs, precision=precision).fit(model, data(), ckpt_path=ckpt_path)
        return lora_state_dict(model)

    straight = fit(tmp_path / "straight", 2, DtypeRecorder())
    assert seen[0] == ({torch.float32}, torch.bfloat16 if precision == "bf16-true" else torch.float16)
    fit(tmp_path / "first", 1, ModelCheckpoint(dirpath=tmp_path / "first", save_last=True))
    resumed = fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert all(tensor.dtype == torch.float32 for tensor in resumed.values())
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)  # no rounding through bfloat16
    assert any(not torch.equal(tensor, torch.zeros_like(tensor)) for key, tensor in straight.items() if "matrix_B" in key)


def test_a_lower_precision_base_is_refused_with_the_dtype_named(tmp_path):
    from lightning_lora import load_adapter

    model = Classifier()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1).fit(model, data())
    save_adapter(model, tmp_path / "a.lora.safetensors")
    half = Classifier()
    half.load_state_dict(base_state)
    half.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"different base weights.*held in another dtype.*bfloat16 now, float32 then"):
        load_adapter(half, tmp_path / "a.lora.safetensors")


def test_a_failed_companion_write_leaves_a_checkpoint_without_companion_that_can_be_regenerated(tmp_path, monkeypatch):
    import lightning_lora.lightning.checkpoint as checkpoint_module
    from lightning_lora.lightning import check_companion, write_companion

    base_state = Classifier().state_dict()
    model = Classifier()
    model.load_state_dict(base_state)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, LoRACallback(targets=["qkv"]), saver, max_epochs=1).fit(model, data())
    check_companion(tmp_path / "last.ckpt")
    old_companion = (tmp_path / "last.lora.safetensors").read_bytes()

    real_write = checkpoint_module.write_atomic

    def failing(path, data):  # the disk fills up right after the checkpoint is written
        if str(path).endswith(".lora.safetensors"):
            raise OSError("No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "write_atomic", failing)
    resumed = Classifier()
    resumed.load_state_dict(base_state)
    with pytest.raises(OSError, match="No space left"):
        trainer(tmp_path, LoRACallback(targets=["qkv"]), ModelCheckpoint(dirpath=tmp_path, save_last=True), max_epochs=2).fit(
            resumed, data(), ckpt_path=tmp_path / "last.ckpt"
        )
    monkeypatch.setattr(checkpoint_module, "write_atomic", real_write)
    failed = tmp_path / "epoch=1-step=16.ckpt"  # the first checkpoint of the resumed run
    assert failed.exists() and not (tmp_path / "epoch=1-step=16.lora.safetensors").exists()
    check_companion(tmp_path / "last.ckpt")  # the previous pair is untouched
    with pytest.raises(ValueError, match="has no companion .*regenerate it with lightning_lora.write_companion"):
        check_companion(failed)
    fresh = Classifier()
    fresh.load_state_dict(base_state)
    assert write_companion(failed, fresh) == str(tmp_path / "epoch=1-step=16.lora.safetensors")
    check_companion(failed)
    assert (tmp_path / "epoch=1-step=16.lora.safetensors").read_bytes() != old_companion

    (tmp_path / "epoch=1-step=16.lora.safetensors").write_bytes(old_companion)  # a stale pair, however it came about
    stale = r"step=16.ckpt does not match the digests its companion .* records: .*, or the companion belongs to another checkpoint"
    with pytest.raises(ValueError, match=stale):
        check_companion(failed)
    again = Classifier()
    again.load_state_dict(base_state)
    with pytest.raises(ValueError, match=stale + r".*the newest checkpoint beside it that verifies is .*last.ckpt"):
        trainer(tmp_path / "r", LoRACallback(targets=["qkv"]), max_epochs=3).fit(again, data(), ckpt_path=failed)
    assert not lora_modules(again)  # refused before anything was loaded or added


def test_save_last_link_gets_a_companion_link(tmp_path):
    from lightning_lora.lightning import check_companion

    saver = ModelCheckpoint(dirpath=tmp_path, save_last="link", monitor="val_loss", save_top_k=1)
    trainer(tmp_path, LoRACallback(targets=["qkv"]), saver, max_epochs=3).fit(Classifier(), data(), data(seed=1))
    last, companion = tmp_path / "last.ckpt", tmp_path / "last.lora.safetensors"
    assert last.is_symlink() and companion.is_symlink()
    assert companion.resolve().name == last.resolve().name.replace(".ckpt", ".lora.safetensors")
    check_companion(last)
    names = sorted(os.listdir(tmp_path))
    assert sorted(n for n in names if n.endswith(".lora.safetensors")) == sorted(
        n.removesuffix(".ckpt") + ".lora.safetensors" for n in names if n.endswith(".ckpt")
    )


def test_a_resume_that_fails_leaves_the_model_unadapted_and_a_retry_loads_the_file(tmp_path):
    model = Classifier()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, LoRACallback(r=2, targets=["qkv"]), ModelCheckpoint(dirpath=tmp_path, save_last=True), max_epochs=1).fit(model, data())
    callback = LoRACallback(adapter_path=tmp_path / "last.lora.safetensors")
    fresh = Classifier()  # other base weights: the resume fails at restore
    with pytest.raises(ValueError, match="was trained on different base weights"):
        trainer(tmp_path, callback, max_epochs=2).fit(fresh, data(), ckpt_path=tmp_path / "last.ckpt")
    assert not lora_modules(fresh) and all(p.requires_grad for p in fresh.parameters())
    fresh.load_state_dict(base)  # the user loads the right base and retries with the same callback
    assert trainer(tmp_path, callback).validate(fresh, data(), verbose=False)
    assert torch.equal(fresh.net.blocks[0].attn["qkv"].matrix_B.weight, model.net.blocks[0].attn["qkv"].matrix_B.weight)


def test_loading_a_lora_checkpoint_without_lora_says_what_it_is_and_the_helper_loads_it(tmp_path):
    from lightning_lora import load_checkpoint

    model = Classifier()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer(tmp_path, LoRACallback(targets=["qkv"]), ModelCheckpoint(dirpath=tmp_path, save_last=True), max_epochs=1).fit(model, data())
    message = r"Unexpected key\(s\) in state_dict: \"\[lightning_lora\] a LoRA checkpoint: .* lightning_lora.load_checkpoint\(model, path\)\""
    with pytest.raises(RuntimeError, match=message):
        Classifier.load_from_checkpoint(tmp_path / "last.ckpt")  # a class without LoRAMixin
    with pytest.raises(RuntimeError, match=message):
        plain = Classifier()
        plain.load_state_dict(base)
        trainer(tmp_path / "r", max_epochs=2).fit(plain, data(), ckpt_path=tmp_path / "last.ckpt")  # resume without the callback
    fresh = Classifier()
    fresh.load_state_dict(base)
    assert load_checkpoint(fresh, tmp_path / "last.ckpt") is fresh
    tokens = next(iter(data()))[0]
    model.eval(), fresh.eval()
    assert torch.equal(fresh(tokens), model(tokens))


class _Exploit:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_are_never_unpickled_beyond_weights(tmp_path, monkeypatch):
    from lightning_models import MixinClassifier

    from lightning_lora import load_checkpoint
    from lightning_lora.lightning import check_companion

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # an environment that turns torch's default off
    marker = tmp_path / "owned"
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "lora": {"version": 2}, "payload": _Exploit(marker)}, bad)
    attempts = [
        lambda: trainer(tmp_path, LoRACallback(targets=["qkv"]), max_epochs=1).fit(Classifier(), data(), ckpt_path=bad),
        lambda: MixinClassifier.load_from_checkpoint(bad),
        lambda: check_companion(bad),
        lambda: load_checkpoint(Classifier(), bad),
    ]
    for attempt in attempts:
        with pytest.raises(Exception, match="Weights only load failed"):
            attempt()
        assert not marker.exists()


def test_export_peft_writes_a_peft_folder_beside_each_checkpoint_and_removes_it_with_it(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    model = Classifier()
    trainer(tmp_path, LoRACallback(targets=["qkv"], export_peft="peft"), saver, max_epochs=3).fit(model, data(), data(seed=1))
    names = sorted(os.listdir(tmp_path))
    checkpoint = [n for n in names if n.endswith(".ckpt")]
    assert len(checkpoint) == 1
    stem = checkpoint[0].removesuffix(".ckpt")
    assert sorted(n for n in names if n.startswith("epoch")) == sorted([f"{stem}.ckpt", f"{stem}.lora.safetensors", f"{stem}.peft"])
    assert sorted(os.listdir(tmp_path / f"{stem}.peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match=r"export_peft must be None, 'peft' or 'vllm', got 'onnx'"):
        LoRACallback(export_peft="onnx")


class _NoOptimizer(Classifier):
    configure_optimizers = L.LightningModule.configure_optimizers  # LightningCLI's --optimizer provides it


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        return data()


def _cli(args):
    return cli_module.LightningCLI(_NoOptimizer, _Data, args=args, run=False, save_config_callback=None)


CLI_ARGS = ["--trainer.max_epochs=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=lightning_lora.LoRACallback", "--trainer.callbacks.targets=[qkv]",
            "--optimizer=AdamW", "--optimizer.lr=0.01"]


def test_lightning_cli_optimizer_gets_the_adapters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli(CLI_ARGS)
    cli.trainer.fit(cli.model, cli.datamodule)
    held = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in held for p in lora_parameters(cli.model))
    assert cli.model.net.blocks[0].attn["qkv"].matrix_B.weight.abs().sum() > 0  # trained
    with_scheduler = _cli([*CLI_ARGS, "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"])
    with pytest.raises(MisconfigurationException, match="with a learning-rate scheduler they cannot be added afterwards"):
        with_scheduler.trainer.fit(with_scheduler.model, with_scheduler.datamodule)


def test_every_callback_argument_has_help_text(capsys):
    import inspect
    import re as regex

    with pytest.raises(SystemExit):
        _cli(["--trainer.callbacks.help", "lightning_lora.LoRACallback"])
    text = " ".join(capsys.readouterr().out.split())
    doc = inspect.getdoc(LoRACallback)
    for name in inspect.signature(LoRACallback.__init__).parameters:
        if name == "self":
            continue
        described = regex.search(rf"^    {name}: (.+)$", doc, regex.M)
        assert described, f"{name} has no description in the docstring"
        assert f"--trainer.callbacks.{name}" in text and " ".join(described.group(1).split()[:3]) in text, name


def test_a_file_that_is_no_checkpoint_is_a_value_error(tmp_path):
    from lightning_lora import load_checkpoint
    from lightning_lora.lightning import check_companion

    (tmp_path / "g.ckpt").write_bytes(b"garbage\n")
    for attempt in (lambda: check_companion(tmp_path / "g.ckpt"), lambda: load_checkpoint(Classifier(), tmp_path / "g.ckpt")):
        with pytest.raises(ValueError, match=r"g.ckpt is not a readable checkpoint: "):
            attempt()


def test_tensor_parallelism_is_refused_naming_the_supported_layouts():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_lora.lightning.settings import check_trainer

    # one process cannot run a tensor-parallel Trainer (Lightning refuses the sizes first), so the check is called as setup calls it
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    tp = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False)
    model = Classifier()
    with pytest.raises(MisconfigurationException, match=r"does not support tensor parallelism \(ModelParallelStrategy with tensor_parallel_size=2\).*Supported layouts: data parallel .*FSDP2 .*HSDP"):
        check_trainer(tp, model, LoRACallback(targets=["qkv"]).settings, lambda: True)
    assert not lora_modules(model)
    fsdp = L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), accelerator="cpu", devices=1, logger=False)
    check_trainer(fsdp, model, LoRACallback(targets=["qkv"]).settings, lambda: True)

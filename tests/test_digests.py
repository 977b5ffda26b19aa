"""Checkpoint digests: every file of a checkpoint is checked against its companion before it is loaded.

A flipped byte anywhere in a ``.ckpt`` (each of its zip members: tensors of the adapters and of the
optimizer state, the pickled structure) or in its companion is refused, by resume and by ``check``,
naming the file and the newest checkpoint that verifies. The sharded folders are in
test_distributed.py (they need ModelParallelStrategy's processes).
"""

import shutil
import struct
import zipfile

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import Classifier, data
from test_callback import trainer

import lightning_lora.lightning.checkpoint as checkpoint_module
from lightning_lora import LoRACallback, lora_modules
from lightning_lora.formats.adapter_file import adapter_bytes
from lightning_lora.lightning import adapter_path_for, check_companion
from lightning_lora.lightning.digests import SINGLE, digest_file

torch.manual_seed(0)
BASE = Classifier().state_dict()


def fresh():
    model = Classifier()
    model.load_state_dict(BASE)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two epochs, a checkpoint with its companion after each, and last.ckpt."""
    folder = tmp_path_factory.mktemp("run")
    saver = ModelCheckpoint(dirpath=folder, save_top_k=-1, save_last=True)
    trainer(folder, LoRACallback(targets=["qkv", "fc1"]), saver, max_epochs=2).fit(fresh(), data())
    return folder


def copy_of(run, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(run, folder, symlinks=True)
    return folder


def members(path):
    """Each zip member of a checkpoint file and the offset of a byte in the middle of its data."""
    with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
        found = {}
        for info in archive.infolist():
            file.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", file.read(4))
            start = info.header_offset + 30 + name_length + extra_length
            if info.compress_size:
                found[info.filename] = start + info.compress_size // 2
        return found


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def resume(path):
    model = fresh()
    try:
        trainer(path.parent / "resumed", LoRACallback(targets=["qkv", "fc1"]), max_epochs=3).fit(model, data(), ckpt_path=path)
    finally:
        assert not lora_modules(model)  # refused before anything was added or loaded


def test_the_companion_records_the_digest_of_its_checkpoint(run):
    from lightning_lora import read_adapter

    for name in ("epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"):
        recorded = read_adapter(adapter_path_for(str(run / name))).checkpoint_files
        assert recorded == {SINGLE: digest_file(str(run / name))}
        assert check_companion(run / name) is True


def test_a_flipped_byte_in_any_member_of_a_checkpoint_is_refused_by_check_and_resume(run, tmp_path):
    folder = copy_of(run, tmp_path)
    last = folder / "last.ckpt"
    original = last.read_bytes()
    found = members(last)
    optimizer = [name for name in found if "/data/" in name]
    assert len(found) > 5 and len(optimizer) > 3  # the pickle, the adapter and the optimizer-state tensors
    expected = r"last.ckpt does not match the digests its companion .*last.lora.safetensors records: .*last.ckpt \(its bytes differ"
    newest = r"the newest checkpoint beside it that verifies is .*epoch=1-step=16.ckpt"
    for index, (name, offset) in enumerate(found.items()):
        flip(last, offset)
        with pytest.raises(ValueError, match=expected + ".*" + newest):
            check_companion(last)
        if index % 4 == 0 or name.endswith("data.pkl"):  # a resume per few members: each costs a Trainer
            with pytest.raises(ValueError, match=expected):
                resume(last)
        last.write_bytes(original)
    assert check_companion(last) is True


def test_a_flipped_byte_in_the_companion_is_refused_by_check_and_resume(run, tmp_path):
    folder = copy_of(run, tmp_path)
    companion = folder / "epoch=1-step=16.lora.safetensors"
    size = companion.stat().st_size
    for offset in (10, size // 2, size - 1):  # the header, the adapter tensors, the end
        original = companion.read_bytes()
        flip(companion, offset)
        message = r"epoch=1-step=16.ckpt: its companion cannot be read: .*epoch=1-step=16.lora.safetensors"
        with pytest.raises(ValueError, match=message + ".*the newest checkpoint beside it that verifies is .*last.ckpt"):
            check_companion(folder / "epoch=1-step=16.ckpt")
        with pytest.raises(ValueError, match=message):
            resume(folder / "epoch=1-step=16.ckpt")
        companion.write_bytes(original)


def test_no_checkpoint_that_verifies_is_said_too(run, tmp_path):
    folder = copy_of(run, tmp_path)
    for name in ("epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"):
        path = folder / name
        flip(path, path.stat().st_size // 2)
    with pytest.raises(ValueError, match="no checkpoint beside it verifies"):
        check_companion(folder / "last.ckpt")


def test_a_companion_without_digests_loads_with_one_warning(run, tmp_path):
    folder = copy_of(run, tmp_path)
    path = folder / "epoch=0-step=8.ckpt"
    model = fresh()
    checkpoint_module.load_checkpoint(model, path)  # as trained at that step
    companion = adapter_bytes(model, checkpoint={"epoch": 0, "global_step": 8})  # as older versions wrote it
    (folder / "epoch=0-step=8.lora.safetensors").write_bytes(companion)
    with pytest.warns(UserWarning, match="records no digests of .*epoch=0-step=8.ckpt \\(written by an older lightning_lora\\)"):
        assert check_companion(path) is False
    with pytest.warns(UserWarning, match="records no digests") as caught:
        trainer(tmp_path / "resumed", LoRACallback(targets=["qkv", "fc1"]), max_epochs=2).fit(fresh(), data(), ckpt_path=path)
    assert sum("records no digests" in str(w.message) for w in caught) == 1


def test_a_save_digests_the_bytes_it_writes_once(tmp_path, monkeypatch):
    hashed = []
    real = checkpoint_module.digest_bytes
    monkeypatch.setattr(checkpoint_module, "digest_bytes", lambda data: hashed.append(len(data)) or real(data))
    monkeypatch.setattr(checkpoint_module, "digest_file", lambda path: pytest.fail("read back a file it had in memory"))
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    trainer(tmp_path, LoRACallback(targets=["qkv"]), saver, max_epochs=1).fit(fresh(), data())
    assert hashed == [(tmp_path / "epoch=0-step=8.ckpt").stat().st_size]


def test_a_slim_checkpoint_without_companion_resumes_with_a_warning(run, tmp_path):
    folder = copy_of(run, tmp_path)
    path = folder / "epoch=0-step=8.ckpt"
    (folder / "epoch=0-step=8.lora.safetensors").unlink()  # a crash between the two writes
    with pytest.warns(UserWarning, match=r"epoch=0-step=8.ckpt has no companion adapter file: its bytes cannot be verified"):
        trainer(tmp_path / "resumed", LoRACallback(targets=["qkv", "fc1"]), max_epochs=2).fit(fresh(), data(), ckpt_path=path)

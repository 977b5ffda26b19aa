"""A rank killed (SIGKILL) during a sharded save never leaves a checkpoint folder that looks complete but is not."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import launch_environment, run_script

from lightning_lora import read_adapter
from lightning_lora.lightning import check_companion

SCRIPT = Path(__file__).parent / "kill_sharded_run.py"


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_complete_checkpoint(tmp_path, when):
    with open(tmp_path / "log.txt", "wb") as log:  # a file, not a pipe: a full pipe would block the job
        job = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), when], env=launch_environment(),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "killed").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if (tmp_path / "killed").exists():
            time.sleep(1.0)  # rank 0 goes on as far as it can without rank 1, then the job dies with it
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the whole job, Lightning's second process included
        job.wait()
    assert (tmp_path / "killed").exists(), (tmp_path / "log.txt").read_text()[-3000:]
    checkpoints = tmp_path / "checkpoints"
    visible = sorted(name for name in os.listdir(checkpoints) if name.endswith(".ckpt"))
    assert visible == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"], os.listdir(checkpoints)
    for name in visible:  # every file of every visible checkpoint is there and is the one its companion lists
        assert check_companion(checkpoints / name), name
    assert read_adapter(checkpoints / "last.lora.safetensors").checkpoint == {"epoch": 0, "global_step": 4}
    hidden = [name for name in os.listdir(checkpoints) if name.startswith(".")]
    # the killed save's own folder, unless rank 0 saw the save fail and removed it before the job died
    assert len(hidden) <= 1 and all(name.startswith(".last.ckpt.") and name.endswith(".tmp") for name in hidden), hidden
    done = run_script(SCRIPT, tmp_path, "resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "done.resume").read_text() == str(4 * 4)  # from the end of epoch 0: 3 more epochs of 4 steps
    assert [name for name in os.listdir(checkpoints) if name.startswith(".")] == []  # the next save of last.ckpt removed it


@pytest.mark.parametrize("existing", ["none", "folder", "file", "link"])
def test_a_staged_folder_replaces_whatever_is_at_its_path_and_leftovers_of_that_path_alone_are_removed(tmp_path, existing):
    from lightning_lora.formats.files import publish_staged, remove_leftovers, staging_folder

    target = tmp_path / "last.ckpt"
    (tmp_path / "epoch=0.ckpt").mkdir()
    if existing == "folder":
        target.mkdir()
        (target / "old").write_text("old")
    elif existing == "file":
        target.write_text("old")
    elif existing == "link":
        target.symlink_to("epoch=0.ckpt")
    leftover, other = staging_folder(str(target)), staging_folder(str(tmp_path / "epoch=0.ckpt"))
    staging = staging_folder(str(target))
    (Path(staging) / "new").write_text("new")
    publish_staged(staging, str(target))
    assert target.is_dir() and not target.is_symlink() and os.listdir(target) == ["new"]
    assert (tmp_path / "epoch=0.ckpt").is_dir()  # a link's target is left alone
    assert sorted(remove_leftovers(str(target))) == sorted([leftover, *[str(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith(".old")]])
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(other), "epoch=0.ckpt", "last.ckpt"])

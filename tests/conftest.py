import os
import subprocess
import sys

import pytest
import torch
from torch import nn

SEED = 0
collect_ignore = ["fsdp2_run.py", "fsdp2_moe_run.py", "meta_init_run.py", "kill_sharded_run.py", "spawn_run.py"]  # scripts tests run in their own processes


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def environment_restored():
    """Each test sees the environment as it was: a Lightning launch in this process (a README snippet's
    Trainer) sets LOCAL_RANK, WORLD_SIZE and MASTER_PORT, with which a later launch would wait for ranks
    it believes someone else starts, and leaves its process group."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # e.g. a one-device FSDP2 run
        torch.distributed.destroy_process_group()  # processes forked later would inherit it, and hang


#: What a Lightning or torchrun launch leaves in the launching process's environment.
LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_")


def launch_environment() -> dict[str, str]:
    """The environment for a script that launches its own processes: none of an earlier launch's
    variables, nor Lightning's reseeding of launched processes (``PL_GLOBAL_SEED``), one thread each."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", *LAUNCH_VARIABLES))}
    return {**keep, "OMP_NUM_THREADS": "1"}


def run_script(script, *args, timeout=300, cwd=None, **env) -> subprocess.CompletedProcess:
    """Run a Python script (which may launch its own processes) in :func:`launch_environment` plus ``env``."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**launch_environment(), **env})


class Block(nn.Module):
    """A small transformer-style block with the usual module names."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim)})

    def forward(self, x):  # (B, T, C)
        q, k, v = self.attn["qkv"](self.norm(x)).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.attn["proj"](weights @ v)
        return x + self.mlp["fc2"](torch.relu(self.mlp["fc1"](x)))


class TinyModel(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):  # (B, T) -> (B, classes)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def randomize_adapters(model: nn.Module, scale: float = 0.1) -> None:
    """Give every adapter a non-zero update, as training would."""
    from lightning_lora import lora_modules

    with torch.no_grad():
        for adapter in lora_modules(model).values():
            for param in adapter.matrix_B.parameters():
                param.normal_(0, scale)


@pytest.fixture
def tiny_model():
    return TinyModel()


@pytest.fixture
def tokens():
    return torch.randint(0, 32, (4, 6))

"""The spawn launchers (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``): trained adapters back in the launching process.

These strategies train copies of the model in processes they start, then load rank 0's final
``state_dict`` into the launching process's model with ``strict=False``. ``LoRACallback`` adapts the
copies in ``setup``, which runs in the started processes only, so that load would silently skip every
adapter the launching process's model does not have. Lightning has no hook in the launching process,
so :func:`hook_launcher` wraps ``_MultiProcessingLauncher._recover_results_in_main_process`` (once per
process, when a ``LoRACallback`` is made). Rank 0 writes an adapter file (specs, tensors and base
fingerprint) beside the final weights (:func:`write_final_adapters`, called by ``LoRACheckpointIO``);
the launching process installs it into its model, unadapted or adapted alike (the fingerprint must
match), and loads the weights strictly (:func:`adopt_final_state`). Launches without that file are
left to Lightning.

Before training (in ``setup``), :func:`check_spawn` refuses what the launching process could not get
back: adapters already there that differ from the callback's plan, and ``merge_on_end`` (the final
weights would hold the update, and the launching process's adapters would add it again). Before the
fork launchers start their processes, :func:`check_fork` refuses a launching process that holds a
process group already (a notebook after an earlier run): the forked processes would hang on it.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.formats.adapter_file import SUFFIX, adapter_contents, install_file, read_adapter, serialize
from lightning_lora.formats.files import exists, remove_if_exists, write_atomic
from lightning_lora.surgery.plan import plan_adapters
from lightning_lora.surgery.state import lora_modules

_HOOKED = "_lightning_lora_hook"
_OWNERS: set[type] = set()  # the callback types whose Trainers are checked before a fork


def is_spawned(strategy: Any) -> bool:
    """Whether ``strategy`` trains in processes it starts itself (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``)."""
    return isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher)


def check_spawn(
    pl_module: pl.LightningModule, config: LoRAConfig, merge_on_end: bool, adapter_path: str | None, strategy_name: str
) -> None:
    """In ``setup``, under a spawn launcher: refuse what the launching process could not take back.

    Raises:
        MisconfigurationException: for ``merge_on_end``, or adapters in the model that differ from the plan.
    """
    if merge_on_end:
        raise MisconfigurationException(
            f"merge_on_end=True cannot be used with strategy {strategy_name} (ddp_spawn, ddp_fork, ddp_notebook): "
            f"the launching process gets the merged weights back into adapted layers, which would add the update "
            f"twice; merge after fit in the launching process: lightning_lora.merge_lora(model)"
        )
    existing = lora_modules(pl_module)
    if not existing or adapter_path is not None:  # a file to start from installs only into an unadapted model
        return
    try:
        planned = set(plan_adapters(pl_module, config).specs)
    except ValueError:  # the targets are created in configure_model: the callback's own error follows
        return
    if planned != set(existing):
        only_model = sorted(set(existing) - planned)
        only_plan = sorted(planned - set(existing))
        targets = None if config.targets is None else list(config.targets)
        raise MisconfigurationException(
            f"the model was adapted before fit with other modules than LoRACallback's targets {targets!r} plan "
            f"(adapted only before fit: {only_model[:5]!r}; planned only: {only_plan[:5]!r}); with strategy {strategy_name} the launching process could not tell which "
            f"adapters to keep: adapt it with the callback's config (lightning_lora.apply_lora(model, "
            f"callback.config)) or not at all"
        )


def write_final_adapters(module: nn.Module, weights_path: str) -> None:
    """On rank 0 of a spawn launch: the adapter file the launching process installs before loading ``weights_path``."""
    adapters = lora_modules(module)
    if adapters and not any(adapter.merged for adapter in adapters.values()):
        write_atomic(weights_path + SUFFIX, serialize(*adapter_contents(module, root="")))


def adopt_final_state(module: nn.Module, weights_path: str, state: dict[str, Any]) -> None:
    """In the launching process: install the adapters written beside ``weights_path``, then load ``state`` strictly.

    Raises:
        ValueError: if the model does not fit the adapter file (another base: the fingerprint differs).
        RuntimeError: if the state does not fit the adapted model key for key.
    """
    source = weights_path + SUFFIX
    installation = install_file(module, read_adapter(source), source, root="")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        installation.undo()
        raise


def check_fork(start_method: str) -> None:
    """In the launching process, before ``ddp_fork``/``ddp_notebook`` start theirs: refuse to fork a process
    that holds a process group (left by an earlier run in the same process or notebook): the forked
    processes would inherit it and wait forever.

    Raises:
        RuntimeError: saying how to release it.
    """
    if start_method != "spawn" and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError(
            f"this process already holds a torch.distributed process group (left by an earlier run here, e.g. "
            f"a ModelParallelStrategy Trainer), which the processes that start_method={start_method!r} forks would "
            f"inherit and wait on forever; call torch.distributed.destroy_process_group() first, or restart the "
            f"notebook kernel"
        )


def hook_launcher(owner: type) -> None:
    """Wrap, once per process, how the spawn launchers start (:func:`check_fork`, for Trainers with an
    ``owner`` callback) and how they load rank 0's final weights into the launching process
    (:func:`adopt_final_state`)."""
    _OWNERS.add(owner)
    original = _MultiProcessingLauncher._recover_results_in_main_process
    if getattr(original, _HOOKED, False):
        return
    launch = _MultiProcessingLauncher.launch

    @functools.wraps(launch)
    def checked_launch(self: _MultiProcessingLauncher, *args: Any, **kwargs: Any) -> Any:
        callbacks = getattr(kwargs.get("trainer"), "callbacks", [])
        if any(isinstance(callback, tuple(_OWNERS)) for callback in callbacks):
            check_fork(self._start_method)
        return launch(self, *args, **kwargs)

    @functools.wraps(original)
    def recover(self: _MultiProcessingLauncher, worker_output: Any, trainer: pl.Trainer) -> None:
        path = worker_output.weights_path
        if path is not None and exists(str(path) + SUFFIX):
            checkpoint_io = self._strategy.checkpoint_io
            try:
                state = checkpoint_io.load_checkpoint(path, weights_only=True)
                adopt_final_state(trainer.lightning_module, str(path), state)
            except Exception as err:  # the trained files stay where they are
                raise RuntimeError(
                    f"the trained model could not be loaded back into the launching process: {err}; its final "
                    f"weights are in {str(path)!r} and its adapter file in {str(path) + SUFFIX!r}"
                ) from err
            remove_if_exists(str(path) + SUFFIX)
            checkpoint_io.remove_checkpoint(path)
            worker_output = worker_output._replace(weights_path=None)
        original(self, worker_output, trainer)

    setattr(recover, _HOOKED, True)
    _MultiProcessingLauncher._recover_results_in_main_process = recover  # type: ignore[method-assign]
    _MultiProcessingLauncher.launch = checked_launch  # type: ignore[method-assign]

"""Counting walks of a model: each full traversal of its modules (``named_modules`` behind
``parameters()``, ``modules()``, ``requires_grad_()``..., a top-level ``state_dict()``, or this package's
own ``naming.walk``) started on the model itself."""

import contextlib
import sys
from collections import Counter

from torch import nn

import lightning_lora.naming as naming


@contextlib.contextmanager
def counting_walks(root: nn.Module):
    """Yields a Counter of the walks of ``root`` made inside the block, by kind."""
    counts: Counter = Counter()
    named_modules, state_dict, walk = nn.Module.named_modules, nn.Module.state_dict, naming.walk
    depth = [0]

    def counted_named_modules(self, *args, **kwargs):
        if self is root:
            counts["named_modules"] += 1
        return named_modules(self, *args, **kwargs)

    def counted_state_dict(self, *args, **kwargs):
        if self is root and depth[0] == 0:
            counts["state_dict"] += 1
        depth[0] += 1
        try:
            return state_dict(self, *args, **kwargs)
        finally:
            depth[0] -= 1

    def counted_walk(model, *args, **kwargs):
        if model is root:
            counts["walk"] += 1
        return walk(model, *args, **kwargs)

    users = [m for name, m in sys.modules.items() if name.startswith("lightning_lora") and getattr(m, "walk", None) is walk]
    nn.Module.named_modules, nn.Module.state_dict = counted_named_modules, counted_state_dict
    for module in users:
        module.walk = counted_walk
    try:
        yield counts
    finally:
        nn.Module.named_modules, nn.Module.state_dict = named_modules, state_dict
        for module in users:
            module.walk = walk

"""Loading pretrained weights by the base model's own names into adapted layers.

An adapter layer holds its base layer as ``original_module``, so ``q_proj.weight`` is stored as
``q_proj.original_module.weight``. Models built on the meta device (adapted, sharded, materialised,
then loaded, as litgpt and torchtitan do) load their pretrained weights after the adapters exist, by
the names the base model gives them. :func:`accept_base_names` registers two load hooks on an adapter
layer (and on an :class:`~lightning_lora.adapters.base.AdapterContainer`) so that ``load_state_dict``
takes either name:

- before the layer loads, each key that names a base tensor as the base model does
  (``<layer>.weight``) is moved to its adapted name; a whole (unsharded) tensor for a sharded base
  weight is cut into this rank's shard, as ``set_model_state_dict(..., full_state_dict=True)`` does
  for the other layers (where both names are given, the base model's wins: that is how
  ``set_model_state_dict`` passes them);
- after it loaded, if base tensors came under the base model's names, the layer's adapter tensors
  that the state dict did not hold are accepted as missing (they keep their values: a fresh adapter
  is the identity), so ``strict=True`` still fails for every missing base weight and every
  unexpected key; and a variant with tensors derived from the base weight (DoRA's magnitude) is
  reset from the weight just loaded, unless the state dict held them.

A merged layer refuses base weights by the base model's names: its weights hold the update, which
unmerging would take out of the new weights (a merged model's own state dict, by the adapted names,
still loads into it).

:func:`load_base_weights` is ``load_state_dict`` for a model that may be sharded (FSDP2): every rank
passes the whole pretrained state dict and keeps its own shards, strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_lora.sharding import shard_like

ORIGINAL = "original_module."


def accept_base_names(layer: nn.Module) -> None:
    """Register the load hooks that let ``layer`` (an adapter layer or container) take base-model names."""
    layer._register_load_state_dict_pre_hook(_move_base_names, with_module=True)
    layer.register_load_state_dict_post_hook(_after_load)


def load_base_weights(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
    """Load pretrained weights, named as the base model names them, into an adapted (and maybe sharded) model.

    ``model.load_state_dict`` already takes the base model's names (``q_proj.weight``); this also
    takes whole tensors for a model sharded with ``fully_shard`` (each rank cuts its own shard: call
    it on every rank with the same state dict, e.g. after Lightning materialised a model built on the
    meta device). Strict by default: every base weight must be given, and only adapter tensors may
    be missing (they keep their values: fresh adapters are the identity). DoRA's magnitude is reset
    from the loaded weights unless given. Changes ``model`` in place.

    Returns:
        ``load_state_dict``'s missing and unexpected keys (empty when strict).

    Raises:
        TypeError: if ``state_dict`` is not a mapping. RuntimeError: as ``load_state_dict`` does, for a
            missing base weight, an unexpected key or a shape that differs.

    Example::

        pretrained = safetensors.torch.load_file("model.safetensors")  # the base model's own names
        lightning_lora.load_base_weights(model, pretrained)
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    targets = model.state_dict(keep_vars=True)
    whole = {key: shard_like(value, targets[key]) if key in targets else value for key, value in state_dict.items()}
    return model.load_state_dict(whole, strict=strict)


def _move_base_names(
    layer: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Move ``<prefix><name>`` to ``<prefix>original_module.<name>`` for the base's own tensors."""
    original: nn.Module = getattr(layer, "original_module")
    base = original.state_dict(keep_vars=True)
    plain = [name for name in base if prefix + name in state_dict]
    loads_base = plain or any(prefix + ORIGINAL + name in state_dict for name in base)
    if plain and getattr(layer, "merged", False):
        raise RuntimeError(
            f"cannot load base weights into '{prefix[:-1]}' while its adapter is merged: the weights hold the "
            f"update, and unmerging would take it out of the new weights; unmerge first (unmerge_lora(model))"
        )
    for name in plain:
        state_dict[prefix + ORIGINAL + name] = shard_like(state_dict.pop(prefix + name), base[name])
    variant = getattr(layer, "variant", None)
    derived = variant is not None and loads_base and not any(prefix + key in state_dict for key in variant.params())
    vars(layer)["_loading"] = (prefix, bool(plain), derived)


def _after_load(layer: nn.Module, incompatible: Any) -> None:
    """Accept the adapter tensors as missing where base names were used; reset derived variant tensors."""
    prefix, plain, derived = vars(layer).pop("_loading", ("", False, False))
    if plain:
        adapter_keys = [k for k in incompatible.missing_keys if k.startswith(prefix) and not k.startswith(prefix + ORIGINAL)]
        for key in adapter_keys:
            incompatible.missing_keys.remove(key)
    if derived:
        getattr(layer, "variant").reset()

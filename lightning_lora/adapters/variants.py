"""LoRA variants: ``Variant``, the interface a variant implements, and :func:`register_variant`.

A variant changes how the adapters of some kinds compute, as PEFT's ``LoraVariant`` does: it may add
parameters to the layer, initialise them, replace the forward, and merge and unmerge differently.
An adapter's spec names its variant (``AdapterSpec.variant``); :class:`~lightning_lora.adapters.LoRABase`
builds one ``Variant`` object per layer, which keeps that layer's variant state, and calls it from its
forward, ``init_weights``, ``merge`` and ``unmerge``. Its rules (which kinds, biases and base weights
it takes) are checked in :meth:`Variant.check_settings` and :meth:`Variant.check_layer`, and nowhere
else. DoRA (:mod:`~lightning_lora.adapters.dora`) is the built-in variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lightning_lora.adapters import registry

if TYPE_CHECKING:
    from lightning_lora.adapters.base import LoRABase
    from lightning_lora.adapters.spec import AdapterSpec


class Variant:
    """A LoRA variant of one adapter layer. Subclasses set the class attributes and override the methods.

    Attributes:
        name: the name specs and files use.
        kinds: the names of the kinds it implements (empty: every kind).
        peft_config: the fields PEFT's ``adapter_config.json`` sets for it (``{"use_dora": True}``);
            None: PEFT has no such variant (export is refused).
        peft_tensors: its parameter names -> PEFT's key suffixes (``{"magnitude": "lora_magnitude_vector"}``).
        served_by_vllm: whether vLLM serves adapters of this variant.
        allows_bias: whether its adapters may have biases (``bias="auto"`` gives them none otherwise).
        layer: the adapter layer this object belongs to.
    """

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    peft_config: ClassVar[dict[str, Any] | None] = None
    peft_tensors: ClassVar[dict[str, str]] = {}
    served_by_vllm: ClassVar[bool] = False
    allows_bias: ClassVar[bool] = True

    def __init__(self, layer: LoRABase) -> None:
        """Create the variant's parameters on ``layer`` (its ``matrix_A`` and ``matrix_B`` exist already)."""
        self.layer = layer

    @classmethod
    def check_settings(cls, bias: bool, quantize: str | None) -> None:
        """Raise ``ValueError`` if the variant cannot have adapter biases (``bias``) or a base quantized
        with ``quantize``; checked when a config or spec is built."""
        if bias and not cls.allows_bias:
            raise ValueError(f"variant {cls.name!r} has no adapter bias: it needs bias=False, got bias=True")

    @classmethod
    def check_layer(cls, kind: type[LoRABase], original_module: nn.Module) -> None:
        """Raise ``ValueError`` if the variant cannot adapt ``original_module`` with ``kind``."""
        if cls.kinds and kind.kind not in cls.kinds:
            raise ValueError(
                f"variant {cls.name!r} is implemented for the kinds {list(cls.kinds)}, not for "
                f"{type(original_module).__name__} (kind {kind.kind!r}); leave this layer out of the targets"
            )

    @classmethod
    def param_shapes(cls, kind: type[LoRABase], original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        """The shapes of the parameters it adds (see :meth:`LoRABase.param_shapes`)."""
        return {}

    def params(self) -> dict[str, nn.Parameter]:
        """The parameters it added to the layer, by their names in the layer's ``state_dict``."""
        return {}

    def reset(self) -> None:
        """Set its parameters' initial values (after the layer's matrices got theirs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted layer's output for ``x`` (neither merged nor switched off)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def merged(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The merged weight in float32, from the float32 original ``weight`` and the layer's ``delta_weight()``."""
        return weight + delta

    def merged_bias(self, delta: torch.Tensor) -> torch.Tensor:
        """What merging adds to the base's bias, from the layer's ``delta_bias()`` (float32)."""
        return delta

    def unmerged(self, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merged` (before rounding), from the float32 merged weight."""
        return merged - delta

    def merge_done(self) -> None:
        """Forget what :meth:`merged` kept for :meth:`unmerged`."""

    @classmethod
    def check_export(cls, tensors: dict[str, torch.Tensor], module: str) -> None:
        """Refuse (``ValueError``) what PEFT would compute otherwise, from one module's own tensors."""


def register_variant(variant: type[Variant]) -> None:
    """Make a LoRA variant available to adapter specs (``AdapterSpec(variant=variant.name)``) by its name.

    Raises:
        TypeError: if ``variant`` is not a :class:`Variant` subclass.
        ValueError: if it has no name, or another class has that name.
    """
    if not (isinstance(variant, type) and issubclass(variant, Variant)) or variant is Variant:
        raise TypeError(f"variant must be a subclass of Variant, got {variant!r}")
    registry.add_variant(variant)

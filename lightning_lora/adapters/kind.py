"""``AdapterKind``: the hooks one kind of adapter layer implements, and what it says about itself.

A kind is a subclass of :class:`~lightning_lora.adapters.LoRABase` for one layout of base layer. It
owns which base it adapts (registered in :mod:`~lightning_lora.adapters.registry`), its parameters'
shapes, how they are created and initialised, its update and the update's delta weight (from which
merge and unmerge follow), its tensors' names in this package's files and in PEFT's and vLLM's
formats, and how a plain base layer is rebuilt around a state dict's tensors. The built-in kinds
(:mod:`~lightning_lora.adapters.linear`, :mod:`~lightning_lora.adapters.conv`,
:mod:`~lightning_lora.adapters.embedding`) are examples; a user's own kind implements at least
``create``, ``param_shapes``, ``update`` and ``delta_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import nn

from lightning_lora.adapters.spec import AdapterSpec


class AdapterKind(nn.Module):
    """The hooks of an adapter kind, with the defaults :class:`~lightning_lora.adapters.LoRABase` uses.

    Class attributes:
        kind: the kind's name, stored in adapter files and specs.
        all_linear: whether the ``all-linear`` target pattern selects layers of this kind.
        peft_a, peft_b: PEFT's keys of A and of B, each with the dimension that holds the rank.
        served_by_vllm: whether vLLM serves adapters of this kind.
        peft_bias: whether PEFT holds a ``lora_B.bias`` (``lora_bias``) for this kind.
        adapts_parameter: whether it adapts a module's parameter (PEFT's ``target_parameters``) rather
            than the module (``target_modules``).
    """

    kind: ClassVar[str] = ""
    all_linear: ClassVar[bool] = False
    peft_a: ClassVar[tuple[str, int]] = ("lora_A.weight", 0)
    peft_b: ClassVar[tuple[str, int]] = ("lora_B.weight", 1)
    served_by_vllm: ClassVar[bool] = False
    peft_bias: ClassVar[bool] = True
    adapts_parameter: ClassVar[bool] = False
    original_module: nn.Module
    matrix_A: nn.Module
    matrix_B: nn.Module
    dropout: nn.Module
    scaling: float

    def create(self, spec: AdapterSpec) -> None:
        """Create ``matrix_A`` and ``matrix_B`` for ``spec``, with the device and dtype of ``self.factory``
        (a dict for ``torch.nn`` constructors)."""
        raise NotImplementedError(f"{type(self).__name__} must implement create()")

    def reset_matrices(self) -> None:
        """Kaiming-uniform ``matrix_A`` (a=sqrt(5)); zero ``matrix_B`` weight and bias."""
        nn.init.kaiming_uniform_(base_weight(self.matrix_A), a=math.sqrt(5))
        for param in self.matrix_B.parameters(recurse=False):
            nn.init.zeros_(param)

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        """The shapes :meth:`adapter_params` will have for ``spec`` around ``original_module``.

        Computed without allocating anything, so a file's tensors can be checked against its claimed
        settings before an adapter is built. Kinds give their matrices' shapes; a variant's are added.
        """
        raise NotImplementedError(f"{cls.__name__} must implement param_shapes()")

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``matrix_B(matrix_A(dropout(x)))``, unscaled, in the dtype the adapter computes in."""
        raise NotImplementedError(f"{type(self).__name__} must implement update()")

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted output ``original_module(x) + scaling * update(x)`` (kinds may compute it fused)."""
        return self.original_module(x) + self.scaling * self.update(x)

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A`` in the original weight's layout, in float32."""
        raise NotImplementedError(f"{type(self).__name__} must implement delta_weight()")

    def delta_bias(self) -> torch.Tensor | None:
        """The constant the adapter adds to every output (float32), or None without adapter bias."""
        a_bias, b_bias = base_bias(self.matrix_A), base_bias(self.matrix_B)
        if a_bias is None or b_bias is None:
            return None
        return self.scaling * (base_weight(self.matrix_B).float() @ a_bias.float() + b_bias.float())

    @classmethod
    def to_peft(
        cls, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, base: nn.Module | None, with_bias: bool, name: str
    ) -> dict[str, torch.Tensor]:
        """One adapter's tensors (this package's names, relative to the layer) as PEFT's key suffixes.

        ``with_bias``: PEFT's ``lora_bias`` is on for the whole adapter, so a ``lora_B.bias`` is written
        even for a layer without adapter bias (zeros). ``base`` is the adapted layer, where known;
        ``name`` the module's, for messages.

        Raises:
            ValueError: if PEFT's format cannot hold this adapter exactly.
        """
        raise ValueError(f"adapters of kind {cls.kind!r} have no PEFT format")

    @classmethod
    def from_peft(cls, tensors: Mapping[str, torch.Tensor], base: nn.Module, name: str, source: str) -> dict[str, torch.Tensor]:
        """PEFT's tensors of one adapted module (by key suffix) as this package's, for layer ``base``.

        A ``lora_B.bias`` becomes the adapter's biases (``matrix_A.bias`` zero).

        Raises:
            ValueError: naming ``name`` and ``source``, if the tensors cannot be held exactly.
        """
        raise ValueError(f"{source}: adapters of kind {cls.kind!r} (module '{name}') have no PEFT format")

    @classmethod
    def parameter_base(cls, module: nn.Module, parameter: str) -> nn.Module:
        """For kinds that adapt a parameter: the base layer of the adapter of ``module``'s ``parameter``."""
        raise TypeError(f"kind {cls.kind!r} adapts modules, not parameters")

    @classmethod
    def container(cls, module: nn.Module) -> nn.Module:
        """For kinds that adapt a parameter: a new container that stands in for ``module`` and computes it
        with its parameters' adapters (see :class:`~lightning_lora.adapters.base.AdapterContainer`)."""
        raise TypeError(f"kind {cls.kind!r} adapts modules, not parameters")

    @classmethod
    def peft_rank(cls, tensors: Mapping[str, torch.Tensor], base: nn.Module) -> int:
        """The rank of PEFT's tensors of one adapter (by key suffix) of this kind around ``base``."""
        key, dim = cls.peft_a
        return int(tensors[key].shape[dim])

    @classmethod
    def pad_rank(cls, tensors: Mapping[str, torch.Tensor], r: int, rank: int) -> dict[str, torch.Tensor]:
        """PEFT's tensors of one adapter of rank ``r`` as tensors of rank ``rank`` (zeros added: the same update)."""
        padded = dict(tensors)
        for key, dim in (cls.peft_a, cls.peft_b):
            tensor = tensors[key]
            shape = list(tensor.shape)
            shape[dim] = rank - r
            padded[key] = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
        return padded

    @classmethod
    def peft_module(cls, name: str, siblings: list[str]) -> str:
        """The module path PEFT gives the adapter of module ``name`` (``siblings``: the adapters of the same
        base module, for kinds that adapt its parameters)."""
        return name

    @classmethod
    def base_keys(cls, name: str) -> tuple[str, str | None]:
        """The state-dict keys of the base weight and bias that the adapter of ``name`` merges into."""
        return f"{name}.weight", f"{name}.bias"

    @classmethod
    def rebuild_base(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec
    ) -> nn.Module:
        """A plain base layer of this kind around ``weight`` and ``bias`` (taken as they are), for merging a
        state dict; ``tensors`` are the adapter's own (names relative to the layer).

        Raises:
            ValueError: if the tensors do not fit this kind.
        """
        raise ValueError(f"adapters of kind {cls.kind!r} cannot be merged into a state dict")


def base_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, typed: every layer the package adapts or creates has one."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__}.weight is not a tensor"
    return weight


def base_bias(module: nn.Module) -> torch.Tensor | None:
    """``module.bias`` (None where the layer has none), typed."""
    bias = getattr(module, "bias", None)
    assert bias is None or isinstance(bias, torch.Tensor), f"{type(module).__name__}.bias is not a tensor"
    return bias


def peft_bias(
    tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, fold: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """PEFT's ``lora_B.bias`` of one adapter: ``B a + b`` (A's bias folded in: ``B(Ax + a) + b = BAx + (Ba + b)``),
    computed in float64 with ``fold(B, a)``, or zeros for an adapter without biases."""
    b = tensors["matrix_B.weight"]
    if not spec.bias:
        return torch.zeros(b.shape[0], dtype=b.dtype)
    folded = fold(b.double(), tensors["matrix_A.bias"].double()) + tensors["matrix_B.bias"].double()
    return folded.to(b.dtype)


def biases_from_peft(tensors: Mapping[str, torch.Tensor], rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter's biases for PEFT's ``lora_B.bias`` (A's bias zero), or {} without one."""
    if "lora_B.bias" not in tensors:
        return {}
    return {"matrix_A.bias": torch.zeros(rank, dtype=dtype), "matrix_B.bias": tensors["lora_B.bias"]}

"""``LoRABase``, the adapter layer every kind subclasses, and the helpers the kinds share.

An adapter layer wraps a base layer (``original_module``) and adds a low-rank update::

    forward(x) = original_module(x) + scaling * matrix_B(matrix_A(x))

``matrix_B`` starts at zero (weight and bias), so a freshly wrapped layer computes exactly what the
original did. ``merge()`` folds the update into the original weights (computed in float32, then
cast) and ``unmerge()`` takes it out again, bit for bit (:mod:`~lightning_lora.adapters.merging`).
This class owns what every kind shares: the settings (validated once, as an
:class:`~lightning_lora.adapters.spec.AdapterSpec`), the forward with its switches, the variant (e.g.
DoRA) and the merge bookkeeping. A kind (one subclass per base layout:
:mod:`~lightning_lora.adapters.linear`, :mod:`~lightning_lora.adapters.conv`,
:mod:`~lightning_lora.adapters.embedding`) implements the hooks of
:class:`~lightning_lora.adapters.kind.AdapterKind`. :func:`build_adapter` is the one place the package
constructs adapter layers, and :func:`register_adapter_kind` lets users add layer types.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, overload

import torch
from torch import nn

from lightning_lora.adapters import registry
from lightning_lora.adapters.base_names import accept_base_names
from lightning_lora.adapters.kind import AdapterKind, base_bias, base_weight
from lightning_lora.adapters.merging import MERGE_TOLERANCE, MergeRecord, merge_into_base, unmerge_from_base
from lightning_lora.adapters.spec import ADAPTER_DTYPES, AdapterSpec, dtype_name, dtype_setting
from lightning_lora.adapters.variants import Variant
from lightning_lora.quantize import quantized_format


class ZeroInit(nn.Module):
    """``reset_parameters`` sets weight and bias to zero: a ``matrix_B`` created on the meta device and
    materialised later (``to_empty``, then ``reset_parameters`` on every module with parameters, as
    Lightning's ``ModelParallelStrategy`` and torchtitan do) starts at zero, so the adapter is still
    the identity.

    Attributes:
        after_reset: called after each reset: the layer's variant tensors derived from the base weight
            (DoRA's magnitude) follow it. Materialisation resets a layer's modules in order, so this
            runs after the base layer (``original_module``, created first) has its values.
    """

    after_reset: Callable[[], None] | None = None

    def reset_parameters(self) -> None:
        for param in self.parameters(recurse=False):  # weight and bias
            nn.init.zeros_(param)
        if self.after_reset is not None:
            self.after_reset()


class ZeroLinear(ZeroInit, nn.Linear):
    """The ``nn.Linear`` of a ``matrix_B``: zero after ``reset_parameters``."""


class AdapterContainer(nn.Module):
    """Stands in for a base module some of whose *parameters* (not the module) are adapted.

    It holds the module as ``original_module`` and each parameter's adapter (a :class:`LoRABase`
    whose base is that parameter) as a child named after the parameter, and computes the module's
    forward with the adapters (see :class:`~lightning_lora.adapters.experts.ExpertsContainer`). Clean
    names see through it: the module keeps its name, an adapter is named after its parameter
    (``mlp.experts.gate_up_proj``).
    """

    original_module: nn.Module

    def __init__(self) -> None:
        super().__init__()
        accept_base_names(self)  # pretrained weights load by the base model's names too

    def adapters(self) -> dict[str, LoRABase]:
        """Parameter name -> its adapter."""
        return {name: child for name, child in self.named_children() if isinstance(child, LoRABase)}

    def attach(self, parameter: str, adapter: LoRABase) -> None:
        """Hold ``adapter`` as the adapter of ``original_module``'s ``parameter``."""
        self._modules[parameter] = adapter  # not add_module: the name is also the held module's parameter's

    def detach(self, parameter: str) -> None:
        """Drop the adapter of ``parameter``."""
        del self._modules[parameter]


class LoRABase(AdapterKind):
    """The adapter layer of one kind around ``original_module``: settings, forward, merge and unmerge.

    Args:
        original_module: the layer to adapt.
        bias: give ``matrix_A`` and ``matrix_B`` a bias (``matrix_B.bias`` starts at zero).
        alpha: the update is scaled by ``alpha / r``.
        r: rank of the update.
        dropout: dropout on the adapter's input; 0 does no dropout work.
        use_rslora: scale by ``alpha / sqrt(r)`` instead.
        adapter_dtype: dtype of the adapter weights (None: the original weight's dtype). The adapter
            computes in the input's dtype.
        use_dora: the DoRA variant (``variant="dora"``).
        variant: the name of a LoRA variant (see :class:`~lightning_lora.adapters.Variant`).

    Raises:
        ValueError: for a non-positive ``r`` or ``alpha``, ``r`` above the layer's size, ``dropout``
            outside [0, 1), or a variant this layer or these settings do not allow.
    """

    def __init__(
        self,
        original_module: nn.Module,
        bias: bool = True,
        alpha: float = 1,
        r: int = 4,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: str | torch.dtype | None = None,
        use_dora: bool = False,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        weight = base_weight(original_module)
        if use_dora and variant not in (None, "dora"):
            raise ValueError(f"use_dora=True and variant={variant!r} contradict each other; give one")
        spec = AdapterSpec(
            kind=self.kind,
            r=r,
            alpha=alpha,
            bias=bias,
            dropout=dropout,
            use_rslora=use_rslora,
            adapter_dtype=dtype_setting("adapter_dtype", dtype_name(weight.dtype) if adapter_dtype is None else adapter_dtype) or "",
            variant="dora" if use_dora else variant,
        )
        limit = max(weight.shape[0], math.prod(weight.shape[1:]))  # the larger of the layer's two sides
        if spec.r > limit:
            raise ValueError(
                f"r must be at most {limit} for a {type(original_module).__name__} of weight shape "
                f"{tuple(weight.shape)} (a higher rank adds nothing), got r={spec.r}"
            )
        variant_cls = None if spec.variant is None else registry.variant_named(spec.variant)
        if variant_cls is not None:
            variant_cls.check_layer(type(self), original_module)
        self.original_module = original_module
        self.r = spec.r
        self.alpha = spec.alpha
        self.use_rslora = spec.use_rslora
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True  # False: forward runs the original layer alone, in every thread (set_adapters_enabled)
        #: thread id -> how many ``disable_adapters`` blocks of that thread hold this layer off
        self.off_threads: dict[int, int] = {}
        self.variant: Variant | None = None
        self.factory: dict[str, Any] = {"device": weight.device, "dtype": ADAPTER_DTYPES[spec.adapter_dtype]}
        self._merge_record: MergeRecord | None = None
        self.create(spec)
        if variant_cls is not None:
            self.variant = variant_cls(self)
            if isinstance(self.matrix_B, ZeroInit):  # materialised after the base: the variant follows it
                self.matrix_B.after_reset = self.variant.reset
        self.init_weights()
        accept_base_names(self)  # pretrained weights load by the base model's names too

    def reset_parameters(self) -> None:
        """The layer's own tensors (a variant's, e.g. DoRA's magnitude) from the base weight as it is now.

        Materialisation (``to_empty``, then ``reset_parameters`` on every module with parameters)
        reaches this layer before its base layer; ``matrix_B``'s reset, which comes after both,
        runs the variant's reset again (:class:`ZeroInit`), and loading the base weights does too.
        """
        if self.variant is not None:
            self.variant.reset()

    def init_weights(self) -> None:
        """The initial values: :meth:`reset_matrices` (B zero), then the variant's (DoRA's magnitude)."""
        self.reset_matrices()
        if self.variant is not None:
            self.variant.reset()

    @property
    def has_bias(self) -> bool:
        """Whether the adapter has biases (``matrix_B.bias`` is not None)."""
        return base_bias(self.matrix_B) is not None

    @property
    def use_dora(self) -> bool:
        """Whether the variant is DoRA."""
        return self.variant is not None and self.variant.name == "dora"

    @property
    def spec(self) -> AdapterSpec:
        """This adapter's settings; :func:`build_adapter` rebuilds it from them around the same layer."""
        return AdapterSpec(
            kind=self.kind,
            r=self.r,
            alpha=self.alpha,
            bias=self.has_bias,
            dropout=self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0,
            use_rslora=self.use_rslora,
            adapter_dtype=dtype_name(base_weight(self.matrix_A).dtype),
            variant=None if self.variant is None else self.variant.name,
        )

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (what LoRA trains), by name relative to this layer.

        The names are also the layer's ``state_dict`` keys of those tensors (``matrix_A.weight``, ...,
        and a variant's, such as DoRA's ``magnitude``).
        """
        params = {
            f"{part}.{key}": param
            for part, module in (("matrix_A", self.matrix_A), ("matrix_B", self.matrix_B))
            for key, param in module.named_parameters()
        }
        if self.variant is not None:
            params.update(self.variant.params())
        return params

    @classmethod
    def shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        """:meth:`param_shapes` of the kind and of ``spec``'s variant together."""
        shapes = cls.param_shapes(original_module, spec)
        if spec.variant is not None:
            shapes.update(registry.variant_named(spec.variant).param_shapes(cls, original_module, spec))
        return shapes

    @property
    def merge_creates_bias(self) -> bool:
        """Whether merging adds a bias the original layer does not have (it changes the architecture)."""
        original_bias = getattr(self.original_module, "bias", None)
        created = self._merge_record is not None and self._merge_record.created_bias
        return self.delta_bias() is not None and (original_bias is None or created)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``original_module(x) + scaling * matrix_B(matrix_A(dropout(x)))`` (or the variant's output);
        the original alone when merged or switched off."""
        if self.merged or self.switched_off():
            return self.original_module(x)
        if self.variant is not None:
            return self.variant.forward(x)
        return self.lora_forward(x)

    def merge(self, tolerance: float = MERGE_TOLERANCE) -> None:
        """Fold the update into ``original_module`` in place; forward then runs the original alone.

        The update is computed in float32 and added to the weight in float32 before one cast to the
        weight's dtype (a variant may merge otherwise: DoRA's merged weight is
        ``m * (W + delta) / ||W + delta||`` per output row). In a low-precision dtype an update much
        smaller than the weights is rounded away: the relative error of the update actually applied
        is measured, and above ``tolerance`` the merge is refused and nothing is changed. The
        rounding is recorded (as small integers), so that :meth:`unmerge` restores the original
        weights bit for bit (see :mod:`lightning_lora.adapters.merging`).

        Raises:
            RuntimeError: if the layer is already merged, its weight is quantized (merging would
                requantize it), or the merged update would be off by more than ``tolerance``
                (relative, in norm) because of the weight's dtype.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        if not self.enabled or self.off_threads:
            raise RuntimeError(
                f"{type(self).__name__} is switched off (inside a disable_adapters block, or by "
                f"set_adapters_enabled(model, False)): merging would put the update back into the base; merge after it"
            )
        self._merge_record = merge_into_base(self, tolerance)
        self.merged = True

    def unmerge(self) -> None:
        """Take the update out of ``original_module`` again, restoring the weights bit for bit.

        Raises:
            RuntimeError: if the layer is not merged.
        """
        if not self.merged or self._merge_record is None:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        unmerge_from_base(self, self._merge_record)
        self._merge_record = None
        self.merged = False

    def switched_off(self) -> bool:
        """Whether forward runs the original layer alone in the calling thread: switched off for every
        thread, or inside one of this thread's ``disable_adapters`` blocks (other threads' blocks do
        not count; while ``torch.compile`` traces, which cannot ask for the thread, any block counts)."""
        if not self.enabled:
            return True
        if not self.off_threads:
            return False
        return torch.compiler.is_compiling() or threading.get_ident() in self.off_threads

    def extra_repr(self) -> str:
        variant = f", variant={self.variant.name!r}" if self.variant is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{variant}, merged={self.merged}"


def register_adapter_kind(layer_type: type[nn.Module], kind: str | type[LoRABase]) -> None:
    """Adapt layers of ``layer_type`` (and its subclasses) with the adapter kind ``kind``.

    After this call the layer type goes through ``apply_lora``, ``LoRACallback``, adapter files,
    merge/unmerge and PEFT export like a built-in one.

    Args:
        layer_type: the ``nn.Module`` subclass to adapt.
        kind: a built-in kind's name, for a layer whose weight has that kind's layout and whose
            forward computes what that kind's base layer does: ``"linear"`` (weight ``(out, in)``,
            ``x @ W.T + b``), ``"transformers_conv1d"`` (weight ``(in, out)``), ``"conv"`` (an
            ``nn.ConvNd``'s weight and geometry) or ``"embedding"``; or an adapter layer class of your
            own: a subclass of :class:`LoRABase` with a new ``kind`` name that implements the hooks
            this module's docstring lists.

    Raises:
        TypeError: if ``layer_type`` is not an ``nn.Module`` subclass, or ``kind`` is neither a kind's
            name nor a ``LoRABase`` subclass.
        ValueError: for an unknown kind name, a kind class without a ``kind`` name or whose name
            another class has, or a layer type registered already with another kind.

    Example::

        >>> class ScaledLinear(nn.Linear):  # a linear layer with a forward of its own
        ...     def forward(self, x):
        ...         return super().forward(x) * 0.5
        >>> register_adapter_kind(ScaledLinear, "linear")
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r} ({type(layer_type).__name__})")
    if isinstance(kind, str):
        cls = registry.kind_named(kind)
    elif isinstance(kind, type) and issubclass(kind, LoRABase) and kind is not LoRABase:
        own = [klass for klass in kind.__mro__ if issubclass(klass, LoRABase) and klass is not LoRABase]
        missing = [hook for hook in ("create", "param_shapes", "update", "delta_weight") if not any(hook in vars(k) for k in own)]
        if missing:
            raise ValueError(f"kind {kind.__name__} must implement {missing} (see lightning_lora.adapters.kind.AdapterKind)")
        cls = kind
    else:
        raise TypeError(f"kind must be a kind's name or a subclass of LoRABase, got {kind!r} ({type(kind).__name__})")
    registry.add_type(layer_type, cls)


def build_adapter(module: nn.Module, spec: AdapterSpec, name: str, kind: type[LoRABase] | None = None) -> LoRABase:
    """A new adapter layer with settings ``spec`` around ``module`` (named ``name`` in errors).

    ``kind``: the kind that adapts ``module`` where its type does not say (the view of a parameter
    that a kind adapts); default: the kind registered for its type.

    Raises:
        TypeError: if ``module`` cannot take an adapter of ``spec.kind``.
        ValueError: if the settings do not fit the module (e.g. a conv's groups).
    """
    cls = kind or registry.kind_of(module, name)
    if cls.kind != spec.kind:
        raise TypeError(f"cannot put a {spec.kind!r} adapter on module '{name}' of type {type(module).__name__}")
    try:
        return cls(
            module,
            bias=spec.bias,
            alpha=spec.alpha,
            r=spec.r,
            dropout=spec.dropout,
            use_rslora=spec.use_rslora,
            adapter_dtype=spec.adapter_dtype,
            variant=spec.variant,
        )
    except ValueError as err:
        raise ValueError(f"cannot adapt module '{name}': {err}") from err


def base_layer(module: nn.Module) -> nn.Module:
    """The base layer of an adapter (its ``original_module``), or ``module`` itself when it is none."""
    return module.original_module if isinstance(module, LoRABase) else module


def check_dims(weight: torch.Tensor, dims: tuple[int, ...], spec: AdapterSpec) -> None:
    """Raise ``ValueError`` unless ``weight`` has one of ``dims`` dimensions (for :meth:`LoRABase.rebuild_base`)."""
    if weight.dim() not in dims:
        raise ValueError(
            f"a {spec.kind!r} adapter needs a base weight of {' or '.join(map(str, dims))} dimensions, got shape "
            f"{tuple(weight.shape)}"
        )


def holding(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``layer`` (built on the meta device) with ``weight`` and ``bias`` as its frozen parameters."""
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the adapter computes in: autocast's when active, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def cast(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's weight and bias in ``dtype`` (differentiable casts; no copy when already there)."""
    bias = base_bias(layer)
    return base_weight(layer).to(dtype), None if bias is None else bias.to(dtype)


@overload
def in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...
@overload
def in_dtype(tensor: None, dtype: torch.dtype) -> None: ...
@overload
def in_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None: ...
def in_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` cast to ``dtype`` (a differentiable cast), itself when already there or None."""
    if tensor is None or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def fused_dtype(linear: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused linear node computes ``linear`` in for input ``x``, or None where it must not run.

    It runs where it computes exactly what ``F.linear`` would: an ``nn.Linear`` itself (not a
    subclass) with a plain weight (not a quantized one, which ``F.linear`` dequantizes), no module
    hooks to call, input and weight on one device, and either one shared dtype or, under autocast,
    float32 and the autocast dtype only (the tensors autocast casts).
    """
    if type(linear) is not nn.Linear or _has_hooks(linear):
        return None
    weight = linear.weight
    if quantized_format(weight) is not None:
        return None
    if x.dim() == 0 or x.shape[-1] != linear.in_features or x.device != weight.device:
        return None  # the separate layers raise the usual error, if any
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        allowed = (torch.float32, dtype)
        return dtype if x.dtype in allowed and weight.dtype in allowed else None
    return x.dtype if x.dtype == weight.dtype and x.is_floating_point() else None


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) besides ``forward``."""
    hooks = torch.nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )

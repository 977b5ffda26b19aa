"""The ``experts`` kinds: LoRA on the fused 3-D expert weights of mixture-of-experts layers.

transformers v5 holds the experts of an MoE layer as 3-D parameters of one module
(``mlp.experts.gate_up_proj`` (experts, 2 * intermediate, hidden), ``mlp.experts.down_proj``) whose
class is marked by ``use_experts_implementation``, which also says how the module uses them:
``is_transposed`` (the weights are (experts, in, out), as gpt-oss holds them, else (experts, out, in)),
``has_gate``, ``has_bias``, the gating ``_apply_gate``, ``act_fn`` and ``has_post_expert_norm``. A
target pattern that matches such a parameter's qualified name adapts it with one rank-``r`` LoRA per
expert, as PEFT's ``target_parameters`` does: ``matrix_A`` (experts * r, in) and ``matrix_B``
(out, experts * r), expert ``e`` using rows ``e*r:(e+1)*r`` of A and columns ``j*experts + e`` of B
(PEFT's layout), scaled by ``alpha / r``. One kind per layout, read from the module's own flag:
``experts`` and ``experts_transposed``.

The module is replaced by an :class:`ExpertsContainer` that holds it and the adapters. Its forward
computes each token's expert update from A and B with grouped products (``A x``, then ``B (A x)``,
for the tokens routed to each expert), never a per-expert delta weight, and the base products as
transformers' default ``grouped_mm`` implementation does: a fresh adapter computes what the module
did, bit for bit (with ``experts_implementation="eager"`` or ``"batched_mm"``, up to float rounding).
Expert biases stay frozen; the adapters have no bias and no dropout (as PEFT's).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.adapters import registry
from lightning_lora.adapters.base import AdapterContainer, LoRABase, ZeroLinear, base_weight
from lightning_lora.adapters.spec import AdapterSpec

#: The expert weights LoRA adapts, in the order transformers registers them (the up projection first).
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
_SIGNATURES: dict[type, inspect.Signature] = {}


def expert_parameters(module: nn.Module) -> dict[str, type[LoRABase]]:
    """The parameters of a transformers experts module that LoRA adapts, each with its kind; {} for other modules."""
    transposed = getattr(module, "is_transposed", None)
    if not isinstance(transposed, bool) or not isinstance(getattr(module, "has_gate", None), bool):
        return {}
    kind = LoRAExpertsTransposed if transposed else LoRAExperts
    return {
        name: kind
        for name, param in module.named_parameters(recurse=False)
        if name in EXPERT_PARAMETERS and param.dim() == 3
    }


class ExpertsWeight(nn.Module):
    """One 3-D parameter of an experts module as the base layer of its adapter: ``weight`` is that parameter.

    The experts module is referenced, not registered: it stays where it is, in the container.
    """

    def __init__(self, experts: nn.Module, parameter: str) -> None:
        super().__init__()
        object.__setattr__(self, "experts", experts)
        self.parameter = parameter

    @property
    def weight(self) -> torch.Tensor:
        weight = getattr(self.experts, self.parameter)
        assert isinstance(weight, torch.Tensor), f"{self.parameter} is a tensor of its experts module"
        return weight

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError(f"expert weight {self.parameter!r} is computed by its ExpertsContainer, not called")

    def extra_repr(self) -> str:
        return f"parameter={self.parameter!r}"


class LoRAExperts(LoRABase):
    """LoRA on a 3-D expert weight held (experts, out, in): one rank-``r`` adapter per expert.

    Built by :func:`~lightning_lora.apply_lora` for a target that names the parameter; computed by
    its :class:`ExpertsContainer`. ``delta_weight()`` is the per-expert update in the weight's layout,
    for merging.
    """

    kind = "experts"
    transposed = False  # the weight is (experts, out, in)
    served_by_vllm = True
    peft_bias = False
    adapts_parameter = True
    original_module: ExpertsWeight
    matrix_A: nn.Linear
    matrix_B: nn.Linear

    @classmethod
    def dims(cls, weight: torch.Tensor) -> tuple[int, int, int]:
        """``(experts, in, out)`` of a weight of this kind's layout."""
        experts, first, second = weight.shape
        return (experts, first, second) if cls.transposed else (experts, second, first)

    def create(self, spec: AdapterSpec) -> None:
        if spec.bias:
            raise ValueError("expert weights take adapters without bias (as PEFT's target_parameters), got bias=True")
        if spec.dropout:
            raise ValueError(
                f"expert weights take adapters without dropout (as PEFT's target_parameters), got dropout={spec.dropout}"
            )
        experts, n_in, n_out = self.dims(base_weight(self.original_module))
        self.num_experts = experts
        self.matrix_A = nn.Linear(n_in, spec.r * experts, bias=False, **self.factory)
        self.matrix_B = ZeroLinear(spec.r * experts, n_out, bias=False, **self.factory)

    @classmethod
    def param_shapes(cls, original_module: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        experts, n_in, n_out = cls.dims(base_weight(original_module))
        return {"matrix_A.weight": (spec.r * experts, n_in), "matrix_B.weight": (n_out, spec.r * experts)}

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A as ``(experts, in, r)`` and B as ``(experts, r, out)`` in ``dtype``: per-expert operands of grouped products."""
        experts = self.num_experts
        a = base_weight(self.matrix_A).to(dtype)  # (experts * r, in)
        b = base_weight(self.matrix_B).to(dtype)  # (out, experts * r)
        b_per_expert = b.view(b.shape[0], self.r, experts).permute(2, 1, 0).contiguous()  # B is adapter-sized: a cheap copy
        return a.view(experts, self.r, -1).transpose(1, 2), b_per_expert

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an expert weight's adapter is computed by its ExpertsContainer, with the routing")

    def delta_weight(self) -> torch.Tensor:
        experts = self.num_experts
        a = base_weight(self.matrix_A).float().view(experts, self.r, -1)  # (experts, r, in)
        b = base_weight(self.matrix_B).float()
        b = b.view(b.shape[0], self.r, experts)  # (out, r, experts)
        delta = self.scaling * torch.einsum("ore,eri->eoi", b, a)  # (experts, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    @classmethod
    def to_peft(
        cls, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, base: nn.Module | None, with_bias: bool, name: str
    ) -> dict[str, torch.Tensor]:
        if with_bias:
            raise ValueError(
                f"PEFT's adapters of expert weights (target_parameters) have no lora_bias, and other modules of this "
                f"adapter have biases ('{name}' is an expert weight); adapt every module with bias=False to export"
            )
        return {"lora_A.weight": tensors["matrix_A.weight"], "lora_B.weight": tensors["matrix_B.weight"]}

    @classmethod
    def from_peft(cls, tensors: Mapping[str, torch.Tensor], base: nn.Module, name: str, source: str) -> dict[str, torch.Tensor]:
        if "lora_B.bias" in tensors:
            raise ValueError(f"{source}: expert weight '{name}' has a lora_B.bias, which PEFT's target_parameters cannot have")
        return {"matrix_A.weight": tensors["lora_A.weight"], "matrix_B.weight": tensors["lora_B.weight"]}

    @classmethod
    def parameter_base(cls, module: nn.Module, parameter: str) -> nn.Module:
        return ExpertsWeight(module, parameter)

    @classmethod
    def container(cls, module: nn.Module) -> nn.Module:
        return ExpertsContainer(module)

    @classmethod
    def peft_rank(cls, tensors: Mapping[str, torch.Tensor], base: nn.Module) -> int:
        return int(tensors["lora_A.weight"].shape[0]) // cls.dims(base_weight(base))[0]

    @classmethod
    def pad_rank(cls, tensors: Mapping[str, torch.Tensor], r: int, rank: int) -> dict[str, torch.Tensor]:
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        experts = a.shape[0] // r
        padded_a = torch.cat([a.view(experts, r, -1), a.new_zeros(experts, rank - r, a.shape[1])], dim=1)
        padded_b = torch.cat([b.view(b.shape[0], r, experts), b.new_zeros(b.shape[0], rank - r, experts)], dim=1)
        return {"lora_A.weight": padded_a.reshape(experts * rank, -1), "lora_B.weight": padded_b.reshape(b.shape[0], -1)}

    @classmethod
    def peft_module(cls, name: str, siblings: list[str]) -> str:
        """PEFT's path of the wrapper of parameter ``name``: parameters of one module are wrapped in turn, the
        first one (in :data:`EXPERT_PARAMETERS` order) innermost (``mlp.experts.base_layer``), the last one as
        ``mlp.experts``. ``siblings``: the adapted parameters of the same module (qualified names)."""
        owner, _, parameter = name.rpartition(".")
        order = sorted((s.rpartition(".")[2] for s in siblings), key=_canonical)
        return owner + ".base_layer" * (len(order) - 1 - order.index(parameter))

    @classmethod
    def base_keys(cls, name: str) -> tuple[str, str | None]:
        return name, None  # the parameter itself; expert biases stay as they are

    @classmethod
    def rebuild_base(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], spec: AdapterSpec
    ) -> nn.Module:
        if weight.dim() != 3:
            raise ValueError(f"a {spec.kind!r} adapter needs a 3-D expert weight, got shape {tuple(weight.shape)}")
        holder = nn.Module()
        holder.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        return ExpertsWeight(holder, "weight")


class LoRAExpertsTransposed(LoRAExperts):
    """LoRA on a 3-D expert weight held (experts, in, out), as gpt-oss holds them."""

    kind = "experts_transposed"
    transposed = True


class ExpertsContainer(AdapterContainer):
    """Stands in for a transformers experts module whose weights are adapted; computes its forward with them.

    Attributes the model reads from the experts module (``num_experts``...) are read through.
    """

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.original_module = experts

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        experts = self.original_module
        active = {name: a for name, a in self.adapters().items() if not (a.merged or a.switched_off())}
        if not active:
            return experts(*args, **kwargs)
        signature = _SIGNATURES.setdefault(type(experts), inspect.signature(type(experts).forward))
        hidden_states, top_k_index, top_k_weights = list(signature.bind(experts, *args, **kwargs).arguments.values())[1:4]
        return experts_forward(experts, hidden_states, top_k_index, top_k_weights, active)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)


def experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    adapters: Mapping[str, LoRABase],
) -> torch.Tensor:
    """The output of a transformers experts module for routed tokens, with the LoRA updates of ``adapters``.

    Args:
        experts: the module (``use_experts_implementation`` flags: ``has_gate``, ``has_bias``,
            ``is_transposed``, ``has_post_expert_norm``).
        hidden_states: ``(tokens, hidden)``.
        top_k_index, top_k_weights: ``(tokens, top_k)``: the experts each token is routed to, and their weights.
        adapters: parameter name -> its adapter (:class:`LoRAExperts`).

    Returns:
        ``(tokens, hidden)``, in ``hidden_states``' dtype.
    """
    if getattr(experts, "_is_expert_parallel", False):
        raise RuntimeError("LoRA on expert weights does not support expert parallelism (its experts are split over ranks)")
    num_experts = int(getattr(experts, "down_proj").shape[0])
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights, expert_ids = top_k_weights.reshape(-1), top_k_index.reshape(-1)  # (S,) for S = tokens * top_k
    expert_ids_g, perm = torch.sort(expert_ids)  # grouped by expert, as transformers' grouped_mm implementation
    selected = hidden_states[perm // num_top_k]
    counts_input = expert_ids_g.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    projected = _projection(experts, up, selected, offsets, expert_ids_g, adapters.get(up))
    activate: Callable[[torch.Tensor], torch.Tensor] = getattr(experts, "_apply_gate" if experts.has_gate else "act_fn")
    projected = _projection(experts, "down_proj", activate(projected), offsets, expert_ids_g, adapters.get("down_proj"))
    if experts.has_post_expert_norm:
        norm: Callable[[torch.Tensor], torch.Tensor] = getattr(experts, "post_expert_norm")
        projected = norm(projected)
    weighted = projected * sample_weights[perm].unsqueeze(-1)  # (S, hidden)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _projection(
    experts: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor, adapter: LoRABase | None
) -> torch.Tensor:
    """``x`` (grouped by expert) through expert weight ``name`` and its bias, plus ``scaling * B_e (A_e x)``."""
    weight = getattr(experts, name)
    out = _grouped(x, weight if experts.is_transposed else weight.transpose(-2, -1), offsets)
    if experts.has_bias:
        out.add_(getattr(experts, f"{name}_bias")[expert_ids])
    if adapter is not None:
        assert isinstance(adapter, LoRAExperts), "expert weights take LoRAExperts adapters"
        a, b = adapter.factors(weight.dtype)
        out = out + adapter.scaling * _grouped(_grouped(x, a, offsets), b, offsets)
    return out


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``weight[e]`` (``(experts, in, out)``), for every expert."""
    x = x.to(weight.dtype)
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, weight, offs=offsets)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[start:end] @ weight[e] for e, (start, end) in enumerate(zip(starts, ends))])


def _canonical(parameter: str) -> int:
    return EXPERT_PARAMETERS.index(parameter) if parameter in EXPERT_PARAMETERS else len(EXPERT_PARAMETERS)


registry.add_kind(LoRAExperts)
registry.add_kind(LoRAExpertsTransposed)
registry.add_parameter_finder(expert_parameters)

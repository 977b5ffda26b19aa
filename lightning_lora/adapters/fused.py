"""One autograd node for a LoRA-adapted linear layer: the base linear and the adapter together.

Besides the two skinny adapter matmuls (four in backward), the plain path
``original(x) + scaling * B(A(x))`` makes full passes over activations: forward multiplies the
adapter output by ``scaling`` and adds it to the base output, backward multiplies the output
gradient by ``scaling`` again and adds the adapter's input gradient to the base one. Here instead:

- forward: ``out = addmm(bias, x, W^T)`` then ``out += scaling * (x A^T) B^T`` in place, as a
  second ``addmm`` that accumulates into ``out`` with ``alpha=scaling`` (an adapter bias is folded
  into the base bias vector, also scaled);
- backward: ``grad_x = grad_out W`` then ``grad_x += (scaling * grad_out B) A`` in place;
  ``scaling`` is applied to the ``r``-wide intermediate, never to a full-width activation;
- saved for backward: ``x``, ``A``, ``B`` and ``x A^T`` (``r`` wide), besides the base weight;
- without grad mode, no autograd node at all.

The skinny matmuls remain: each streams a full activation or gradient through memory, so on a
CPU each costs far more than its small share of the arithmetic.

Everything is computed in the dtype of the tensors passed in: the caller casts them (under
autocast, to the autocast dtype), so float32 master weights of the adapter train as usual.
"""

from __future__ import annotations

from typing import Any

import torch


def _forward(
    x: torch.Tensor,
    dropped: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_weight: torch.Tensor,
    a_bias: torch.Tensor | None,
    b_weight: torch.Tensor,
    b_bias: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output ``(..., out)``, and the 2-D input, adapter input and ``x A^T`` that backward needs."""
    in_features, out_features = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, in_features)  # (N, in)
    d2 = x2 if dropped is None else dropped.reshape(-1, in_features)
    hidden = torch.mm(d2, a_weight.t()) if a_bias is None else torch.addmm(a_bias, d2, a_weight.t())  # (N, r)
    if b_bias is not None:
        bias = b_bias * scaling if bias is None else torch.add(bias, b_bias, alpha=scaling)
    out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())  # (N, out)
    out.addmm_(hidden, b_weight.t(), alpha=scaling)
    return out.view(*x.shape[:-1], out_features), x2, d2, hidden


class _LoRALinearFunction(torch.autograd.Function):
    """``x W^T + b + scaling * ((d A^T + a) B^T + b_B)`` with ``d`` = x, or a dropout of x when given."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a_weight: torch.Tensor,
        a_bias: torch.Tensor | None,
        b_weight: torch.Tensor,
        b_bias: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        out, x2, d2, hidden = _forward(x, dropped, weight, bias, a_weight, a_bias, b_weight, b_bias, scaling)
        # the base weight only where the input's gradient needs it (it may be an inference tensor)
        kept = weight if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(x2, d2 if dropped is not None else None, kept, a_weight, b_weight, hidden)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, d2, weight, a_weight, b_weight, hidden = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scaling = ctx.scaling
        g = grad_out.reshape(-1, b_weight.shape[0])  # (N, out)
        grad_hidden = torch.mm(g, b_weight).mul_(scaling)  # (N, r)
        grad_x = grad_dropped = None
        if needs[0]:
            grad_x = torch.mm(g, weight)  # (N, in)
            if d2 is None:
                grad_x.addmm_(grad_hidden, a_weight)  # the adapter's share, accumulated in place
            grad_x = grad_x.view(ctx.x_shape)
        if needs[1]:
            grad_dropped = torch.mm(grad_hidden, a_weight).view(ctx.x_shape)
        grad_weight = torch.mm(g.t(), x2) if needs[2] else None
        g_sum = g.sum(0) if needs[3] or needs[7] else None
        grad_a_weight = torch.mm(grad_hidden.t(), x2 if d2 is None else d2) if needs[4] else None
        grad_a_bias = grad_hidden.sum(0) if needs[5] else None
        # (hidden^T g)^T rather than g^T hidden: CPU BLAS runs this product about three times
        # faster with the r-row operand on the left.
        grad_b_weight = torch.mm(hidden.t(), g).mul_(scaling).t() if needs[6] else None
        grad_b_bias = g_sum * scaling if needs[7] else None
        grad_bias = g_sum if needs[3] else None
        return (grad_x, grad_dropped, grad_weight, grad_bias, grad_a_weight, grad_a_bias, grad_b_weight,
                grad_b_bias, None)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a_weight: torch.Tensor,
    a_bias: torch.Tensor | None,
    b_weight: torch.Tensor,
    b_bias: torch.Tensor | None,
    scaling: float,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling * F.linear(F.linear(d, a_weight, a_bias), b_weight, b_bias)``.

    ``d`` is ``dropped`` when given (dropout applied to ``x`` by the caller, so that autograd
    takes the gradient through the dropout mask), else ``x`` itself. Gradients flow to every
    tensor that requires them. All tensors must share one dtype and device; ``x`` may have any
    number of leading dimensions.

    Args:
        x: the input, shape ``(..., in_features)``.
        weight, bias: the base layer's parameters, shapes ``(out, in)`` and ``(out,)``.
        a_weight, a_bias: ``matrix_A``'s parameters, shapes ``(r, in)`` and ``(r,)``.
        b_weight, b_bias: ``matrix_B``'s parameters, shapes ``(out, r)`` and ``(out,)``.
        scaling: the factor of the low-rank update.
        dropped: the adapter's input when it differs from ``x`` (dropout), shaped like ``x``.

    Returns:
        The output, shape ``(..., out_features)``.

    Example::

        >>> x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        >>> out = lora_linear(x, w, None, a, None, b, None, 0.5)
        >>> torch.allclose(out, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-5)
        True
    """
    if torch.is_grad_enabled():
        return _LoRALinearFunction.apply(x, dropped, weight, bias, a_weight, a_bias, b_weight, b_bias, scaling)
    return _forward(x, dropped, weight, bias, a_weight, a_bias, b_weight, b_bias, scaling)[0]  # no autograd node

"""The bound domain: what every graph value carries (DESIGN.md §1).

A :class:`Bound` pairs an l2 *ball* (``center``, per-sample ``radius``) with a *box*
(``lower``, ``upper``, elementwise). For every input ``x'`` in the perturbation set and every graph
value ``a``::

    ||a(x') - a(x)||_2 <= radius        and        lower <= a(x') <= upper

Either half may be absent (``None``): the ``ibp`` method keeps no ball after the input, the
``lipschitz`` method keeps no box. A ball always implies a box, so whenever both are present the
box is intersected with ``center ± radius`` (:func:`bound`); intersecting two sound boxes is sound.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Bound(NamedTuple):
    """Ball ``(center, radius)`` and box ``[lower, upper]`` enclosing one graph value."""

    center: Tensor
    radius: Optional[Tensor]  # (B,) l2 radius, or None when no ball is tracked
    lower: Optional[Tensor]  # same shape as center, or None when no box is tracked
    upper: Optional[Tensor]


def expand_radius(radius: Tensor, like: Tensor) -> Tensor:
    """View a per-sample radius ``(B,)`` so it broadcasts against ``like`` ``(B, ...)``."""
    return radius.reshape(radius.shape + (1,) * (like.dim() - 1))


class _Select(torch.autograd.Function):
    """``where(mask, a, b)`` whose backward keeps only the boolean mask (1 byte per element)."""

    @staticmethod
    def forward(ctx, a, b, take_a):
        out = torch.where(take_a, a, b)
        ctx.save_for_backward(take_a)
        return out

    @staticmethod
    def backward(ctx, grad):
        (take_a,) = ctx.saved_tensors
        grad_a = grad * take_a
        return grad_a, grad - grad_a, None


class _Relu(torch.autograd.Function):
    """``relu(x)`` whose backward keeps only the boolean mask ``x > 0`` (torch's keeps the float
    output): the box ends of every ReLU layer are saved at a quarter of the memory."""

    @staticmethod
    def forward(ctx, x):
        positive = x > 0
        ctx.save_for_backward(positive)
        return x * positive

    @staticmethod
    def backward(ctx, grad):
        (positive,) = ctx.saved_tensors
        return grad * positive


def relu(x: Tensor) -> Tensor:
    """``torch.relu`` (exact), with a boolean-mask backward when autograd records it."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Relu.apply(x)
    return torch.relu(x)


def maximum(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise max (exact). With autograd on (training) the gradient goes to the larger input
    (``a`` on ties) and only a boolean mask is kept for backward — about half the passes and a
    quarter of the memory of ``torch.maximum``'s backward, which splits ties with extra masks."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad) and a.shape == b.shape:
        return _Select.apply(a, b, a >= b)
    return torch.maximum(a, b)


def minimum(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise min (exact); see :func:`maximum`."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad) and a.shape == b.shape:
        return _Select.apply(a, b, a <= b)
    return torch.minimum(a, b)


def bound(center: Tensor, radius: Optional[Tensor], lower: Optional[Tensor], upper: Optional[Tensor]) -> Bound:
    """Return the Bound with its box intersected with the ball's box ``center ± radius``.

    Sound because every point of the ball lies in ``center ± radius`` coordinatewise, so the
    intersection of the two enclosures still encloses the value.
    """
    if lower is not None and radius is not None:
        r = expand_radius(radius, center)
        lower = maximum(lower, center - r)
        upper = minimum(upper, center + r)
    return Bound(center, radius, lower, upper)


def enclose(center: Tensor, radius: Optional[Tensor], lower: Optional[Tensor], upper: Optional[Tensor]) -> Bound:
    """A Bound whose box already lies inside the ball's box, so :func:`bound`'s intersection would
    change nothing (and costs four passes over the activation).

    Holds for the rules that use it, by induction over the graph from the input (whose box is
    inside ``x ± eps·f``): a nondecreasing L-Lipschitz f maps ``[l, u] ⊆ c ± r`` into
    ``f(c) ± L r``; sums, reshapes and max pools likewise; an affine map intersects with
    ``A c ± ||A_i|| r`` and ``||A_i|| <= sigma(A)``. (With training-time power-iteration
    *estimates* of sigma the last step can fail; that only concerns the loss, never a certificate.)
    """
    return Bound(center, radius, lower, upper)


def ball_only(center: Tensor, radius: Tensor) -> Bound:
    """A Bound with a ball and no box (the ``lipschitz`` method)."""
    return Bound(center, radius, None, None)


def box_only(b: Bound) -> Bound:
    """The same Bound without its ball (the ``ibp`` method reads margins from the box alone)."""
    return Bound(b.center, None, b.lower, b.upper)


def circumscribing_radius(norm: float, numel: int) -> float:
    """Factor f such that the l_p ball of radius eps lies in the l2 ball of radius f * eps.

    ``N^(1/2 - 1/max(p, 2))``: 1 for p <= 2 (the l_p ball is inside the l2 ball), ``sqrt(N)`` for
    p = inf (the cube's corners), and Hölder's inequality in between (paper §3.1).
    """
    if math.isinf(norm):
        return math.sqrt(numel)
    return numel ** (0.5 - 1.0 / max(norm, 2.0))


def input_bound(
    x: Tensor,
    eps,
    norm: float,
    domain_lower: Optional[float],
    domain_upper: Optional[float],
    with_ball: bool = True,
    with_box: bool = True,
) -> Bound:
    """Enclosure of the perturbation set ``{x' : ||x' - x||_p <= eps} ∩ domain``.

    Ball: centre ``x``, radius ``f * eps`` with f from :func:`circumscribing_radius`. Box:
    ``[x - eps, x + eps]`` (every coordinate of an l_p perturbation, p >= 1, moves by at most
    eps) intersected with the input domain when one is declared. ``eps`` is a float or a ``(B,)``
    tensor (one radius per sample, used by the certified-radius search).
    """
    batch = x.shape[0]
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(batch)
    numel = x[0].numel()
    radius = eps_t * circumscribing_radius(norm, numel) if with_ball else None
    lower = upper = None
    if with_box:
        e = expand_radius(eps_t, x)
        lower, upper = x - e, x + e
        if domain_lower is not None:
            lower = torch.clamp(lower, min=domain_lower)
        if domain_upper is not None:
            upper = torch.clamp(upper, max=domain_upper)
    return Bound(x, radius, lower, upper)

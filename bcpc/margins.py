"""Certified margins at the last layer (DESIGN.md §3).

With ``logits = W p + b`` and reference class ``k`` (the label, or the prediction when no label
is given), the margin against class ``j`` is ``(W_k - W_j) p + (b_k - b_j)``; its minimum over
the ball ∩ box enclosing ``p`` is solved exactly by bcpc.solver. Entry ``j == k`` is ``+inf``
(no constraint). When the model does not end in a linear layer, the same problem is solved at the
logits with ``W = I``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bcpc import solver
from bcpc.domain import Bound


def spec(weight: Tensor, bias: Optional[Tensor], ref: Tensor):
    """``c[b, j] = W[ref_b] - W[j]`` (B, C, n) and ``offset[b, j] = bias[ref_b] - bias[j]`` (B, C)."""
    c = weight[ref].unsqueeze(1) - weight.unsqueeze(0)
    if bias is None:
        offset = torch.zeros(c.shape[:2], dtype=c.dtype, device=c.device)
    else:
        offset = bias[ref].unsqueeze(1) - bias.unsqueeze(0)
    return c, offset


def _reference(logits: Tensor, y: Optional[Tensor]) -> Tensor:
    return logits.argmax(dim=1) if y is None else y


def _mask_reference(m: Tensor, ref: Tensor) -> Tensor:
    own = torch.nn.functional.one_hot(ref, m.shape[1]).bool()
    return torch.where(own, torch.full_like(m, float("inf")), m)


def last_layer_margins(p: Bound, weight: Tensor, bias: Optional[Tensor], logits: Tensor, y: Optional[Tensor]) -> Tensor:
    """(B, C) certified lower bounds on ``z_ref - z_j`` over the perturbation set."""
    ref = _reference(logits, y)
    c, offset = spec(weight, bias, ref)
    m = solver.margin_lower(p.center, p.radius, p.lower, p.upper, c, offset, c_from=(weight, ref))
    return _mask_reference(m, ref)


def logit_margins(z: Bound, y: Optional[Tensor]) -> Tensor:
    """(B, C) certified margin lower bounds read directly at the logits (``W = I``)."""
    eye = torch.eye(z.center.shape[1], dtype=z.center.dtype, device=z.center.device)
    ref = _reference(z.center, y)
    c, offset = spec(eye, None, ref)
    m = solver.margin_lower(z.center, z.radius, z.lower, z.upper, c, offset)
    return _mask_reference(m, ref)


def worst_logits(logits: Tensor, margins: Tensor, ref: Tensor) -> Tensor:
    """Worst-translated logits (paper eq. 2): ``zw_ref = z_ref``, ``zw_j = z_ref - margin_j``."""
    z_ref = logits.gather(1, ref.unsqueeze(1))
    zw = z_ref - margins
    own = torch.nn.functional.one_hot(ref, logits.shape[1]).bool()
    return torch.where(own, z_ref.expand_as(zw), zw)

"""Modules bcpc has a canonical op for that torch does not ship.

:class:`GroupSort` (and :class:`MaxMin`, its group-size-2 case in the chunked layout most
Lipschitz-network code uses) is the activation of gradient-norm-preserving networks (Anil et al.
2019, "Sorting out Lipschitz function approximation"). It is 1-Lipschitz in l2 (sorting a group
is: ``||sort(a) - sort(b)|| <= ||a - b||``, the rearrangement inequality), so bcpc keeps the
ball radius unchanged through it; its box is the order statistics of the box ends.
"""
from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from bcpc.ops import group_sort

torch.fx.wrap("group_sort")  # traced as one call: the canonical op, not its sort internals

__all__ = ["GroupSort", "MaxMin"]


class GroupSort(nn.Module):
    """Sort within groups of ``group_size`` consecutive channels along ``dim`` (ascending by
    default, as in Anil et al.); ``strided=True`` groups every ``C / group_size``-th channel."""

    def __init__(self, group_size: int = 2, dim: int = 1, strided: bool = False, descending: bool = False):
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size, self.dim, self.strided, self.descending = group_size, dim, strided, descending

    def forward(self, x: Tensor) -> Tensor:
        return group_sort(x, self.group_size, self.dim, self.strided, self.descending)

    def extra_repr(self) -> str:
        return (f"group_size={self.group_size}, dim={self.dim}, strided={self.strided}, "
                f"descending={self.descending}")


class MaxMin(GroupSort):
    """``a, b = x.chunk(2, dim); cat([max(a, b), min(a, b)], dim)`` (GloRo's and LiResNet's MinMax)."""

    def __init__(self, dim: int = 1):
        super().__init__(2, dim, strided=True, descending=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

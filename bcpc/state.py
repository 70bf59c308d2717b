"""Exact snapshots of tensor values, for caches that must never go stale.

A tensor's version counter misses edits made through ``.data`` (``p.data.mul_(...)``,
``p.data.copy_(...)``: manual SGD, weight clipping), and a storage pointer can be reused after a
tensor is freed. A cache keyed on either can hand out a bound of old weights for new ones, so the
caches of bound-relevant values (the float64 certification twin, the guaranteed Lipschitz bounds)
compare the values themselves: one pass over the weights, far cheaper than what they cache.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn


class Snapshot:
    """A copy of named tensors' values; :meth:`matches` compares them exactly (NaN never matches)."""

    def __init__(self, items: Iterable[tuple]):
        self.items = [(name, t.detach().clone()) for name, t in items]

    @classmethod
    def of_module(cls, module: nn.Module) -> "Snapshot":
        """Every parameter and buffer of ``module`` (shared ones once)."""
        return cls(named_state(module))

    def matches(self, items: Iterable[tuple]) -> bool:
        items = list(items)
        if len(items) != len(self.items):
            return False
        for (name, saved), (now_name, now) in zip(self.items, items):
            if name != now_name or not same_tensor_values(saved, now):
                return False
        return True

    def matches_module(self, module: nn.Module) -> bool:
        return self.matches(named_state(module))


def named_state(module: nn.Module) -> list:
    return list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b is not None]


def same_tensor_values(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    """Same shape, dtype, device and values, bit for bit where it matters (``torch.equal``)."""
    if a is None or b is None:
        return a is b
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and bool(torch.equal(a.detach(), b.detach())))

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


#: ``nn.Module.__dict__`` entries that are not model state a certificate depends on: the mode flag
#: (checked on its own), the containers the value snapshot covers, and caches torch keeps.
_SKIP_ATTRIBUTES = frozenset(["training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                              "_load_state_dict_post_hooks", "_is_full_backward_hook", "_compiled_call_impl",
                              "_backward_pre_hooks", "_backward_hooks"])


def _freeze(value):
    """A comparable stand-in for an attribute value: primitives by value, containers item by item,
    tensors by a copy of their values, anything else by identity."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        return _TensorValue(value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _freeze(v)) for k, v in value.items())
    return ("object", type(value).__qualname__, id(value))


class _TensorValue:
    def __init__(self, t: Tensor):
        self.t = t.detach().clone()

    def __eq__(self, other):
        return isinstance(other, _TensorValue) and same_tensor_values(self.t, other.t)

    def __repr__(self):
        return f"tensor of shape {tuple(self.t.shape)}"


def structure(module: nn.Module) -> list:
    """The module tree and every non-tensor-state attribute of every module (Python numbers and
    flags, plain tensor attributes, hooks, a monkeypatched ``forward``), for :func:`changes`."""
    out = []
    for name, m in module.named_modules():
        attrs = tuple((k, _freeze(v)) for k, v in sorted(m.__dict__.items()) if k not in _SKIP_ATTRIBUTES)
        out.append((name, type(m), id(m), attrs))
    return out


def changes(before: list, after: list) -> Optional[str]:
    """A description of the first difference between two :func:`structure` records, or None."""
    if [(n, t, i) for n, t, i, _ in before] != [(n, t, i) for n, t, i, _ in after]:
        was = {n: t.__name__ for n, t, _, _ in before}
        now = {n: t.__name__ for n, t, _, _ in after}
        for n in sorted(set(was) | set(now)):
            if was.get(n) != now.get(n):
                return f"submodule {n or '<root>'!r} was {was.get(n, 'absent')}, now {now.get(n, 'absent')}"
        return "a submodule was replaced by another object"
    for (name, _, _, a), (_, _, _, b) in zip(before, after):
        if a != b:
            da, db = dict(a), dict(b)
            for k in sorted(set(da) | set(db)):
                if da.get(k, "absent") != db.get(k, "absent"):
                    return f"attribute {k!r} of {name or 'the model'} was {da.get(k, 'absent')!r}, now {db.get(k, 'absent')!r}"
    return None

"""Small helpers shared by the rule families."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.fx as fx

from bcpc.domain import Bound
from bcpc.errors import UnsupportedOpError
from bcpc.meta import info, where


_SUMS: dict = {}


def linear_map_sums(fn: Callable, in_shape, key) -> tuple[float, float]:
    """``(max row sum, max column sum)`` of the matrix ``A`` of a linear map ``fn`` on one sample
    of shape ``in_shape``: ``max fn(1)`` and ``max fn^T(1)``, computed once per ``key`` and shape,
    in float64 on the CPU, and cached as Python floats.

    The sums depend on the op's arguments and the shape only, never on the data, so the bound
    path reads constants: no autograd call and no tensor built per forward, and nothing for
    ``torch.compile`` to break on once the first (eager) call has filled the cache. A map that
    ignores its input (no column depends on it) has column sum 0.
    """
    k = (key, tuple(in_shape))
    hit = _SUMS.get(k)
    if hit is None:
        ones = torch.ones((1,) + tuple(in_shape), dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            out = fn(ones)
            (cols,) = torch.autograd.grad(out.sum(), ones, allow_unused=True)
        hit = (float(out.detach().max()) if out.numel() else 0.0, 0.0 if cols is None else float(cols.max()))
        _SUMS[k] = hit
    return hit


def is_bound(a) -> bool:
    return isinstance(a, Bound)


def lower_of(a):
    """The box's lower end of a Bound argument; a constant argument is its own box."""
    return a.lower if is_bound(a) else a


def upper_of(a):
    """The box's upper end of a Bound argument; a constant argument is its own box."""
    return a.upper if is_bound(a) else a


def ntuple(v, n: int) -> tuple:
    """``3 -> (3, 3)``; tuples and lists pass through as tuples of ints."""
    if isinstance(v, (tuple, list)):
        if len(v) == 1 and n > 1:
            return tuple(int(v[0]) for _ in range(n))
        return tuple(int(a) for a in v)
    return tuple(int(v) for _ in range(n))


def pick(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict) -> list:
    """Positional-or-keyword argument values in ``names`` order (for builtins with no signature)."""
    out = []
    for i, name in enumerate(names):
        if i < len(args):
            out.append(args[i])
        elif name in kwargs:
            out.append(kwargs[name])
        elif name in defaults:
            out.append(defaults[name])
        else:
            raise TypeError(f"missing argument {name!r}")
    extra = set(kwargs) - set(names)
    if extra:
        raise TypeError(f"unexpected arguments {sorted(extra)}")
    return out


def perturbed(a) -> bool:
    return isinstance(a, fx.Node) and info(a).perturbed


def shape(a) -> tuple:
    return tuple(info(a).shape)


def unsupported(node: fx.Node, why: str, fix: str = "") -> UnsupportedOpError:
    msg = (f"node '{node.name}' ({info(node).spelling or node.target}) at {where(node)}: {why}")
    if fix:
        msg += f". {fix}"
    return UnsupportedOpError(msg)


def check_same_shape_as_perturbed(node: fx.Node) -> None:
    """Elementwise ops: a perturbed operand must not be broadcast to a larger shape.

    Broadcasting copies a perturbed coordinate several times, which multiplies its l2 movement;
    the rules here assume it does not happen.
    """
    out = shape(node)
    for a in list(node.args) + list(node.kwargs.values()):
        if perturbed(a) and shape(a) != out:
            raise unsupported(
                node,
                f"the perturbed operand '{a.name}' of shape {shape(a)} is broadcast to {out}",
                "Expand it explicitly with a supported op or reshape the constant instead",
            )

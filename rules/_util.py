"""Small helpers shared by the rule families."""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from bcpc.domain import Bound
from bcpc.errors import UnsupportedOpError
from bcpc.meta import info, where


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

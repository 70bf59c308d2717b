"""Monotone activations (DESIGN.md §2).

For a nondecreasing elementwise f with Lipschitz constant L:

* ball: centre ``f(c)``, radius ``L * r`` (``|f(a) - f(b)| <= L |a - b|`` coordinatewise, so the
  l2 distance shrinks by at least L);
* box: ``[f(l), f(u)]`` (monotonicity), intersected with the output ball's box.

One line per activation through :func:`monotone`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bcpc import kernels
from bcpc.domain import Bound, enclose
from bcpc.registry import register
from bcpc.rules._util import pick, unsupported


def monotone(target, *, lipschitz, name, spellings, params=(), defaults=None, check=None, box_pair=None):
    """Register a nondecreasing activation ``target(x, *params)`` with Lipschitz constant
    ``lipschitz(*params)`` (a number or a function of the parameters). ``box_pair(lower, upper)``,
    if given, computes ``target`` on both box ends at once (a fused kernel, bcpc.kernels)."""
    lip = lipschitz if callable(lipschitz) else (lambda *p, _L=float(lipschitz): _L)
    names = ("input",) + tuple(params)
    defaults = dict(defaults or {})

    def ball(x: Bound, *p):
        return None if x.radius is None else lip(*p) * x.radius

    def box(center, radius, x: Bound, *p) -> Bound:
        if box_pair is not None:
            return enclose(center, radius, *box_pair(x.lower, x.upper, *p))
        return enclose(center, radius, target(x.lower, *p), target(x.upper, *p))

    ball.__name__, box.__name__ = f"{name}_ball", f"{name}_box"
    ball.__qualname__, box.__qualname__ = ball.__name__, box.__name__
    ball.__doc__ = f"radius_out = L * radius_in, L = Lipschitz constant of {name}."
    box.__doc__ = f"[{name}(lower), {name}(upper)] ({name} is nondecreasing; inside the output ball box)."
    globals()[ball.__name__], globals()[box.__name__] = ball, box  # importable: emitted code names them

    def fn_adapter(module, args, kwargs):
        vals = pick(args, {k: v for k, v in kwargs.items() if k != "inplace"}, names, defaults)
        return tuple(vals), {}

    def module_adapter(module, args, kwargs):
        (x,) = args
        return (x,) + tuple(getattr(module, p) for p in params), {}

    spell = []
    for s in spellings:
        if isinstance(s, type):
            spell.append((s, module_adapter))
        else:
            spell.append((s, fn_adapter))
    return register(target, ball=ball, box=box, family="monotone", name=name, spellings=spell, check=check)


def _check_leaky(node):
    slope = node.args[1]
    if not isinstance(slope, (int, float)) or slope < 0:
        raise unsupported(node, f"leaky_relu with negative_slope={slope!r} is not monotone",
                          "Use a nonnegative slope")


def _check_elu(node):
    alpha = node.args[1]
    if not isinstance(alpha, (int, float)) or alpha < 0:
        raise unsupported(node, f"elu with alpha={alpha!r} is not monotone", "Use alpha >= 0")


monotone(torch.relu, lipschitz=1.0, name="relu", spellings=(torch.relu, nn.ReLU, F.relu, "relu"),
         box_pair=kernels.relu_box)
monotone(torch.tanh, lipschitz=1.0, name="tanh", spellings=(torch.tanh, nn.Tanh, F.tanh, "tanh"))
monotone(torch.sigmoid, lipschitz=0.25, name="sigmoid", spellings=(torch.sigmoid, nn.Sigmoid, F.sigmoid, "sigmoid"))
monotone(F.leaky_relu, lipschitz=lambda slope: max(1.0, float(slope)), name="leaky_relu",
         spellings=(F.leaky_relu, nn.LeakyReLU), params=("negative_slope",), defaults={"negative_slope": 0.01},
         check=_check_leaky)
# softplus' derivative is sigmoid(beta * x) <= 1 for every beta > 0; above the threshold it is x.
monotone(F.softplus, lipschitz=1.0, name="softplus", spellings=(F.softplus, nn.Softplus),
         params=("beta", "threshold"), defaults={"beta": 1.0, "threshold": 20.0})
# elu: x for x > 0, alpha (e^x - 1) below, derivative <= max(1, alpha).
monotone(F.elu, lipschitz=lambda alpha: max(1.0, float(alpha)), name="elu", spellings=(F.elu, nn.ELU),
         params=("alpha",), defaults={"alpha": 1.0}, check=_check_elu)

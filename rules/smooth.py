"""Lipschitz activations with one minimum: GELU (exact and tanh forms), SiLU/Swish, Mish, Hardswish.

Each such f decreases on ``(-inf, m]`` and increases on ``[m, inf)`` (m its minimiser, f(m) its
minimum), and ``|f'| <= L`` everywhere. Then, per coordinate:

* ball: centre ``f(c)``, radius ``L * r`` (``|f(a') - f(a)| <= L |a' - a|`` coordinatewise, so
  the l2 distance grows by at most L);
* box: the exact image of ``[l, u]``: its top is ``max(f(l), f(u))`` (f is unimodal, so its
  maximum over an interval is at an end); its bottom is ``min(f(l), f(u))`` when the interval
  lies on one side of m and ``f(m)`` when it contains m. The box lies inside ``f(c) ± L r``
  (every point of ``[l, u]`` is within r of c), so it is already inside the output ball's box.

The constants, derived once and pinned by a dense sampling of f' in tests/test_rules.py:

* GELU, ``x Phi(x)``: ``f' = Phi(x) + x phi(x)``, ``f'' = phi(x) (2 - x^2)``, so f' peaks at
  ``x = sqrt 2``: ``L = (1 + erf 1) / 2 + e^-1 / sqrt(pi) = 1.1289041...``, and bottoms at
  ``-sqrt 2`` with ``f' = 1 - L`` (|.| smaller). m = -0.75179..., f(m) = -0.16997...
* GELU tanh form, ``x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2``: L = 1.1289931 at
  x = 1.4185, m = -0.75246..., f(m) = -0.17004...
* SiLU, ``x sigmoid(x)``: ``f' = s (1 + x (1 - s))`` peaks at x = 2.39936 (the root of
  ``f'' = s (1 - s) (2 + x (1 - 2 s)) = 0``): L = 1.0998393; m = -1.27846 (the root of
  ``f' = 0``, i.e. ``s = (1 + m) / m``), f(m) = m s = m + 1 = -0.27846.
* Mish, ``x tanh(softplus(x))``: L = 1.0884982 at x = 1.4906 (f' >= -0.1126), m = -1.19243,
  f(m) = -0.30884.
* Hardswish, ``x relu6(x + 3) / 6``: ``f' = (2x + 3) / 6`` on ``(-3, 3)``, 0 below, 1 above:
  L = 1.5 (at x = 3-), m = -1.5, f(m) = -0.375 exactly.

The Lipschitz constants are rounded up and the minima rounded down (by a few units in the last
place of the working dtype, which also covers torch's rounding in the flat region around m).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bcpc.domain import Bound, enclose
from bcpc.registry import register
from bcpc.rules._util import pick, unsupported


@dataclass(frozen=True)
class Unimodal:
    """One activation: its Lipschitz constant (rounded up), minimiser and minimum (float64)."""

    name: str
    lipschitz: float
    argmin: float
    minimum: float


GELU_L = (1.0 + math.erf(1.0)) / 2.0 + math.exp(-1.0) / math.sqrt(math.pi)
CONSTANTS = {
    "gelu": Unimodal("gelu", GELU_L * (1 + 1e-12), -0.7517915237289343, -0.16997120747990369),
    "gelu_tanh": Unimodal("gelu_tanh", 1.128994, -0.7524614131392313, -0.1700407505712541),
    "silu": Unimodal("silu", 1.099840, -1.2784645426638965, -0.27846454276107385),
    "mish": Unimodal("mish", 1.088499, -1.1924312147044493, -0.3088434130172505),
    "hardswish": Unimodal("hardswish", 1.5, -1.5, -0.375),
}


def _floor(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` rounded down by 8 units of ``like``'s dtype precision (value < 0 here)."""
    eps = torch.finfo(like.dtype).eps
    return torch.tensor(value - 8.0 * eps * abs(value), dtype=like.dtype, device=like.device)


def unimodal_box(f: Callable, const: Unimodal, center, radius, x: Bound) -> Bound:
    """[bottom, max(f(l), f(u))] with bottom = f(m) if l <= m <= u, else min(f(l), f(u))."""
    fl, fu = f(x.lower), f(x.upper)
    straddles = (x.lower <= const.argmin) & (x.upper >= const.argmin)
    bottom = torch.where(straddles, _floor(const.minimum, fl), torch.minimum(fl, fu))
    return enclose(center, radius, bottom, torch.maximum(fl, fu))


def _register(target: Callable, key: str, f: Callable, spellings) -> None:
    const = CONSTANTS[key]

    def ball(x: Bound, *params):
        return None if x.radius is None else const.lipschitz * x.radius

    def box(center, radius, x: Bound, *params) -> Bound:
        return unimodal_box(f, const, center, radius, x)

    ball.__name__, box.__name__ = f"{key}_ball", f"{key}_box"
    ball.__qualname__, box.__qualname__ = ball.__name__, box.__name__
    ball.__doc__ = f"radius_out = {const.lipschitz:.7g} * radius_in (the largest |f'| of {key}, rounded up)."
    box.__doc__ = (f"[f(m) if the box holds m = {const.argmin:.6g} else min(f(l), f(u)), max(f(l), f(u))] "
                   f"({key} decreases left of m and increases right of it).")
    globals()[ball.__name__], globals()[box.__name__] = ball, box  # importable: emitted code names them
    register(target, ball=ball, box=box, family="unimodal", name=key, spellings=spellings)


# --- GELU: canonical F.gelu(x, approximate=form); the form picks the constants ----------------

def _gelu_adapter(module, args, kwargs):
    if module is not None:
        (x,) = args
        approximate = module.approximate
    else:
        x, approximate = pick(args, kwargs, ("input", "approximate"), {"approximate": "none"})
    return (x,), {"approximate": approximate}


def _plain_adapter(module, args, kwargs):
    (x,) = pick(args, {k: v for k, v in kwargs.items() if k != "inplace"}, ("input",), {})
    return (x,), {}


def _check_gelu(node):
    form = node.kwargs.get("approximate")
    if form not in ("none", "tanh"):
        raise unsupported(node, f"gelu with approximate={form!r}", "Use 'none' or 'tanh'")


def gelu_ball(x: Bound, approximate="none"):
    """radius_out = L * radius_in, L = 1.1289041 (exact form) or 1.128994 (tanh form), rounded up."""
    if x.radius is None:
        return None
    return CONSTANTS["gelu" if approximate == "none" else "gelu_tanh"].lipschitz * x.radius


def gelu_box(center, radius, x: Bound, approximate="none") -> Bound:
    """The exact image of the box (see the module docstring), for the form in use."""
    const = CONSTANTS["gelu" if approximate == "none" else "gelu_tanh"]
    return unimodal_box(lambda t: F.gelu(t, approximate=approximate), const, center, radius, x)


register(F.gelu, ball=gelu_ball, box=gelu_box, family="unimodal", name="gelu",
         spellings=((F.gelu, _gelu_adapter), (nn.GELU, _gelu_adapter)), check=_check_gelu)
_register(F.silu, "silu", F.silu, ((F.silu, _plain_adapter), (nn.SiLU, _plain_adapter)))
_register(F.mish, "mish", F.mish, ((F.mish, _plain_adapter), (nn.Mish, _plain_adapter)))
_register(F.hardswish, "hardswish", F.hardswish, ((F.hardswish, _plain_adapter), (nn.Hardswish, _plain_adapter)))

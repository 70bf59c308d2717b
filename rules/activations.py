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

import math

from bcpc import kernels
from bcpc.domain import Bound, bound, enclose
from bcpc.registry import Attr, register
from bcpc.rules._util import perturbed, pick, unsupported


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

# --- PReLU ------------------------------------------------------------------------------------
#
# prelu(x) = x for x >= 0, a x below (a learned, one slope or one per channel of dim 1). With any
# sign of a it is max(1, |a|)-Lipschitz per coordinate and linear on each side of 0, so on [l, u]
# its extremes are at l, u, or at 0 where the box holds 0.

def _prelu_slopes(weight, like):
    """The slopes broadcast against ``like`` (B, C, ...): one per channel of dim 1, or one."""
    if weight.numel() == 1 or like.dim() < 2:
        return weight.reshape(())
    return weight.reshape((1, -1) + (1,) * (like.dim() - 2))


def prelu_ball(x: Bound, weight):
    """radius_out = max(1, max |a|) * radius_in."""
    if x.radius is None:
        return None
    return torch.clamp(weight.abs().max(), min=1.0).to(x.radius.dtype) * x.radius


def prelu_box(center, radius, x: Bound, weight) -> Bound:
    """[min(f(l), f(u)), max(f(l), f(u))], widened to 0 where the box holds 0 (f is linear on
    each side of 0); inside the output ball box."""
    a = _prelu_slopes(weight, x.lower)
    fl = torch.where(x.lower >= 0, x.lower, a * x.lower)
    fu = torch.where(x.upper >= 0, x.upper, a * x.upper)
    lo, hi = torch.minimum(fl, fu), torch.maximum(fl, fu)
    holds0 = (x.lower < 0) & (x.upper > 0)
    zero = torch.zeros_like(lo)
    return bound(center, radius, torch.where(holds0, torch.minimum(lo, zero), lo),
                 torch.where(holds0, torch.maximum(hi, zero), hi))


def _prelu_adapter(module, args, kwargs):
    x, w = pick(args, kwargs, ("input", "weight"), {})
    return (x, w), {}


def _prelu_module_adapter(module, args, kwargs):
    (x,) = args
    return (x, Attr("weight")), {}


def _check_prelu(node):
    if perturbed(node.args[1]):
        raise unsupported(node, "the PReLU slope depends on the input", "Use a parameter or a constant slope")


register(torch.prelu, ball=prelu_ball, box=prelu_box, family="activation", name="prelu", check=_check_prelu,
         spellings=((torch.prelu, _prelu_adapter), ("prelu", _prelu_adapter), (nn.PReLU, _prelu_module_adapter)))

# --- abs ------------------------------------------------------------------------------------
#
# Not monotone, but 1-Lipschitz coordinatewise (| |a| - |b| | <= |a - b|), so the ball keeps its
# radius; the box folds at 0.

def abs_ball(x: Bound):
    """radius_out = radius_in: | |a'| - |a| | <= |a' - a| in every coordinate."""
    return x.radius


def abs_box(center, radius, x: Bound) -> Bound:
    """[l, u] where l >= 0, [-u, -l] where u <= 0, [0, max(-l, u)] where the box holds 0 (inside
    the output ball's box: the fold is 1-Lipschitz in each coordinate)."""
    lo = torch.where(x.lower >= 0, x.lower, torch.where(x.upper <= 0, -x.upper, torch.zeros_like(x.lower)))
    hi = torch.maximum(x.lower.abs(), x.upper.abs())
    return enclose(center, radius, lo, hi)


def _abs_adapter(module, args, kwargs):
    (x,) = pick(args, kwargs, ("input",), {})
    return (x,), {}


register(torch.abs, ball=abs_ball, box=abs_box, family="activation", name="abs",
         spellings=((torch.abs, _abs_adapter), (torch.absolute, _abs_adapter), ("abs", _abs_adapter),
                    ("absolute", _abs_adapter)))


# --- softplus -------------------------------------------------------------------------------
#
# torch computes softplus(x) = log1p(exp(beta x)) / beta for beta x <= threshold and x above it.
# Both pieces have slope <= 1 (sigmoid(beta x) <= 1 and 1) and increase, but at x0 = threshold/beta
# the function drops by jump = log1p(exp(-threshold)) / beta (from x0 + jump to just above x0):
# ~2e-9 at the default threshold 20, 0.31 at threshold 1. So softplus is not monotone and not
# Lipschitz; per coordinate |f(a) - f(b)| <= |a - b| + jump * [a, b straddle x0].

def _softplus_jump(beta, threshold) -> float:
    return math.log1p(math.exp(-threshold)) / beta


def _straddles(lower, upper, x0):
    return (lower <= x0) & (upper > x0)


def softplus_ball(x: Bound, beta, threshold):
    """radius_out = radius_in + jump * sqrt(k), k = coordinates whose box straddles the switch
    point x0 = threshold / beta (all of them without a box): ||f(a') - f(a)|| <= ||a' - a|| +
    ||jump * 1_k|| by the triangle inequality, since only a coordinate crossing x0 can jump."""
    if x.radius is None:
        return None
    jump = _softplus_jump(beta, threshold)
    if x.lower is None:
        k = torch.full_like(x.radius, float(x.center[0].numel()))
    else:
        k = _straddles(x.lower, x.upper, threshold / beta).reshape(x.lower.shape[0], -1).sum(1).to(x.radius.dtype)
    return x.radius + jump * k.sqrt()


def softplus_box(center, radius, x: Bound, beta, threshold) -> Bound:
    """[f(l), f(u)] where the box does not straddle x0 (f increases on each piece); where it does,
    [min(f(l), x0), max(f(x0), f(u))]: the right piece's infimum is x0, the left piece's maximum is
    f(x0) = x0 + jump. Intersected with the output ball's box."""
    x0 = threshold / beta
    lo, hi = F.softplus(x.lower, beta, threshold), F.softplus(x.upper, beta, threshold)
    s = _straddles(x.lower, x.upper, x0)
    top = F.softplus(torch.full((), x0, dtype=x.lower.dtype, device=x.lower.device), beta, threshold)
    lo = torch.where(s, torch.minimum(lo, torch.full_like(lo, x0)), lo)
    hi = torch.where(s, torch.maximum(hi, top.expand_as(hi)), hi)
    return bound(center, radius, lo, hi)


def _softplus_adapter(module, args, kwargs):
    if module is not None:
        (x,) = args
        return (x, float(module.beta), float(module.threshold)), {}
    x, beta, threshold = pick(args, kwargs, ("input", "beta", "threshold"), {"beta": 1.0, "threshold": 20.0})
    return (x, float(beta), float(threshold)), {}


def _check_softplus(node):
    beta = node.args[1]
    if not beta > 0:
        raise unsupported(node, f"softplus with beta={beta!r} is not supported", "Use beta > 0")


register(F.softplus, ball=softplus_ball, box=softplus_box, family="activation", name="softplus",
         spellings=((F.softplus, _softplus_adapter), (nn.Softplus, _softplus_adapter)), check=_check_softplus)
# elu: x for x > 0, alpha (e^x - 1) below, derivative <= max(1, alpha).
monotone(F.elu, lipschitz=lambda alpha: max(1.0, float(alpha)), name="elu", spellings=(F.elu, nn.ELU),
         params=("alpha",), defaults={"alpha": 1.0}, check=_check_elu)


# --- clipping: clamp / clip / hardtanh / relu6 (constant bounds) -----------------------------
#
# clamp(x, lo, hi) = min(max(x, lo), hi) is nondecreasing and 1-Lipschitz in x for fixed lo, hi
# (numbers, None, or tensors that do not depend on the input), whatever their order: so the ball
# radius is unchanged and the box is [clamp(l), clamp(u)].

def clamp_ball(x: Bound, lo=None, hi=None):
    """radius unchanged (clamp is 1-Lipschitz)."""
    return x.radius


def clamp_box(center, radius, x: Bound, lo=None, hi=None) -> Bound:
    """[clamp(l, lo, hi), clamp(u, lo, hi)] (nondecreasing; inside the output ball box)."""
    return enclose(center, radius, torch.clamp(x.lower, lo, hi), torch.clamp(x.upper, lo, hi))


def _clamp_adapter(module, args, kwargs):
    x, lo, hi = pick(args, kwargs, ("input", "min", "max"), {"min": None, "max": None})
    return (x, lo, hi), {}


def _clamp_min_adapter(module, args, kwargs):
    x, lo = pick(args, kwargs, ("input", "min"), {})
    return (x, lo, None), {}


def _clamp_max_adapter(module, args, kwargs):
    x, hi = pick(args, kwargs, ("input", "max"), {})
    return (x, None, hi), {}


def _hardtanh_adapter(module, args, kwargs):
    if module is not None:  # nn.Hardtanh and its subclass nn.ReLU6
        (x,) = args
        return (x, float(module.min_val), float(module.max_val)), {}
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    x, lo, hi = pick(args[:3], kwargs, ("input", "min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0})
    return (x, float(lo), float(hi)), {}


def _relu6_adapter(module, args, kwargs):
    (x,) = pick(args[:1], {k: v for k, v in kwargs.items() if k != "inplace"}, ("input",), {})
    return (x, 0.0, 6.0), {}


def _check_clamp(node):
    for which, value in zip(("min", "max"), node.args[1:3]):
        if perturbed(value):
            raise unsupported(node, f"clamp's {which} '{value.name}' depends on the input",
                              "Use torch.maximum / torch.minimum of the two values")
    lo, hi = node.args[1:3]
    if lo is None and hi is None:
        raise unsupported(node, "clamp with neither min nor max", "Give at least one bound")


register(torch.clamp, ball=clamp_ball, box=clamp_box, family="monotone", name="clamp", check=_check_clamp,
         spellings=((torch.clamp, _clamp_adapter), (torch.clip, _clamp_adapter), ("clamp", _clamp_adapter),
                    ("clip", _clamp_adapter), (torch.clamp_min, _clamp_min_adapter), ("clamp_min", _clamp_min_adapter),
                    (torch.clamp_max, _clamp_max_adapter), ("clamp_max", _clamp_max_adapter),
                    (F.hardtanh, _hardtanh_adapter), (nn.Hardtanh, _hardtanh_adapter), (F.relu6, _relu6_adapter)))
# hardsigmoid: relu6(x + 3) / 6, nondecreasing with slope <= 1/6.
monotone(F.hardsigmoid, lipschitz=1.0 / 6.0, name="hardsigmoid", spellings=(F.hardsigmoid, nn.Hardsigmoid))


# --- more nondecreasing activations --------------------------------------------------------------
#
# softsign x / (1 + |x|): derivative 1 / (1 + |x|)^2 <= 1.
# logsigmoid -softplus(-x): derivative sigmoid(-x) < 1.
# tanhshrink x - tanh(x): derivative tanh(x)^2 < 1.
# celu: x for x > 0, alpha (e^(x / alpha) - 1) below, alpha > 0: derivative e^(x / alpha) <= 1.
# selu: scale x for x > 0, scale alpha (e^x - 1) below: derivative <= scale alpha = 1.75809934084737685994...
# (torch's constants), rounded up.
SELU_LIPSCHITZ = 1.7580993408473770


def _check_celu(node):
    alpha = node.args[1]
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise unsupported(node, f"celu with alpha={alpha!r} is not monotone with a bounded slope", "Use alpha > 0")


monotone(F.softsign, lipschitz=1.0, name="softsign", spellings=(F.softsign, nn.Softsign))
monotone(F.logsigmoid, lipschitz=1.0, name="logsigmoid", spellings=(F.logsigmoid, nn.LogSigmoid))
monotone(F.tanhshrink, lipschitz=1.0, name="tanhshrink", spellings=(F.tanhshrink, nn.Tanhshrink))
monotone(F.celu, lipschitz=1.0, name="celu", spellings=(F.celu, torch.celu, nn.CELU), params=("alpha",),
         defaults={"alpha": 1.0},
         check=_check_celu)
monotone(F.selu, lipschitz=SELU_LIPSCHITZ, name="selu", spellings=(F.selu, torch.selu, nn.SELU))

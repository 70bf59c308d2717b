"""Pooling in 1, 2 and 3 spatial dimensions: max pooling, adaptive max pooling, average pooling,
adaptive average pooling.

* max pool: nondecreasing in every input, so the box is ``[pool(l), pool(u)]``. Ball: an input
  lies in at most ``n`` windows (per spatial dim ``min(k, ceil((d (k-1) + 1) / s))``), and
  ``|max_w a' - max_w a| <= max_{j in w} |a'_j - a_j|``, so
  ``||pool(a') - pool(a)||^2 <= n ||a' - a||^2``: radius ``sqrt(n) * r`` (``ceil(k/s) r`` for 2-D).
* average pools are linear maps with nonnegative weights: box ``[pool(l), pool(u)]`` exactly;
  ball radius ``sigma * r`` with the Schur bound ``sigma <= sqrt(max row sum * max column sum)``
  (guaranteed; row sums are ``pool(1)``, column sums ``pool^T(1)``, computed once per pool and
  input shape), which is exact for the usual non-overlapping pools.

Each rule is registered once per dimension (``max_pool1d``, ``max_pool2d``, ``max_pool3d``, ...),
with the functional and the module spellings; its canonical arguments are the functional's, in
order, so the bound functions call the op itself on the box ends.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bcpc import lipschitz
from bcpc.domain import Bound, bound, enclose
from bcpc.registry import register
from bcpc.rules._util import linear_map_sums, ntuple, pick

_DIMS = (1, 2, 3)


def _export(name: str, ball, box):
    """Name the bound functions ``<name>_ball`` / ``<name>_box`` and make them importable from
    this module (the emitted code names them)."""
    ball.__name__, box.__name__ = f"{name}_ball", f"{name}_box"
    ball.__qualname__, box.__qualname__ = ball.__name__, box.__name__
    globals()[ball.__name__], globals()[box.__name__] = ball, box
    return ball, box


def _stride(kernel, stride, nd: int) -> tuple:
    return kernel if stride is None or stride == [] or stride == () else ntuple(stride, nd)


# --- max pooling ----------------------------------------------------------------------------

def windows_per_input(kernel, stride, dilation) -> int:
    """Most windows one input position belongs to (product over spatial dims)."""
    n = 1
    for k, s, d in zip(kernel, stride, dilation):
        n *= min(k, math.ceil((d * (k - 1) + 1) / s))
    return n


def _max_pool(nd: int):
    op = getattr(F, f"max_pool{nd}d")
    name = f"max_pool{nd}d"

    def ball(x: Bound, kernel_size, stride, padding, dilation, ceil_mode):
        if x.radius is None:
            return None
        return math.sqrt(windows_per_input(kernel_size, stride, dilation)) * x.radius

    def box(center, radius, x: Bound, kernel_size, stride, padding, dilation, ceil_mode) -> Bound:
        args = (kernel_size, stride, padding, dilation, ceil_mode)
        return enclose(center, radius, op(x.lower, *args), op(x.upper, *args))

    ball.__doc__ = "radius_out = sqrt(windows per input) * radius_in."
    box.__doc__ = "[pool(lower), pool(upper)] (max pooling is nondecreasing; inside the output ball box)."

    def canonical(kernel, stride, padding, dilation, ceil_mode, return_indices):
        if return_indices:
            raise ValueError(f"{name}(return_indices=True) is not supported")
        kernel = ntuple(kernel, nd)
        return (kernel, _stride(kernel, stride, nd), ntuple(padding, nd), ntuple(dilation, nd), bool(ceil_mode))

    def module_adapter(module, args, kwargs):
        (x,) = args
        return (x,) + canonical(module.kernel_size, module.stride, module.padding, module.dilation,
                                module.ceil_mode, module.return_indices), {}

    def fn_adapter(module, args, kwargs):
        x, *rest = pick(args, kwargs, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                       "return_indices"),
                        {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
        return (x,) + canonical(*rest), {}

    ball, box = _export(name, ball, box)
    register(op, ball=ball, box=box, family="pool", name=name,
             spellings=((op, fn_adapter), (getattr(torch, name), fn_adapter),  # torch.max_pool2d: stride=[]
                        (getattr(nn, f"MaxPool{nd}d"), module_adapter)))


def _adaptive_windows(size: int, out: int) -> int:
    """Most adaptive-pooling windows one of ``size`` positions belongs to (window ``i`` covers
    ``[floor(i size / out), ceil((i + 1) size / out))``, as torch computes them)."""
    counts = [0] * size
    for i in range(out):
        for j in range((i * size) // out, -(-((i + 1) * size) // out)):
            counts[j] += 1
    return max(counts)


def _adaptive_sizes(output_size, spatial) -> tuple:
    sizes = tuple(output_size) if isinstance(output_size, (tuple, list)) else ntuple(output_size, len(spatial))
    return tuple(int(d if o is None else o) for o, d in zip(sizes, spatial))


def _check_output_size(name: str, output_size):
    """Refuse an adaptive pool's empty output (an output size 0 leaves nothing to bound)."""
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    if any(o is not None and int(o) < 1 for o in sizes):
        raise ValueError(f"{name}(output_size={output_size!r}): every output size must be at least 1 "
                         f"(an empty output has nothing to certify)")
    return output_size


def _adaptive_max_pool(nd: int):
    op = getattr(F, f"adaptive_max_pool{nd}d")
    name = f"adaptive_max_pool{nd}d"

    def ball(x: Bound, output_size):
        if x.radius is None:
            return None
        spatial = tuple(x.center.shape[-nd:])
        n = 1
        for d, o in zip(spatial, _adaptive_sizes(output_size, spatial)):
            n *= _adaptive_windows(d, o)
        return math.sqrt(n) * x.radius

    def box(center, radius, x: Bound, output_size) -> Bound:
        return enclose(center, radius, op(x.lower, output_size), op(x.upper, output_size))

    ball.__doc__ = ("radius_out = sqrt(windows per input) * radius_in (as for max pooling; adaptive windows "
                    "overlap where the output size does not divide the input size, and an output larger than its "
                    "input puts one position in several windows).")
    box.__doc__ = "[pool(lower), pool(upper)] (a max over each window is nondecreasing; inside the output ball box)."

    def fn_adapter(module, args, kwargs):
        x, size, indices = pick(args, kwargs, ("input", "output_size", "return_indices"), {"return_indices": False})
        if indices:
            raise ValueError(f"{name}(return_indices=True) is not supported")
        return (x, _check_output_size(name, size)), {}

    def module_adapter(module, args, kwargs):
        (x,) = args
        if module.return_indices:
            raise ValueError(f"nn.AdaptiveMaxPool{nd}d(return_indices=True) is not supported")
        return (x, _check_output_size(name, module.output_size)), {}

    ball, box = _export(name, ball, box)
    register(op, ball=ball, box=box, family="pool", name=name,
             spellings=((op, fn_adapter), (getattr(nn, f"AdaptiveMaxPool{nd}d"), module_adapter)))


# --- average pooling (nonnegative linear maps) ----------------------------------------------

def schur_sigma_upper(linear_fn, in_shape, key) -> float:
    """Guaranteed ``sigma(A) <= sqrt(max_i sum_j A_ij * max_j sum_i A_ij)`` for ``A >= 0`` (the map
    ``linear_fn`` with nonnegative weights), cached per ``key`` and shape (``linear_map_sums``)."""
    rows, cols = linear_map_sums(linear_fn, in_shape, key)
    return math.sqrt(rows * cols) * (1 + lipschitz.SAFETY)


def _linear_pool(op, name: str, spellings, note: str = ""):
    """A pool with nonnegative weights ``op(x, *args)``: Schur-bounded ball, exact box."""

    def ball(x: Bound, *args):
        if x.radius is None:
            return None
        return schur_sigma_upper(lambda t: op(t, *args), x.center.shape[1:], (name, repr(args))) * x.radius

    def box(center, radius, x: Bound, *args) -> Bound:
        return bound(center, radius, op(x.lower, *args), op(x.upper, *args))

    ball.__doc__ = "radius_out = Schur bound of the pooling matrix * radius_in." + note
    box.__doc__ = "[pool(lower), pool(upper)] ∩ output ball box (nonnegative weights)."
    ball, box = _export(name, ball, box)
    register(op, ball=ball, box=box, family="pool", name=name, spellings=spellings)


def _avg_pool(nd: int):
    op = getattr(F, f"avg_pool{nd}d")
    # avg_pool1d has no divisor_override
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad") + \
        (("divisor_override",) if nd > 1 else ())

    def canonical(kernel, stride, padding, ceil_mode, count_include_pad, *divisor_override):
        if divisor_override and divisor_override[0] is not None and divisor_override[0] <= 0:
            # a negative divisor flips the sign of every weight: the Schur bound and the
            # [pool(lower), pool(upper)] box hold only for nonnegative weights
            raise ValueError(f"avg_pool{nd}d(divisor_override={divisor_override[0]!r}): the divisor must be "
                             f"positive (a negative divisor makes the pooling weights negative)")
        kernel = ntuple(kernel, nd)
        return (kernel, _stride(kernel, stride, nd), ntuple(padding, nd), bool(ceil_mode),
                bool(count_include_pad)) + tuple(divisor_override)

    def module_adapter(module, args, kwargs):
        (x,) = args
        return (x,) + canonical(*(getattr(module, n, None) for n in names[1:])), {}

    def fn_adapter(module, args, kwargs):
        x, *rest = pick(args, kwargs, names, {"stride": None, "padding": 0, "ceil_mode": False,
                                              "count_include_pad": True, "divisor_override": None})
        return (x,) + canonical(*rest), {}

    _linear_pool(op, f"avg_pool{nd}d", ((op, fn_adapter), (getattr(nn, f"AvgPool{nd}d"), module_adapter)),
                 " A ``divisor_override`` must be positive (a negative one makes the weights negative)."
                 if nd > 1 else "")


def _adaptive_avg_pool(nd: int):
    op = getattr(F, f"adaptive_avg_pool{nd}d")
    name = f"adaptive_avg_pool{nd}d"

    def module_adapter(module, args, kwargs):
        (x,) = args
        return (x, _check_output_size(name, module.output_size)), {}

    def fn_adapter(module, args, kwargs):
        x, size = pick(args, kwargs, ("input", "output_size"), {})
        return (x, _check_output_size(name, size)), {}

    _linear_pool(op, name,
                 ((op, fn_adapter), (getattr(nn, f"AdaptiveAvgPool{nd}d"), module_adapter)))


for _nd in _DIMS:
    _max_pool(_nd)
    _adaptive_max_pool(_nd)
    _avg_pool(_nd)
    _adaptive_avg_pool(_nd)

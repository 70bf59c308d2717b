"""Pooling: max pooling, adaptive max pooling, average pooling, adaptive average pooling.

* max pool: nondecreasing in every input, so the box is ``[pool(l), pool(u)]``. Ball: an input
  lies in at most ``n`` windows (per spatial dim ``min(k, ceil((d (k-1) + 1) / s))``), and
  ``|max_w a' - max_w a| <= max_{j in w} |a'_j - a_j|``, so
  ``||pool(a') - pool(a)||^2 <= n ||a' - a||^2``: radius ``sqrt(n) * r`` (``ceil(k/s) r`` for 2-D).
* average pools are linear maps with nonnegative weights: box ``[pool(l), pool(u)]`` exactly;
  ball radius ``sigma * r`` with the Schur bound ``sigma <= sqrt(max row sum * max column sum)``
  (guaranteed; row sums are ``pool(1)``, column sums ``pool^T(1)``, computed once per pool and
  input shape), which is exact for the usual non-overlapping pools.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from bcpc import lipschitz
from bcpc.domain import Bound, bound, enclose
from bcpc.registry import register
from bcpc.rules._util import linear_map_sums, ntuple, pick


# --- max pooling ----------------------------------------------------------------------------

def windows_per_input(kernel, stride, dilation) -> int:
    """Most windows one input position belongs to (product over spatial dims)."""
    n = 1
    for k, s, d in zip(kernel, stride, dilation):
        n *= min(k, math.ceil((d * (k - 1) + 1) / s))
    return n


def max_pool2d_ball(x: Bound, kernel_size, stride, padding, dilation, ceil_mode):
    """radius_out = sqrt(windows per input) * radius_in."""
    if x.radius is None:
        return None
    return math.sqrt(windows_per_input(kernel_size, stride, dilation)) * x.radius


def max_pool2d_box(center, radius, x: Bound, kernel_size, stride, padding, dilation, ceil_mode) -> Bound:
    """[pool(lower), pool(upper)] (max pooling is nondecreasing; inside the output ball box)."""
    pool = lambda t: F.max_pool2d(t, kernel_size, stride, padding, dilation, ceil_mode)  # noqa: E731
    return enclose(center, radius, pool(x.lower), pool(x.upper))


def _max_pool_args(kernel, stride, padding, dilation, ceil_mode, return_indices):
    if return_indices:
        raise ValueError("max_pool2d(return_indices=True) is not supported")
    kernel = ntuple(kernel, 2)
    stride = kernel if stride is None or stride == [] or stride == () else ntuple(stride, 2)
    return (kernel, stride, ntuple(padding, 2), ntuple(dilation, 2), bool(ceil_mode))


def _max_pool_module_adapter(module, args, kwargs):
    (x,) = args
    return (x,) + _max_pool_args(module.kernel_size, module.stride, module.padding, module.dilation,
                                 module.ceil_mode, module.return_indices), {}


def _max_pool_fn_adapter(module, args, kwargs):
    x, k, s, p, d, c, r = pick(args, kwargs,
                               ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                               {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    return (x,) + _max_pool_args(k, s, p, d, c, r), {}



register(F.max_pool2d, ball=max_pool2d_ball, box=max_pool2d_box, family="pool", name="max_pool2d",
         spellings=((F.max_pool2d, _max_pool_fn_adapter), (nn.MaxPool2d, _max_pool_module_adapter)))


def _adaptive_windows(size: int, out: int) -> int:
    """Most adaptive-pooling windows one of ``size`` positions belongs to (window ``i`` covers
    ``[floor(i size / out), ceil((i + 1) size / out))``, as torch computes them)."""
    counts = [0] * size
    for i in range(out):
        for j in range((i * size) // out, -(-((i + 1) * size) // out)):
            counts[j] += 1
    return max(counts)


def _adaptive_sizes(output_size, spatial) -> tuple:
    sizes = ntuple(output_size, 2) if not isinstance(output_size, (tuple, list)) else tuple(output_size)
    return tuple(int(d if o is None else o) for o, d in zip(sizes, spatial))


def adaptive_max_pool2d_ball(x: Bound, output_size):
    """radius_out = sqrt(windows per input) * radius_in (as for max_pool2d; adaptive windows
    overlap where the output size does not divide the input size, and an output larger than its
    input puts one position in several windows)."""
    if x.radius is None:
        return None
    spatial = tuple(x.center.shape[-2:])
    n = 1
    for d, o in zip(spatial, _adaptive_sizes(output_size, spatial)):
        n *= _adaptive_windows(d, o)
    return math.sqrt(n) * x.radius


def adaptive_max_pool2d_box(center, radius, x: Bound, output_size) -> Bound:
    """[pool(lower), pool(upper)] (a max over each window is nondecreasing; inside the output ball box)."""
    return enclose(center, radius, F.adaptive_max_pool2d(x.lower, output_size),
                   F.adaptive_max_pool2d(x.upper, output_size))


def _adaptive_max_fn_adapter(module, args, kwargs):
    x, size, indices = pick(args, kwargs, ("input", "output_size", "return_indices"), {"return_indices": False})
    if indices:
        raise ValueError("adaptive_max_pool2d(return_indices=True) is not supported")
    return (x, size), {}


def _adaptive_max_module_adapter(module, args, kwargs):
    (x,) = args
    if module.return_indices:
        raise ValueError("nn.AdaptiveMaxPool2d(return_indices=True) is not supported")
    return (x, module.output_size), {}


register(F.adaptive_max_pool2d, ball=adaptive_max_pool2d_ball, box=adaptive_max_pool2d_box, family="pool",
         name="adaptive_max_pool2d",
         spellings=((F.adaptive_max_pool2d, _adaptive_max_fn_adapter),
                    (nn.AdaptiveMaxPool2d, _adaptive_max_module_adapter)))


# --- average pooling (nonnegative linear maps) ----------------------------------------------

def schur_sigma_upper(linear_fn, in_shape, key) -> float:
    """Guaranteed ``sigma(A) <= sqrt(max_i sum_j A_ij * max_j sum_i A_ij)`` for ``A >= 0`` (the map
    ``linear_fn`` with nonnegative weights), cached per ``key`` and shape (``linear_map_sums``)."""
    rows, cols = linear_map_sums(linear_fn, in_shape, key)
    return math.sqrt(rows * cols) * (1 + lipschitz.SAFETY)


def avg_pool2d_ball(x: Bound, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """radius_out = Schur bound of the pooling matrix * radius_in."""
    if x.radius is None:
        return None
    args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    fn = lambda t: F.avg_pool2d(t, *args)  # noqa: E731
    return schur_sigma_upper(fn, x.center.shape[1:], ("avg_pool2d", repr(args))) * x.radius


def avg_pool2d_box(center, radius, x: Bound, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override) -> Bound:
    """[pool(lower), pool(upper)] ∩ output ball box (nonnegative weights)."""
    pool = lambda t: F.avg_pool2d(t, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)  # noqa: E731
    return bound(center, radius, pool(x.lower), pool(x.upper))


def _avg_pool_args(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    kernel = ntuple(kernel, 2)
    stride = kernel if stride is None or stride == [] or stride == () else ntuple(stride, 2)
    return (kernel, stride, ntuple(padding, 2), bool(ceil_mode), bool(count_include_pad), divisor_override)


def _avg_pool_module_adapter(module, args, kwargs):
    (x,) = args
    return (x,) + _avg_pool_args(module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                 module.count_include_pad, module.divisor_override), {}


def _avg_pool_fn_adapter(module, args, kwargs):
    vals = pick(args, kwargs, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                               "divisor_override"),
                {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
    return (vals[0],) + _avg_pool_args(*vals[1:]), {}


register(F.avg_pool2d, ball=avg_pool2d_ball, box=avg_pool2d_box, family="pool", name="avg_pool2d",
         spellings=((F.avg_pool2d, _avg_pool_fn_adapter), (nn.AvgPool2d, _avg_pool_module_adapter)))


def adaptive_avg_pool2d_ball(x: Bound, output_size):
    """radius_out = Schur bound of the pooling matrix * radius_in."""
    if x.radius is None:
        return None
    fn = lambda t: F.adaptive_avg_pool2d(t, output_size)  # noqa: E731
    return schur_sigma_upper(fn, x.center.shape[1:], ("adaptive_avg_pool2d", repr(output_size))) * x.radius


def adaptive_avg_pool2d_box(center, radius, x: Bound, output_size) -> Bound:
    """[pool(lower), pool(upper)] ∩ output ball box (nonnegative weights)."""
    return bound(center, radius, F.adaptive_avg_pool2d(x.lower, output_size),
                 F.adaptive_avg_pool2d(x.upper, output_size))


def _adaptive_module_adapter(module, args, kwargs):
    (x,) = args
    return (x, module.output_size), {}


def _adaptive_fn_adapter(module, args, kwargs):
    x, size = pick(args, kwargs, ("input", "output_size"), {})
    return (x, size), {}


register(F.adaptive_avg_pool2d, ball=adaptive_avg_pool2d_ball, box=adaptive_avg_pool2d_box, family="pool",
         name="adaptive_avg_pool2d",
         spellings=((F.adaptive_avg_pool2d, _adaptive_fn_adapter), (nn.AdaptiveAvgPool2d, _adaptive_module_adapter)))

"""Canonical ops that have no single torch function with the semantics bcpc needs.

Everything else canonicalizes to a torch function (``torch.relu``, ``F.conv2d``, ...).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor


def batch_norm(x: Tensor, weight, bias, running_mean, running_var, num_batches_tracked,
               training: bool, momentum, eps: float) -> Tensor:
    """``nn.BatchNorm*d.forward``, spelled out so the module's state can be read as arguments.

    Follows torch's own module exactly, including ``momentum=None`` (cumulative average through
    ``num_batches_tracked``) and the running-statistics update in training mode.
    """
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    return F.batch_norm(x, running_mean, running_var, weight, bias,
                        training or running_mean is None, factor, eps)


def batch_norm_scale_shift(x: Tensor, weight, bias, running_mean, running_var, training: bool, eps: float):
    """Per-channel ``(scale, shift)`` with ``batch_norm(x) == scale * x + shift``.

    Eval mode: from the running statistics. Training mode: from the statistics of the clean batch
    ``x`` (the centre), held constant for the bound as IBP-style certified training does — the
    normalisation is then an affine map of the perturbed activation.
    Returns two tensors of shape ``(C,)``.
    """
    if training or running_mean is None:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
    else:
        mean, var = running_mean, running_var
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _pairs(t: Tensor, dim: int, n: int, strided: bool):
    """The two members of every pair along ``dim`` (views): the halves (``strided``) or the even
    and odd positions."""
    if strided:
        return t.narrow(dim, 0, n), t.narrow(dim, n, n)
    grouped = t.unflatten(dim, (n, 2))
    return grouped.select(dim + 1, 0), grouped.select(dim + 1, 1)


def _two_ops_into_pairs(fill_first, fill_second, like: Tensor, dim: int, n: int, strided: bool) -> Tensor:
    """A tensor shaped as ``like`` whose pair members are ``fill_first(out=...)`` and
    ``fill_second(out=...)``, written in place (no concatenation); under torch.compile, which
    takes no strided ``out=``, computed and joined instead (inductor fuses the join)."""
    if torch.compiler.is_compiling():
        first, second = fill_first(), fill_second()
        if strided:
            return torch.cat((first, second), dim)
        return torch.stack((first, second), dim + 1).flatten(dim, dim + 1)
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    first, second = _pairs(out, dim, n, strided)
    fill_first(out=first)
    fill_second(out=second)
    return out


class _MaxMin(torch.autograd.Function):
    """:func:`group_sort` with groups of 2: the max and the min of each pair written straight into
    the output (the values a sort of each pair gives), and backward keeps one boolean mask (a sort
    keeps an int64 index per element) to route each gradient to the input the value came from
    (on a tie the first member takes the max's gradient and the second the min's)."""

    @staticmethod
    def forward(ctx, x, dim, strided, descending):
        n = x.shape[dim] // 2
        a, b = _pairs(x, dim, n, strided)
        hi, lo = partial(torch.maximum, a, b), partial(torch.minimum, a, b)
        out = _two_ops_into_pairs(*((hi, lo) if descending else (lo, hi)), x, dim, n, strided)
        ctx.save_for_backward(a >= b)
        ctx.layout = dim, n, strided, descending
        return out

    @staticmethod
    def backward(ctx, grad):
        (a_first,) = ctx.saved_tensors
        dim, n, strided, descending = ctx.layout
        first, second = _pairs(grad, dim, n, strided)
        g_hi, g_lo = (first, second) if descending else (second, first)
        grad_x = _two_ops_into_pairs(partial(torch.where, a_first, g_hi, g_lo), partial(torch.where, a_first, g_lo, g_hi),
                                     grad, dim, n, strided)
        return grad_x, None, None, None


def group_sort(x: Tensor, group_size: int, dim: int = 1, strided: bool = False, descending: bool = False) -> Tensor:
    """GroupSort: sort the values of ``x`` within groups of ``group_size`` along ``dim``.

    Groups are consecutive coordinates (``strided=False``: ``x.unflatten(dim, (n, k))`` sorted
    along the last of the two) or every ``n``-th coordinate (``strided=True``:
    ``x.unflatten(dim, (k, n))`` sorted along the first). ``group_size=2, strided=True,
    descending=True`` is MaxMin as usually written: ``a, b = x.chunk(2, dim)``,
    ``cat([max(a, b), min(a, b)], dim)``. The size of ``dim`` must be a multiple of ``group_size``.

    Under torch.fx tracing it is one call in the graph, however the user's code reaches it
    (``bcpc.ops.group_sort``, ``from bcpc.ops import group_sort``, ``bcpc.nn.GroupSort``).
    """
    if isinstance(x, torch.fx.Proxy):
        return x.tracer.create_proxy("call_function", group_sort, (x, group_size, dim, strided, descending), {})
    dim = dim % x.dim()
    size = x.shape[dim]
    if group_size < 1 or size % group_size:
        raise ValueError(f"group_size={group_size} does not divide the size {size} of dim {dim}")
    n = size // group_size
    if group_size == 2:  # MaxMin: a max and a min of the pairs, not a sort (2-4x faster, fwd + bwd)
        return _MaxMin.apply(x, dim, strided, descending)
    if strided:
        grouped = x.unflatten(dim, (group_size, n))
        return grouped.sort(dim, descending=descending).values.flatten(dim, dim + 1)
    grouped = x.unflatten(dim, (n, group_size))
    return grouped.sort(dim + 1, descending=descending).values.flatten(dim, dim + 1)


def less_precise(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether floating ``dtype`` rounds more coarsely than ``than`` (float16 than float32, say)."""
    return torch.finfo(dtype).eps > torch.finfo(than).eps


def cast(x: Tensor, dtype: torch.dtype, device=None) -> Tensor:
    """``x.to(device, dtype)`` (the canonical cast); ``dtype=None``: a device move only, which
    changes no value (``device`` is one the model reads at run time, ``h.device``; a literal one
    is dropped: the compiled module follows its input's device).

    Between floating dtypes the value keeps its own dtype: a cast to a *less precise* dtype rounds
    it to that dtype (``x.to(dtype).to(x.dtype)``), a cast to an equally or more precise one
    changes nothing. In a model of one floating dtype (the only kind bcpc compiles) the spellings
    that work in the model itself are no-ops (``x.float()`` in a float32 model), round trips
    (``h.half().float()``, ``h.double().float()``) or a final widening (``logits.double()``), and
    all give the same values this way; the float64 copy that certifies a float32 model keeps
    computing in float64 after ``x.float()`` instead of meeting its float64 weights with a
    float32 tensor, and the float32 path stays float32 after ``h.double()``."""
    if device is not None:
        x = x.to(device)
    if dtype is None:
        return x
    if x.is_floating_point() and dtype.is_floating_point:
        if less_precise(dtype, x.dtype):
            return x.to(dtype).to(x.dtype)
        return x
    return x.to(dtype)

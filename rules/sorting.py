"""Order statistics and sums over dims: GroupSort / MaxMin, max and min (elementwise and over
dims), sum and mean over dims.

Order statistics (the k-th largest of a group) are nondecreasing in every input, so each has the
box ``[stat(l), stat(u)]``, and they move at most as far as their inputs:

* ``group_sort`` (sorting within groups; MaxMin is groups of 2): ``||sort(a') - sort(a)|| <=
  ||a' - a||`` per group (rearrangement inequality), hence overall: radius unchanged. Composing
  max, min and cat separately would give ``sqrt(2)`` per pair of halves and ``2`` for the layer,
  which is why the patterns pass rewrites the hand-written forms into this op.
* ``amax`` / ``amin`` over dims: ``|max_g a' - max_g a| <= max_g |a' - a| <= ||(a' - a)_g||``:
  radius unchanged (groups are disjoint, squared norms add).
* ``maximum(a, b)`` / ``minimum``: ``|max(a', b') - max(a, b)| <= max(|da|, |db|)``, so the
  squared output movement is at most ``||da||^2 + ||db||^2``: radius ``sqrt(r_a^2 + r_b^2)``
  (``r_a`` when ``b`` is a constant).

Sums and means are linear with nonnegative weights: box ``[sum(l), sum(u)]`` (intersected with
the ball), and by Cauchy-Schwarz ``|sum_g da| <= sqrt(n) ||da_g||``: radius ``sqrt(n) r`` for
``sum``, ``r / sqrt(n)`` for ``mean`` (``n`` the number of values reduced into each output).
Reductions over the batch dimension mix samples and are refused.
"""
from __future__ import annotations

import math

import torch

from bcpc import ops
from bcpc.domain import Bound, bound, enclose
from bcpc.registry import register
from bcpc.rules._util import lower_of as _lo, upper_of as _hi
from bcpc.rules._util import check_same_shape_as_perturbed, is_bound, perturbed, pick, shape, unsupported


# --- GroupSort ------------------------------------------------------------------------------

def group_sort_ball(x: Bound, group_size, dim, strided, descending):
    """radius unchanged (sorting a group is 1-Lipschitz in l2)."""
    return x.radius


def group_sort_box(center, radius, x: Bound, group_size, dim, strided, descending) -> Bound:
    """The order statistics of the box ends (each is nondecreasing in every input)."""
    return enclose(center, radius, ops.group_sort(x.lower, group_size, dim, strided, descending),
                   ops.group_sort(x.upper, group_size, dim, strided, descending))


def _group_sort_adapter(module, args, kwargs):
    x, k, d, strided, desc = pick(args, kwargs, ("x", "group_size", "dim", "strided", "descending"),
                                  {"dim": 1, "strided": False, "descending": False})
    return (x, int(k), int(d), bool(strided), bool(desc)), {}


def _check_group_sort(node):
    x, k, d = node.args[:3]
    dims = shape(x)
    if d % len(dims) == 0:
        raise unsupported(node, "sorting along the batch dimension mixes samples", "Sort along dim >= 1")
    if dims[d] % k:
        raise unsupported(node, f"group size {k} does not divide the {dims[d]} values of dim {d}",
                          "Use a group size that divides the channel count")


register(ops.group_sort, ball=group_sort_ball, box=group_sort_box, family="sorting", name="group_sort",
         spellings=((ops.group_sort, _group_sort_adapter),), check=_check_group_sort)
# bcpc.nn.GroupSort / MaxMin call ops.group_sort, which torch.fx.wrap keeps one call: no module spelling needed


# --- max / min --------------------------------------------------------------------------------

def _pair_radius(a, b):
    radii = [t.radius for t in (a, b) if is_bound(t)]
    if any(r is None for r in radii):
        return None
    if len(radii) == 1:
        return radii[0]
    return (radii[0].square() + radii[1].square()).sqrt()


def maximum_ball(a, b):
    """radius_out = sqrt(r_a^2 + r_b^2) (r of the perturbed one if the other is constant)."""
    return _pair_radius(a, b)


def maximum_box(center, radius, a, b) -> Bound:
    """[max(l_a, l_b), max(u_a, u_b)] (inside the output ball box)."""
    return enclose(center, radius, torch.maximum(_lo(a), _lo(b)), torch.maximum(_hi(a), _hi(b)))


def minimum_ball(a, b):
    """radius_out = sqrt(r_a^2 + r_b^2) (r of the perturbed one if the other is constant)."""
    return _pair_radius(a, b)


def minimum_box(center, radius, a, b) -> Bound:
    """[min(l_a, l_b), min(u_a, u_b)] (inside the output ball box)."""
    return enclose(center, radius, torch.minimum(_lo(a), _lo(b)), torch.minimum(_hi(a), _hi(b)))


def _is_tensor_arg(v) -> bool:
    return isinstance(v, (torch.fx.Node, torch.Tensor))


def _max_min_adapter(module, args, kwargs):
    """``torch.max(a, b)`` is elementwise; ``torch.max(x, dim)`` (a tuple) is left to the patterns
    pass; ``torch.max(x)`` reduces over the batch too."""
    x, *rest = args
    other = kwargs.get("other", rest[0] if rest else None)
    if _is_tensor_arg(other):
        return (x, other), {}
    return None  # over dims (a tuple) or over everything: not this op


def _pair_adapter(module, args, kwargs):
    a, b = pick(args, kwargs, ("input", "other"), {})
    return (a, b), {}


register(torch.maximum, ball=maximum_ball, box=maximum_box, family="sorting", name="maximum",
         check=check_same_shape_as_perturbed,
         spellings=((torch.maximum, _pair_adapter), ("maximum", _pair_adapter), (torch.max, _max_min_adapter),
                    ("max", _max_min_adapter)))
register(torch.minimum, ball=minimum_ball, box=minimum_box, family="sorting", name="minimum",
         check=check_same_shape_as_perturbed,
         spellings=((torch.minimum, _pair_adapter), ("minimum", _pair_adapter), (torch.min, _max_min_adapter),
                    ("min", _max_min_adapter)))


# --- reductions over dims ---------------------------------------------------------------------

def _dims(dim) -> tuple:
    return tuple(int(d) for d in dim) if isinstance(dim, (tuple, list)) else (int(dim),)


def _reduce_adapter(module, args, kwargs):
    kwargs = dict(kwargs)
    if kwargs.pop("dtype", None) is not None:
        raise ValueError("dtype= in a reduction: cast first with x.to(dtype)")
    x, dim, keepdim = pick(args, kwargs, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
    if dim is None or dim == () or dim == [] or isinstance(dim, torch.fx.Node):
        return None  # over every element (a weight's norm, ...): left as is; refused if perturbed
    return (x, _dims(dim), bool(keepdim)), {}


def _check_reduce(node):
    x, dims = node.args[:2]
    n = len(shape(x))
    if any(d % n == 0 for d in dims):
        raise unsupported(node, f"reducing over dims {dims} includes the batch dimension", "Reduce over dims >= 1")


def _reduced(x: Bound, dims) -> int:
    return math.prod(x.center.shape[d] for d in dims)


def sum_ball(x: Bound, dims, keepdim):
    """radius_out = sqrt(n) * radius_in, n = values summed into each output (Cauchy-Schwarz)."""
    return None if x.radius is None else math.sqrt(_reduced(x, dims)) * x.radius


def sum_box(center, radius, x: Bound, dims, keepdim) -> Bound:
    """[sum(l), sum(u)] ∩ the output ball box."""
    return bound(center, radius, torch.sum(x.lower, dims, keepdim), torch.sum(x.upper, dims, keepdim))


def mean_ball(x: Bound, dims, keepdim):
    """radius_out = radius_in / sqrt(n), n = values averaged into each output."""
    return None if x.radius is None else x.radius / math.sqrt(_reduced(x, dims))


def mean_box(center, radius, x: Bound, dims, keepdim) -> Bound:
    """[mean(l), mean(u)] ∩ the output ball box."""
    return bound(center, radius, torch.mean(x.lower, dims, keepdim), torch.mean(x.upper, dims, keepdim))


def amax_ball(x: Bound, dims, keepdim):
    """radius unchanged (a max over a group moves at most as far as the group)."""
    return x.radius


def amax_box(center, radius, x: Bound, dims, keepdim) -> Bound:
    """[amax(l), amax(u)] (nondecreasing; inside the output ball box)."""
    return enclose(center, radius, torch.amax(x.lower, dims, keepdim), torch.amax(x.upper, dims, keepdim))


def amin_ball(x: Bound, dims, keepdim):
    """radius unchanged."""
    return x.radius


def amin_box(center, radius, x: Bound, dims, keepdim) -> Bound:
    """[amin(l), amin(u)] (nondecreasing; inside the output ball box)."""
    return enclose(center, radius, torch.amin(x.lower, dims, keepdim), torch.amin(x.upper, dims, keepdim))


register(torch.sum, ball=sum_ball, box=sum_box, family="reduction", name="sum", check=_check_reduce,
         spellings=((torch.sum, _reduce_adapter), ("sum", _reduce_adapter)))
register(torch.mean, ball=mean_ball, box=mean_box, family="reduction", name="mean", check=_check_reduce,
         spellings=((torch.mean, _reduce_adapter), ("mean", _reduce_adapter)))
register(torch.amax, ball=amax_ball, box=amax_box, family="sorting", name="amax", check=_check_reduce,
         spellings=((torch.amax, _reduce_adapter), ("amax", _reduce_adapter)))
register(torch.amin, ball=amin_ball, box=amin_box, family="sorting", name="amin", check=_check_reduce,
         spellings=((torch.amin, _reduce_adapter), ("amin", _reduce_adapter)))


# --- selection by a constant mask ------------------------------------------------------------
#
# torch.where(mask, a, b) with a mask that does not depend on the input picks each coordinate from
# a or from b: ||Δout||^2 = sum over the mask of Δa_i^2 + sum off it of Δb_i^2 <= ||Δa||^2 + ||Δb||^2.

def where_ball(cond, a, b):
    """radius_out = sqrt(r_a^2 + r_b^2) (r of the perturbed one if the other is constant); a
    perturbed operand broadcast to the output shape is an explicit expand before it (patterns)."""
    return _pair_radius(a, b)


def where_box(center, radius, cond, a, b) -> Bound:
    """[where(mask, l_a, l_b), where(mask, u_a, u_b)] (inside the output ball box)."""
    return enclose(center, radius, torch.where(cond, _lo(a), _lo(b)), torch.where(cond, _hi(a), _hi(b)))


def _where_adapter(module, args, kwargs):
    cond, a, b = pick(args, kwargs, ("condition", "input", "other"), {})
    return (cond, a, b), {}


def _where_method_adapter(module, args, kwargs):
    a, cond, b = pick(args, kwargs, ("self", "condition", "other"), {})
    return (cond, a, b), {}


def _masked_fill_adapter(module, args, kwargs):
    x, mask, value = pick(args, kwargs, ("self", "mask", "value"), {})
    return (mask, value, x), {}


def _check_where(node):
    cond = node.args[0]
    if perturbed(cond):
        raise unsupported(node, "the mask depends on the input, so the selection changes inside the perturbation set",
                          "Use a mask that does not depend on the input, or write the activation itself "
                          "(torch.relu(h) rather than torch.where(h > 0, h, 0))")
    check_same_shape_as_perturbed(node)


register(torch.where, ball=where_ball, box=where_box, family="sorting", name="where", check=_check_where,
         spellings=((torch.where, _where_adapter), ("where", _where_method_adapter),
                    ("masked_fill", _masked_fill_adapter)))

"""Sums, differences, concatenation and reshaping.

* ``a + b`` (residual merge): radius ``r_a + r_b`` (triangle inequality), box ``[l_a + l_b, u_a + u_b]``.
* ``a - b``: radius ``r_a + r_b``, box ``[l_a - u_b, u_a - l_b]``; ``-a``: box ``[-u, -l]``.
* adding a constant shifts the box and keeps the radius.
* ``cat``: radius ``sqrt(sum r_i^2)`` (the parts move independently, squared norms add), box the
  concatenated boxes (a constant part is its own box).
* reshape / flatten (batch dimension kept): the same values in another layout, radius unchanged.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from bcpc.domain import Bound, enclose
from bcpc.registry import register, register_identity
from bcpc.rules._util import lower_of as _lo, upper_of as _hi
from bcpc.rules._util import check_same_shape_as_perturbed, is_bound, pick, shape, unsupported


def _radius_sum(*xs):
    radii = [x.radius for x in xs if is_bound(x)]
    if any(r is None for r in radii):
        return None
    out = radii[0]
    for r in radii[1:]:
        out = out + r
    return out


def add_ball(a, b):
    """radius_out = r_a + r_b (a constant operand has radius 0)."""
    return _radius_sum(a, b)


def add_box(center, radius, a, b) -> Bound:
    """[l_a + l_b, u_a + u_b] (inside the output ball box)."""
    return enclose(center, radius, _lo(a) + _lo(b), _hi(a) + _hi(b))


def sub_ball(a, b):
    """radius_out = r_a + r_b."""
    return _radius_sum(a, b)


def sub_box(center, radius, a, b) -> Bound:
    """[l_a - u_b, u_a - l_b] (inside the output ball box)."""
    return enclose(center, radius, _lo(a) - _hi(b), _hi(a) - _lo(b))


def neg_ball(a):
    """radius unchanged."""
    return a.radius


def neg_box(center, radius, a) -> Bound:
    """[-u, -l]."""
    return enclose(center, radius, -a.upper, -a.lower)


def _add_adapter(module, args, kwargs):
    a, b, alpha = pick(args, kwargs, ("input", "other", "alpha"), {"alpha": 1})
    if alpha != 1:
        raise unsupported_alpha(alpha)
    return (a, b), {}


def unsupported_alpha(alpha):
    from bcpc.errors import UnsupportedOpError
    return UnsupportedOpError(f"add/sub with alpha={alpha!r} is not supported; write a + alpha * b instead")


def _neg_adapter(module, args, kwargs):
    (a,) = pick(args, kwargs, ("input",), {})
    return (a,), {}


register(operator.add, ball=add_ball, box=add_box, family="merge", name="add",
         spellings=((torch.add, _add_adapter), ("add", _add_adapter)), check=check_same_shape_as_perturbed)
register(operator.sub, ball=sub_ball, box=sub_box, family="merge", name="sub",
         spellings=((torch.sub, _add_adapter), ("sub", _add_adapter)), check=check_same_shape_as_perturbed)
register(operator.neg, ball=neg_ball, box=neg_box, family="affine", name="neg",
         spellings=((torch.neg, _neg_adapter), ("neg", _neg_adapter)))


# --- concatenation --------------------------------------------------------------------------

def cat_ball(tensors, dim):
    """radius_out = sqrt(sum_i r_i^2) over the perturbed parts."""
    radii = [t.radius for t in tensors if is_bound(t)]
    if any(r is None for r in radii):
        return None
    return torch.stack(radii).square().sum(0).sqrt()


def cat_box(center, radius, tensors, dim) -> Bound:
    """The concatenated boxes (inside the output ball box)."""
    return enclose(center, radius, torch.cat([_lo(t) for t in tensors], dim), torch.cat([_hi(t) for t in tensors], dim))


def tensors_dim_adapter(module, args, kwargs):
    """``(tensors, dim)`` of ``torch.cat`` / ``torch.stack``; None for the whole tuple of a
    chunk/split/unbind (one node), which the patterns pass spells out item by item."""
    tensors, dim = pick(args, kwargs, ("tensors", "dim"), {"dim": 0})
    if isinstance(tensors, torch.fx.Node):
        return None
    return (tuple(tensors), int(dim)), {}


def _check_cat(node):
    tensors, dim = node.args
    out = shape(node)
    if dim % len(out) == 0:
        raise unsupported(node, "concatenation along the batch dimension mixes samples",
                          "Concatenate along a feature dimension (dim >= 1)")


register(torch.cat, ball=cat_ball, box=cat_box, family="merge", name="cat",
         spellings=((torch.cat, tensors_dim_adapter), (torch.concat, tensors_dim_adapter), (torch.concatenate, tensors_dim_adapter)),
         check=_check_cat)


# --- reshaping ------------------------------------------------------------------------------

def reshape_ball(x, *args):
    """radius unchanged (the same numbers in another layout)."""
    return x.radius


def reshape_box(center, radius, x, shape_arg) -> Bound:
    """The box reshaped the same way."""
    return enclose(center, radius, torch.reshape(x.lower, shape_arg), torch.reshape(x.upper, shape_arg))


def flatten_box(center, radius, x, start_dim, end_dim) -> Bound:
    """The box flattened the same way."""
    return enclose(center, radius, torch.flatten(x.lower, start_dim, end_dim), torch.flatten(x.upper, start_dim, end_dim))


def _reshape_adapter(module, args, kwargs):
    x, *rest = args
    if "shape" in kwargs:
        rest = [kwargs["shape"]]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        shape_arg = tuple(rest[0])
    else:
        shape_arg = tuple(rest)
    return (x, shape_arg), {}


def _flatten_adapter(module, args, kwargs):
    if module is not None:
        (x,) = args
        return (x, int(module.start_dim), int(module.end_dim)), {}
    x, start, end = pick(args, kwargs, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    return (x, int(start), int(end)), {}


def _check_batch_kept(node):
    x = node.args[0]
    if shape(x)[0] != shape(node)[0]:
        raise unsupported(node, f"reshaping {shape(x)} to {shape(node)} mixes samples of the batch",
                          "Keep the batch dimension first, e.g. x.view(x.size(0), -1) or x.flatten(1)")
    if node.target is torch.flatten and node.args[1] % len(shape(x)) == 0:
        raise unsupported(node, "flatten(start_dim=0) merges the batch dimension", "Use flatten(1)")


register(torch.reshape, ball=reshape_ball, box=reshape_box, family="reshape", name="reshape",
         spellings=((torch.reshape, _reshape_adapter), ("view", _reshape_adapter), ("reshape", _reshape_adapter)),
         check=_check_batch_kept)
register(torch.flatten, ball=reshape_ball, box=flatten_box, family="reshape", name="flatten",
         spellings=((torch.flatten, _flatten_adapter), ("flatten", _flatten_adapter), (nn.Flatten, _flatten_adapter)),
         check=_check_batch_kept)

def unflatten_box(center, radius, x, dim, sizes) -> Bound:
    """The box unflattened the same way."""
    return enclose(center, radius, torch.unflatten(x.lower, dim, sizes), torch.unflatten(x.upper, dim, sizes))


def _unflatten_adapter(module, args, kwargs):
    if module is not None:
        (x,) = args
        return (x, int(module.dim), tuple(module.unflattened_size)), {}
    x, dim, sizes = pick(args, kwargs, ("input", "dim", "sizes"), {})
    return (x, int(dim), tuple(sizes)), {}


def _check_unflatten(node):
    if node.args[1] % len(shape(node.args[0])) == 0:
        raise unsupported(node, "unflatten of dim 0 splits the batch dimension", "Unflatten a dim >= 1")


register(torch.unflatten, ball=reshape_ball, box=unflatten_box, family="reshape", name="unflatten",
         spellings=((torch.unflatten, _unflatten_adapter), ("unflatten", _unflatten_adapter),
                    (nn.Unflatten, _unflatten_adapter)),
         check=_check_unflatten)


def _dropout_fn_adapter(name: str):
    """``F.dropout`` (and ``dropout1d/2d/3d``, ``alpha_dropout``, ``feature_alpha_dropout``) is the
    identity only when ``training`` is False at trace time: its default is True, so ``F.dropout(h,
    0.5)`` drops units in eval mode too (a random function)."""

    def adapter(module, args, kwargs):
        x, p, training, inplace = pick(args, kwargs, ("input", "p", "training", "inplace"),
                                       {"p": 0.5, "training": True, "inplace": False})
        if training is not False:
            from bcpc.errors import UnsupportedOpError
            raise UnsupportedOpError(
                f"F.{name} with training={training!r} drops units whatever the model's mode (its default is "
                f"training=True), so the model is random and no certificate holds. Write F.{name}(h, p, "
                "self.training) or use the dropout module, and compile the model in eval mode")
        return (x,), {}

    return adapter


_DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
register_identity(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout, "contiguous", "clone",
                  *((getattr(torch.nn.functional, n), _dropout_fn_adapter(n)) for n in _DROPOUTS))

"""Layout ops: values moved, selected, copied or padded, never combined.

Every output coordinate of these ops is either one input coordinate or a constant, so:

* box: the op applied to the box ends, ``[op(l), op(u)]`` (a selection of each end; a constant
  pad value is its own box);
* ball: if each input coordinate appears at most ``n`` times in the output, then
  ``||op(a') - op(a)||^2 <= n ||a' - a||^2``: radius ``sqrt(n) * r``. ``n = 1`` for permutes,
  transposes, (un)squeezes, slicing, ``narrow``, ``select``, ``flip``, ``roll``, pixel and channel
  shuffles and constant padding; ``expand`` / ``repeat`` / nearest upsampling / reflect,
  replicate and circular padding copy values, and ``n`` is counted exactly (the gradient of
  ``op(ones).sum()`` is the number of copies of each input coordinate) and cached per input shape.

The batch dimension must stay the first dimension, untouched: an op that moves, slices or
copies it mixes samples, and is refused. Linear resampling (bilinear, ...) is a nonnegative
linear map and is bounded like average pooling (Schur bound); ``bicubic`` (negative weights) is
refused. dtype casts round: see :func:`cast_ball`.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bcpc import ops
from bcpc.domain import Bound, bound, enclose
from bcpc.meta import info
from bcpc.registry import register
from bcpc.rules._util import is_bound, linear_map_sums, lower_of, perturbed, pick, shape, unsupported, upper_of
from bcpc.rules.structural import cat_ball, tensors_dim_adapter
from bcpc.rules.pooling import schur_sigma_upper

def max_copies(fn, in_shape, key) -> int:
    """Most output coordinates any one input coordinate of ``fn`` (a selection op) is copied to:
    the selection matrix's largest column sum (``linear_map_sums``, cached per key and shape)."""
    return int(round(linear_map_sums(fn, in_shape, key)[1]))


def selection(target, *, name: str, spellings, check=None, copies: bool = False):
    """Register a selection op ``target(x, *args)``: box by the op on the box ends, radius times
    sqrt(max copies) (1 unless ``copies``)."""

    def ball(x: Bound, *args, **kwargs):
        if x.radius is None:
            return None
        if not copies:
            return x.radius
        if target is expand:  # one sample: the batch entry of the sizes is the caller's batch
            args = ((-1,) + tuple(args[0][1:]),) + tuple(args[1:])
        n = max_copies(lambda t: target(t, *args, **kwargs), x.center.shape[1:], (name, repr(args), repr(kwargs)))
        return math.sqrt(n) * x.radius

    def box(center, radius, x: Bound, *args, **kwargs) -> Bound:
        return enclose(center, radius, target(x.lower, *args, **kwargs), target(x.upper, *args, **kwargs))

    ball.__name__, box.__name__ = f"{name}_ball", f"{name}_box"
    ball.__qualname__, box.__qualname__ = ball.__name__, box.__name__
    ball.__doc__ = ("radius_out = sqrt(max copies of an input coordinate) * radius_in." if copies
                    else "radius unchanged (each input coordinate appears at most once).")
    box.__doc__ = f"[{name}(lower), {name}(upper)] (a selection of each end; inside the output ball box)."
    globals()[ball.__name__], globals()[box.__name__] = ball, box  # importable: emitted code names them
    return register(target, ball=ball, box=box, family="layout", name=name, spellings=spellings,
                    check=_batch_check(check))


def _batch_check(extra):
    def check(node):
        x = node.args[0]
        if not info_is_tensor(x):
            raise unsupported(node, "its input is a tuple or a number computed from the input, which has no rule",
                              "See the error for the op that produced it")
        if extra is not None:
            extra(node)
        if perturbed(node) and shape(node)[:1] != shape(x)[:1]:
            raise unsupported(node, f"it changes the batch dimension ({shape(x)} -> {shape(node)}): samples mix",
                              "Keep the batch dimension first and whole")
    return check


def info_is_tensor(a) -> bool:
    return is_bound(a) or (isinstance(a, torch.fx.Node) and info(a).is_tensor)


def _norm_dim(node, d) -> int:
    return int(d) % len(shape(node.args[0]))


def _not_batch(node, *dims, what="dim"):
    for d in dims:
        if _norm_dim(node, d) == 0:
            raise unsupported(node, f"{what}={d} is the batch dimension: samples mix", "Use dims >= 1")


# --- permutations ---------------------------------------------------------------------------

def _permute_adapter(module, args, kwargs):
    x, *rest = args
    dims = kwargs.get("dims", rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
    return (x, tuple(int(d) for d in dims)), {}


def _check_permute(node):
    if _norm_dim(node, node.args[1][0]) != 0:
        raise unsupported(node, f"permute{node.args[1]} moves the batch dimension", "Keep dim 0 first")


def _transpose_adapter(module, args, kwargs):
    x, d0, d1 = pick(args, kwargs, ("input", "dim0", "dim1"), {})
    return (x, int(d0), int(d1)), {}


def _check_transpose(node):
    _not_batch(node, node.args[1], node.args[2])


def _movedim_adapter(module, args, kwargs):
    x, src, dst = pick(args, kwargs, ("input", "source", "destination"), {})
    norm = lambda v: tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else int(v)  # noqa: E731
    return (x, norm(src), norm(dst)), {}


def _check_movedim(node):
    src, dst = node.args[1], node.args[2]
    src = src if isinstance(src, tuple) else (src,)
    dst = dst if isinstance(dst, tuple) else (dst,)
    _not_batch(node, *src, *dst)


selection(torch.permute, name="permute", check=_check_permute,
          spellings=((torch.permute, _permute_adapter), ("permute", _permute_adapter)))
selection(torch.transpose, name="transpose", check=_check_transpose,
          spellings=((torch.transpose, _transpose_adapter), ("transpose", _transpose_adapter),
                     (torch.swapaxes, _transpose_adapter), ("swapaxes", _transpose_adapter),
                     (torch.swapdims, _transpose_adapter), ("swapdims", _transpose_adapter)))
selection(torch.movedim, name="movedim", check=_check_movedim,
          spellings=((torch.movedim, _movedim_adapter), ("movedim", _movedim_adapter),
                     (torch.moveaxis, _movedim_adapter), ("moveaxis", _movedim_adapter)))


# --- adding and removing size-1 dims --------------------------------------------------------

def _unsqueeze_adapter(module, args, kwargs):
    x, d = pick(args, kwargs, ("input", "dim"), {})
    return (x, int(d)), {}


def _check_unsqueeze(node):
    if int(node.args[1]) % (len(shape(node.args[0])) + 1) == 0:
        raise unsupported(node, "unsqueeze(0) puts a new dimension before the batch", "Use dim >= 1")


def _squeeze_adapter(module, args, kwargs):
    x, d = pick(args, kwargs, ("input", "dim"), {"dim": None})
    if d is None:
        return (x,), {}  # the patterns pass names the dims once the shapes are known
    return (x, tuple(int(a) for a in d) if isinstance(d, (tuple, list)) else int(d)), {}


def _check_squeeze(node):
    if len(node.args) < 2:
        raise unsupported(node, "squeeze() without dims", "Name the dims, e.g. x.squeeze(-1)")
    dims = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    _not_batch(node, *dims)


def _flip_adapter(module, args, kwargs):
    x, *rest = args
    dims = kwargs.get("dims", rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
    return (x, tuple(int(d) for d in dims)), {}


def _check_flip(node):
    _not_batch(node, *node.args[1])


def _roll_adapter(module, args, kwargs):
    x, shifts, dims = pick(args, kwargs, ("input", "shifts", "dims"), {"dims": None})
    if dims is None:
        raise ValueError("roll without dims rolls the flattened batch; name the dims")
    return (x, shifts, dims), {}


def _check_roll(node):
    dims = node.args[2] if isinstance(node.args[2], (tuple, list)) else (node.args[2],)
    _not_batch(node, *dims)


selection(torch.unsqueeze, name="unsqueeze", check=_check_unsqueeze,
          spellings=((torch.unsqueeze, _unsqueeze_adapter), ("unsqueeze", _unsqueeze_adapter)))
selection(torch.squeeze, name="squeeze", check=_check_squeeze,
          spellings=((torch.squeeze, _squeeze_adapter), ("squeeze", _squeeze_adapter)))
selection(torch.flip, name="flip", check=_check_flip, spellings=((torch.flip, _flip_adapter), ("flip", _flip_adapter)))
selection(torch.roll, name="roll", check=_check_roll, spellings=((torch.roll, _roll_adapter), ("roll", _roll_adapter)))


# --- channel and pixel shuffles (permutations within a sample) --------------------------------

def _shuffle_adapter(arg: str, attr: str):
    def adapter(module, args, kwargs):
        if module is not None:
            (x,) = args
            return (x, int(getattr(module, attr))), {}
        x, v = pick(args, kwargs, ("input", arg), {})
        return (x, int(v)), {}
    return adapter


_pixel = _shuffle_adapter("upscale_factor", "upscale_factor")
_unpixel = _shuffle_adapter("downscale_factor", "downscale_factor")
_groups = _shuffle_adapter("groups", "groups")
selection(torch.pixel_shuffle, name="pixel_shuffle",
          spellings=((torch.pixel_shuffle, _pixel), (nn.PixelShuffle, _pixel)))
selection(torch.pixel_unshuffle, name="pixel_unshuffle",
          spellings=((torch.pixel_unshuffle, _unpixel), (nn.PixelUnshuffle, _unpixel)))
selection(torch.channel_shuffle, name="channel_shuffle",
          spellings=((torch.channel_shuffle, _groups), (nn.ChannelShuffle, _groups)))


# --- slicing ----------------------------------------------------------------------------------

def _narrow_adapter(module, args, kwargs):
    x, d, start, length = pick(args, kwargs, ("input", "dim", "start", "length"), {})
    return (x, int(d), int(start), int(length)), {}


def _select_adapter(module, args, kwargs):
    x, d, index = pick(args, kwargs, ("input", "dim", "index"), {})
    return (x, int(d), int(index)), {}


def _check_dim1(node):
    _not_batch(node, node.args[1])


def _basic_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) and not isinstance(p, bool) for p in parts)


def _check_getitem(node):
    index = node.args[1]
    if not _basic_index(index):
        raise unsupported(node, f"indexing with {index!r} (tensors, lists or masks can repeat or reorder samples)",
                          "Use basic slicing (x[:, 2:5], x[..., 0]) or torch.narrow / torch.select")
    parts = index if isinstance(index, tuple) else (index,)
    if Ellipsis in parts:
        ndim = len(shape(node.args[0]))
        used = sum(p is not None and p is not Ellipsis for p in parts)
        i = parts.index(Ellipsis)
        parts = parts[:i] + (slice(None),) * (ndim - used) + parts[i + 1:]
    first = next((p for p in parts if p is not None), slice(None))
    if parts and parts[0] is None:
        raise unsupported(node, "indexing with None first puts a new dimension before the batch",
                          "Index as x[:, None]")
    if first != slice(None):
        raise unsupported(node, f"index {index!r} slices the batch dimension", "Keep the batch whole: x[:, ...]")


selection(torch.narrow, name="narrow", check=_check_dim1,
          spellings=((torch.narrow, _narrow_adapter), ("narrow", _narrow_adapter)))
selection(torch.select, name="select", check=_check_dim1,
          spellings=((torch.select, _select_adapter), ("select", _select_adapter)))
selection(operator.getitem, name="getitem", check=_check_getitem, spellings=())


# --- copies: expand, repeat, stack ------------------------------------------------------------

def _expand_adapter(module, args, kwargs):
    x, *rest = args
    sizes = kwargs.get("size", rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
    return (x, tuple(sizes)), {}


def expand(x, sizes):
    """``x.expand(*sizes)`` (the canonical expand)."""
    return x.expand(*sizes)


def repeat(x, repeats):
    """``x.repeat(*repeats)`` (the canonical repeat)."""
    return x.repeat(*repeats)


def _check_expand(node):
    sizes = node.args[1]
    if len(sizes) != len(shape(node.args[0])):
        raise unsupported(node, f"expand to {len(sizes)} dims of a {len(shape(node.args[0]))}-dim value adds "
                          "dimensions before the batch", "Unsqueeze a feature dim first, then expand")
    if any(isinstance(s, torch.fx.Node) for s in sizes[1:]):
        raise unsupported(node, "expand to sizes computed at run time", "Expand to constant sizes (the batch may be -1 or x.size(0))")


def _check_repeat(node):
    reps = node.args[1]
    if any(isinstance(r, torch.fx.Node) for r in reps):
        raise unsupported(node, "repeat counts computed at run time", "Use constant repeat counts")
    if len(reps) >= len(shape(node.args[0])) and int(reps[len(reps) - len(shape(node.args[0]))]) != 1:
        raise unsupported(node, f"repeat{tuple(reps)} copies the batch dimension", "Repeat dims >= 1 only")
    if len(reps) > len(shape(node.args[0])):
        raise unsupported(node, f"repeat{tuple(reps)} adds leading dimensions before the batch", "Repeat dims >= 1 only")


selection(expand, name="expand", copies=True, check=_check_expand,
          spellings=(("expand", _expand_adapter), (torch.broadcast_to, _expand_adapter)))
selection(repeat, name="repeat", copies=True, check=_check_repeat, spellings=(("repeat", _expand_adapter),))


def stack_ball(tensors, dim):
    """radius_out = sqrt(sum_i r_i^2) over the perturbed parts (as cat: squared norms add)."""
    return cat_ball(tensors, dim)


def stack_box(center, radius, tensors, dim) -> Bound:
    """The stacked boxes (a constant part is its own box)."""
    return enclose(center, radius, torch.stack([lower_of(t) for t in tensors], dim),
                   torch.stack([upper_of(t) for t in tensors], dim))


def _check_stack(node):
    tensors, d = node.args
    if int(d) % (len(shape(node))) == 0:
        raise unsupported(node, "stacking along dim 0 puts the new dimension before the batch", "Stack along dim >= 1")


register(torch.stack, ball=stack_ball, box=stack_box, family="merge", name="stack", check=_check_stack,
         spellings=((torch.stack, tensors_dim_adapter),))


# --- padding --------------------------------------------------------------------------------

def pad(x, pads, mode="constant", value=0.0):
    """``F.pad`` with every argument positional (the canonical pad; ``value`` is read in constant
    mode only, as torch refuses one in the others)."""
    if mode == "constant":
        return F.pad(x, pads, mode, value)
    return F.pad(x, pads, mode)


def _pad_adapter(module, args, kwargs):
    if module is not None:
        (x,) = args
        mode = {"ZeroPad": "constant", "ConstantPad": "constant", "ReflectionPad": "reflect",
                "ReplicationPad": "replicate", "CircularPad": "circular"}[type(module).__name__[:-2]]
        return (x, tuple(module.padding), mode, float(getattr(module, "value", 0.0))), {}
    x, pads, mode, value = pick(args, kwargs, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
    return (x, tuple(int(p) for p in pads), mode, 0.0 if value is None else value), {}


def _check_pad(node):
    pads, mode = node.args[1], node.args[2]
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise unsupported(node, f"pad mode {mode!r}", "Use constant, reflect, replicate or circular")
    ndim = len(shape(node.args[0]))
    if len(pads) // 2 >= ndim:
        raise unsupported(node, f"pad {pads} pads the batch dimension", "Pad feature dims only")
    if perturbed(node.args[3]):
        raise unsupported(node, "the pad value depends on the input", "Pad with a constant")
    if any(p < 0 for p in pads):
        raise unsupported(node, f"negative padding {pads} (cropping)", "Crop with slicing, x[:, :, a:b]")


_PAD_MODULES = tuple(getattr(nn, f"{kind}Pad{d}d") for kind in ("Zero", "Constant", "Reflection", "Replication",
                                                                  "Circular") for d in (1, 2, 3)
                     if hasattr(nn, f"{kind}Pad{d}d"))
selection(pad, name="pad", copies=True, check=_check_pad,
          spellings=((F.pad, _pad_adapter),) + tuple((m, _pad_adapter) for m in _PAD_MODULES))


# --- resampling -----------------------------------------------------------------------------

def interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias):
    """``F.interpolate`` with every argument positional (the canonical resampling)."""
    return F.interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)


_SELECTING = ("nearest", "nearest-exact")
_AVERAGING = ("linear", "bilinear", "trilinear", "area")


def interpolate_ball(x: Bound, *args):
    """Nearest modes: sqrt(max copies) * radius (a selection). Linear modes and area: the Schur
    bound of the (nonnegative) resampling matrix times the radius, as for average pooling."""
    if x.radius is None:
        return None
    fn = lambda t: interpolate(t, *args)  # noqa: E731
    if args[2] in _SELECTING:
        return math.sqrt(max_copies(fn, x.center.shape[1:], ("interpolate", repr(args)))) * x.radius
    return schur_sigma_upper(fn, x.center.shape[1:], ("interpolate", repr(args))) * x.radius


def interpolate_box(center, radius, x: Bound, *args) -> Bound:
    """[f(lower), f(upper)] (a selection, or nonnegative weights), inside the output ball box."""
    return bound(center, radius, interpolate(x.lower, *args), interpolate(x.upper, *args))


def _interpolate_adapter(module, args, kwargs):
    if module is not None:
        (x,) = args
        return (x, module.size, module.scale_factor, module.mode, module.align_corners,
                getattr(module, "recompute_scale_factor", None), False), {}
    vals = pick(args, kwargs, ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                               "antialias"),
                {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
                 "recompute_scale_factor": None, "antialias": False})
    return tuple(vals), {}


def _check_interpolate(node):
    mode, antialias = node.args[3], node.args[6]
    if mode not in _SELECTING + _AVERAGING:
        raise unsupported(node, f"interpolate mode {mode!r} has negative weights (not a nonnegative average)",
                          "Use nearest, bilinear or area resampling")
    if antialias:
        raise unsupported(node, "antialiased resampling", "Use antialias=False")


register(interpolate, ball=interpolate_ball, box=interpolate_box, family="layout", name="interpolate",
         check=_batch_check(_check_interpolate),
         spellings=((F.interpolate, _interpolate_adapter), (nn.Upsample, _interpolate_adapter),
                    (F.upsample, _interpolate_adapter)))


# --- dtype casts ----------------------------------------------------------------------------

_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                  torch.bfloat16: 2.0**-8}


def cast_ball(x: Bound, dtype=None, device=None):
    """Widening (to the same or a more precise dtype, or ``dtype=None``: a device move): exact,
    radius unchanged. Narrowing rounds each coordinate and keeps its dtype (:func:`bcpc.ops.cast`):
    ``R(a) = a (1 + d) + e``, ``|d| <= u``,
    ``|e| <= tiny`` (underflow), so ``||R(a') - R(a)|| <= ||a' - a|| + u (||a'|| + ||a||) + 2
    sqrt(n) tiny <= r + u (2 ||c|| + r) + 2 sqrt(n) tiny``, rounded up into the new dtype.

    That model of rounding holds only inside the new dtype's finite range: a coordinate that can
    reach ``finfo(dst).max`` in magnitude may round to ``inf`` (float16 overflows above 65504),
    and no finite ball holds ``inf``. Such a sample gets an infinite radius, so nothing built
    on it is certified; its largest magnitude is bounded by the box where there is one, else by
    ``max |c| + r``."""
    if x.radius is None:
        return None
    src, dst = x.center.dtype, (x.center.dtype if dtype is None else dtype)
    if _UNIT_ROUNDOFF[dst] <= _UNIT_ROUNDOFF[src]:
        return x.radius  # the value is unchanged and keeps its dtype (bcpc.ops.cast)
    u, tiny = _UNIT_ROUNDOFF[dst], torch.finfo(dst).smallest_normal * _UNIT_ROUNDOFF[dst]
    rows = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731 (a (B,) value too)
    c = rows(x.center).norm(dim=1)
    n = x.center[0].numel()
    r = x.radius + u * (2 * c + x.radius) + 2 * math.sqrt(n) * tiny
    reach = rows(x.center).abs().amax(dim=1) + x.radius
    if x.lower is not None:
        reach = torch.minimum(reach, torch.maximum(rows(x.lower).abs(), rows(x.upper).abs()).amax(dim=1))
    overflow = ~(reach < torch.finfo(dst).max)  # NaN reach counts as overflow
    r = torch.where(overflow, torch.full_like(r, math.inf), r)
    return r * (1 + 4 * u)  # the rounded value keeps the source dtype (ops.cast)


def cast_box(center, radius, x: Bound, dtype=None, device=None) -> Bound:
    """Widening: [l, u]. Narrowing: [R(l), R(u)] (rounding to nearest is nondecreasing), each end
    moved out by one step of the new dtype. The step matters: the model rounds *its own*
    pre-cast value, which differs from this computation's by the rounding of the layers before
    (float32 against the float64 copy); next to a tie between two float16 values that tiny
    difference picks the other neighbour, a whole float16 step away (found by a new-user review:
    a certified input whose neighbour in the ball was misclassified). A step of the new dtype at
    ``v`` is at most ``2 u |v|`` (normal numbers) or ``2 tiny`` (subnormal ones), ``u`` its unit
    roundoff; the widening adds both, rounded up."""
    src = x.lower.dtype
    dst = src if dtype is None else dtype
    lo, hi = ops.cast(x.lower, dtype), ops.cast(x.upper, dtype)
    if _UNIT_ROUNDOFF[dst] > _UNIT_ROUNDOFF[src]:
        u = _UNIT_ROUNDOFF[dst]
        tiny = torch.finfo(dst).smallest_normal * u
        lo = lo - ((2 * u) * lo.abs() + 2 * tiny) * (1 + 4 * _UNIT_ROUNDOFF[src])
        hi = hi + ((2 * u) * hi.abs() + 2 * tiny) * (1 + 4 * _UNIT_ROUNDOFF[src])
    return bound(center, radius, lo, hi)


_METHOD_DTYPES = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


def _reads_device(a) -> bool:
    """``a`` is ``h.device`` read at run time (passes/dtypes.py leaves devices so)."""
    return (isinstance(a, fx.Node) and a.op == "call_function" and a.target is getattr
            and len(a.args) == 2 and a.args[1] == "device")


def _to_adapter(module, args, kwargs):
    x, *rest = args
    dtype, device = kwargs.get("dtype"), kwargs.get("device")
    for a in rest:
        if isinstance(a, torch.dtype):
            dtype = a
        elif _reads_device(a):
            device = a
        elif isinstance(a, (str, torch.device)) or a is None:
            continue  # a literal device: the value is unchanged, the module follows its input's device
        elif isinstance(a, bool):
            continue  # non_blocking / copy
        else:
            raise ValueError(f"x.to({a!r}): bcpc cannot tell what this argument is (a dtype, a device or a tensor "
                             "read at run time are followed); write the dtype itself (x.to(torch.float32))")
    if not _reads_device(device):
        device = None
    return ((x, dtype, device) if device is not None else (x, dtype)), {}


def _method_cast(name):
    def adapter(module, args, kwargs):
        (x,) = args[:1]
        return (x, _METHOD_DTYPES[name]), {}
    return adapter


def _type_adapter(module, args, kwargs):
    x, *rest = args
    dtype = kwargs.get("dtype", rest[0] if rest else None)
    if dtype is None:
        return None  # x.type() names the type (shape-only): left as it is
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"x.type({dtype!r}): give a torch.dtype")
    return (x, dtype), {}


def _check_cast(node):
    dtype = node.args[1]
    if dtype is not None and dtype not in _UNIT_ROUNDOFF:
        raise unsupported(node, f"a cast of a perturbed value to {dtype} (not a floating dtype: it rounds to a step)",
                          "Keep perturbed values floating")


register(ops.cast, ball=cast_ball, box=cast_box, family="layout", name="cast", check=_check_cast,
         spellings=((ops.cast, None), ("to", _to_adapter), ("type", _type_adapter))
         + tuple((m, _method_cast(m)) for m in _METHOD_DTYPES))


# --- detach ------------------------------------------------------------------------------------

def detach_ball(x: Bound):
    """radius_out = radius_in (the value is unchanged); no gradient flows back through it, as in the model."""
    return None if x.radius is None else x.radius.detach()


def detach_box(center, radius, x: Bound) -> Bound:
    """[lower, upper], detached like the value."""
    return enclose(center, radius, x.lower.detach(), x.upper.detach())


def _detach_adapter(module, args, kwargs):
    (x,) = pick(args, kwargs, ("input",), {})
    return (x,), {}


def _data_adapter(module, args, kwargs):
    """``h.data`` (fx records ``getattr(h, "data")``): ``h``'s values without autograd, as
    ``h.detach()`` (writes through it were refused or rewritten by functionalize before). Other
    attributes (``h.shape``, ``h.dtype``) are another op: left as they are."""
    if len(args) != 2 or args[1] != "data" or kwargs:
        return None
    return (args[0],), {}


register(torch.detach, ball=detach_ball, box=detach_box, family="layout", name="detach",
         spellings=((torch.detach, _detach_adapter), ("detach", _detach_adapter), (getattr, _data_adapter)))

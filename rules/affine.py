"""Affine ops: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, BatchNorm (eval and training mode), scaling by constants.

For ``y = A a + b`` with input enclosure (ball ``c, r``; box ``[l, u]``), DESIGN.md §2:

* ball:  centre ``A c + b``, radius ``sigma(A) * r``;
* box:   interval arithmetic ``A m + b ± |A| rad`` (``m, rad`` the box midpoint and half-width),
  intersected with ``A c + b ± ||A_i||_2 r`` per row (eq. 6: row i moves by at most its row norm
  times the ball radius, Cauchy–Schwarz), intersected with the output ball's box.

``sigma`` comes from the Lipschitz cache (bcpc.lipcache): an estimate in training, a guaranteed
bound on the certification path. For convolutions the row norms depend on the output position
(zero padding cuts the kernel at the borders): ``sqrt(conv(ones, W**2))``, and likewise
``sqrt(conv_transpose(ones, W**2))`` for a transposed convolution, whose ``sigma`` is that of
the adjoint convolution on the transposed output size (derivation in ``conv_transpose_ball``).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcpc import kernels, lipschitz, ops
from bcpc.domain import Bound, enclose, expand_radius, maximum, minimum
from bcpc.errors import UnsupportedOpError
from bcpc.lipcache import LipschitzConstant
from bcpc.registry import Attr, register
from bcpc.rules._util import check_same_shape_as_perturbed, is_bound, ntuple, perturbed, pick, unsupported


def _midrad(x: Bound):
    return (x.upper + x.lower) / 2, (x.upper - x.lower) / 2


def _intersect_rows(lower, upper, center, rownorm, radius):
    """Intersect with ``center ± rownorm * radius`` (eq. 6) when the input has a ball."""
    if radius is None:
        return lower, upper
    dev = rownorm * expand_radius(radius, center)
    return maximum(lower, center - dev), minimum(upper, center + dev)


def _scale_ball(x: Bound, sigma):
    return None if x.radius is None else sigma * x.radius


# --- Linear ---------------------------------------------------------------------------------

def linear_ball(x: Bound, weight: Tensor, bias=None, *, sigma: Tensor):
    """radius_out = sigma(W) * radius_in."""
    return _scale_ball(x, sigma)


def _affine_box(center, radius, x: Bound, apply, apply_abs, bias, rownorm, weight, per_channel=False,
                weight_stats=kernels.abs_square) -> Bound:
    """``A m + b ± |A| rad`` ∩ ``A c + b ± rownorm * r``, with ``m, rad`` the input box's midpoint
    and half-width. The box is passed through ``A`` as ``u + l`` and ``u - l`` and halved after
    (exact in binary floating point): bcpc.kernels fuses the elementwise arithmetic around the
    two products into one pass on the CPU. ``apply_abs(a, |W|)`` applies ``|A|``; ``rownorm(W**2)``
    gives the row norms of ``A``; ``weight_stats(W)`` computes ``(|W|, W**2)`` for them once;
    ``per_channel``: the bias is one value per channel (dim 1)."""
    if x.radius is None:
        mid, rad = _midrad(x)
        out_mid, out_rad = apply(mid, bias), apply_abs(rad, weight.abs())
        return enclose(center, radius, out_mid - out_rad, out_mid + out_rad)
    w_abs, w_sq = weight_stats(weight)
    if bias is not None and per_channel:
        bias = bias.reshape((-1,) + (1,) * (center.dim() - 2))
    s, d = kernels.sum_diff(x.lower, x.upper)
    lower, upper = kernels.affine_box(apply(s, None), apply_abs(d, w_abs), bias, center, rownorm(w_sq), x.radius)
    return enclose(center, radius, lower, upper)


def linear_box(center: Tensor, radius, x: Bound, weight: Tensor, bias=None) -> Bound:
    """IA box ∩ row-norm box (which lies inside the output ball box: ||W_i|| <= sigma(W))."""
    # |W| is not kept for backward (kernels.abs_linear recomputes it; for a 3136x512 layer that is
    # 6 MiB per step), and the row norms come straight from W
    return _affine_box(center, radius, x, lambda a, b: F.linear(a, weight, b),
                       lambda a, _: kernels.abs_linear(a, weight), bias, lambda _: torch.linalg.vector_norm(weight, dim=1),
                       weight, weight_stats=lambda w: (None, None))


def _linear_adapter(module, args, kwargs):
    (x,) = args
    return (x, Attr("weight"), Attr("bias") if module.bias is not None else None), {}


def _linear_fn_adapter(module, args, kwargs):
    x, w, b = pick(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    return (x, w, b), {}


def _linear_lipschitz(args, in_shape):
    return LipschitzConstant("linear", in_shape, {}), 1


def _check_weight_not_perturbed(node):
    for a in node.args[1:]:
        if perturbed(a):
            raise unsupported(node, f"the weight/bias argument '{a.name}' depends on the input",
                              "Only the first argument of an affine op may be perturbed")


register(
    F.linear, ball=linear_ball, box=linear_box, family="affine", name="linear",
    spellings=((nn.Linear, _linear_adapter), (F.linear, _linear_fn_adapter)), lipschitz=_linear_lipschitz, check=_check_weight_not_perturbed,
)


# --- Convolutions ---------------------------------------------------------------------------

def _conv(nd: int):
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]


def conv_ball(x: Bound, weight, bias, stride, padding, dilation, groups, *, sigma):
    """radius_out = sigma(conv) * radius_in."""
    return _scale_ball(x, sigma)


def conv_box(center, radius, x: Bound, weight, bias, stride, padding, dilation, groups) -> Bound:
    """IA box ∩ per-output-position row-norm box (inside the output ball box)."""
    conv = _conv(weight.dim() - 2)

    def rownorm(w_sq):
        ones = torch.ones((1,) + tuple(x.center.shape[1:]), dtype=weight.dtype, device=weight.device)
        # clamp at the smallest normal number, not 0: a channel whose weights have decayed until their
        # squares underflow (seen at the end of long runs) gives sum 0, and sqrt's gradient there is
        # inf (times clamp's 0: NaN in every weight). Raising a row norm only widens the box: sound.
        sums = conv(ones, w_sq, None, stride, padding, dilation, groups)
        return sums.clamp_min(torch.finfo(sums.dtype).tiny).sqrt()[0]

    return _affine_box(center, radius, x, lambda a, b: conv(a, weight, b, stride, padding, dilation, groups),
                       lambda a, w_abs: conv(a, w_abs, None, stride, padding, dilation, groups), bias, rownorm,
                       weight, per_channel=True)


def _conv_params(nd, stride, padding, dilation, kernel):
    stride, dilation = ntuple(stride, nd), ntuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * nd
        elif padding == "same":
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                if total % 2:
                    raise UnsupportedOpError(
                        "padding='same' with an even effective kernel pads asymmetrically; "
                        "use numeric padding or an odd kernel")
                pads.append(total // 2)
            padding = tuple(pads)
        else:
            raise UnsupportedOpError(f"unknown padding {padding!r}")
    return stride, ntuple(padding, nd), dilation


def _conv_module_adapter(nd):
    def adapt(module, args, kwargs):
        if module.padding_mode != "zeros":
            raise UnsupportedOpError(
                f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported; "
                "only zero padding has a rule (use padding_mode='zeros')")
        (x,) = args
        stride, padding, dilation = _conv_params(nd, module.stride, module.padding, module.dilation, module.kernel_size)
        b = Attr("bias") if module.bias is not None else None
        return (x, Attr("weight"), b, stride, padding, dilation, int(module.groups)), {}
    return adapt


def _conv_fn_adapter(nd):
    def adapt(module, args, kwargs):
        x, w, b, s, p, d, g = pick(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                                   {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        if isinstance(p, str):
            raise UnsupportedOpError(
                f"functional conv{nd}d with padding={p!r}: pass numeric padding (or use nn.Conv{nd}d, "
                "whose kernel size is known at compile time)")
        s, p, d = _conv_params(nd, s, p, d, None)
        return (x, w, b, s, p, d, int(g)), {}
    return adapt


def _conv_lipschitz(nd):
    def make(args, in_shape):
        _, _, _, stride, padding, dilation, groups = args
        mod = LipschitzConstant(f"conv{nd}d", in_shape,
                                dict(stride=stride, padding=padding, dilation=dilation, groups=groups))
        return mod, 1
    return make


for _nd, _target, _module in ((1, F.conv1d, nn.Conv1d), (2, F.conv2d, nn.Conv2d), (3, F.conv3d, nn.Conv3d)):
    register(
        _target, ball=conv_ball, box=conv_box, family="affine", name=f"conv{_nd}d",
        spellings=((_module, _conv_module_adapter(_nd)), (_target, _conv_fn_adapter(_nd))),
        lipschitz=_conv_lipschitz(_nd), check=_check_weight_not_perturbed,
    )


# --- Transposed convolutions ------------------------------------------------------------------

def _conv_transpose(nd: int):
    return {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]


def conv_transpose_ball(x: Bound, weight, bias, stride, padding, output_padding, groups, dilation, *, sigma):
    """radius_out = sigma(T) * radius_in, T the transposed conv on the input's spatial size.

    The transposed conv is the adjoint of ``conv_nd(., weight, stride, padding, dilation, groups)``
    on inputs of the transposed conv's *output* size ``N = (n - 1) s - 2 p + dl (k - 1) + op + 1``
    (the weight ``(Cin, Cout / groups, *k)`` is that conv's ``(out, in / groups, *k)``): the conv's
    output ``j`` reads position ``j s - p + t dl`` through tap ``t`` exactly where the transposed
    conv writes input ``j`` through tap ``t``, the ``op`` extra positions included (they are the
    far border the padding would otherwise crop). With ``op < s`` the conv has exactly ``n``
    outputs and ``T = C^T``, so ``sigma(T) = sigma(C)``; with ``s <= op < dl`` it has more and
    ``T^T`` is a row selection of ``C``, so ``sigma(T) <= sigma(C)``. ``sigma`` comes from
    bcpc.lipschitz.conv_transpose_sigma_upper on the certification path (a guaranteed bound) and
    from power iteration on ``T`` in training (an estimate)."""
    return _scale_ball(x, sigma)


def conv_transpose_box(center, radius, x: Bound, weight, bias, stride, padding, output_padding, groups,
                       dilation) -> Bound:
    """IA box ``T m + b ± |T| rad`` ∩ per-output-position row-norm box ``T c + b ± ||T_i||_2 r``
    (inside the output ball box).

    Every entry of ``T`` is one weight or zero (for a fixed input position, distinct taps land on
    distinct outputs), so ``|T|`` is the transposed conv with ``|W|`` and the squared row norms are
    the transposed conv of ones with ``W**2``; output positions no tap reaches get row norm 0
    (raised to the smallest normal number, which only widens the box) and their IA box is the bias."""
    conv_t = _conv_transpose(weight.dim() - 2)

    def apply(a, w, b):
        return conv_t(a, w, b, stride, padding, output_padding, groups, dilation)

    def rownorm(w_sq):
        ones = torch.ones((1,) + tuple(x.center.shape[1:]), dtype=weight.dtype, device=weight.device)
        sums = apply(ones, w_sq, None)  # clamped as in conv_box: sqrt's gradient at 0 is inf
        return sums.clamp_min(torch.finfo(sums.dtype).tiny).sqrt()[0]

    return _affine_box(center, radius, x, lambda a, b: apply(a, weight, b), lambda a, w_abs: apply(a, w_abs, None),
                       bias, rownorm, weight, per_channel=True)


def _conv_transpose_params(nd, stride, padding, output_padding, dilation, what):
    if any(isinstance(v, str) for v in (padding, output_padding)):
        raise UnsupportedOpError(f"{what} with padding={padding!r}: transposed convolutions take numeric padding only")
    return ntuple(stride, nd), ntuple(padding, nd), ntuple(output_padding, nd), ntuple(dilation, nd)


def _conv_transpose_module_adapter(nd):
    def adapt(module, args, kwargs):
        name = type(module).__name__
        if module.padding_mode != "zeros":
            raise UnsupportedOpError(
                f"{name} with padding_mode={module.padding_mode!r} is not supported; "
                "only zero padding has a rule (use padding_mode='zeros')")
        x, output_size = pick(args, kwargs, ("input", "output_size"), {"output_size": None})
        if output_size is not None:
            raise UnsupportedOpError(
                f"{name} called with output_size={output_size!r}: the output size must be fixed by the "
                "module; construct it with the matching output_padding and call it without output_size")
        s, p, op, d = _conv_transpose_params(nd, module.stride, module.padding, module.output_padding,
                                             module.dilation, name)
        b = Attr("bias") if module.bias is not None else None
        return (x, Attr("weight"), b, s, p, op, int(module.groups), d), {}
    return adapt


def _conv_transpose_fn_adapter(nd):
    def adapt(module, args, kwargs):
        x, w, b, s, p, op, g, d = pick(
            args, kwargs, ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
            {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1})
        s, p, op, d = _conv_transpose_params(nd, s, p, op, d, f"functional conv_transpose{nd}d")
        return (x, w, b, s, p, op, int(g), d), {}
    return adapt


def _conv_transpose_lipschitz(nd):
    def make(args, in_shape):
        _, _, _, stride, padding, output_padding, groups, dilation = args
        mod = LipschitzConstant(f"conv_transpose{nd}d", in_shape,
                                dict(stride=stride, padding=padding, output_padding=output_padding,
                                     dilation=dilation, groups=groups))
        return mod, 1
    return make


for _nd, _target, _module in ((1, F.conv_transpose1d, nn.ConvTranspose1d), (2, F.conv_transpose2d, nn.ConvTranspose2d),
                              (3, F.conv_transpose3d, nn.ConvTranspose3d)):
    register(
        _target, ball=conv_transpose_ball, box=conv_transpose_box, family="affine", name=f"conv_transpose{_nd}d",
        spellings=((_module, _conv_transpose_module_adapter(_nd)), (_target, _conv_transpose_fn_adapter(_nd))),
        lipschitz=_conv_transpose_lipschitz(_nd), check=_check_weight_not_perturbed,
    )


# --- BatchNorm ------------------------------------------------------------------------------

def batch_norm_ball(x: Bound, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps):
    """radius_out = max_c |scale_c| * radius_in (a diagonal map's norm is its largest entry)."""
    if x.radius is None:
        return None
    scale, _ = ops.batch_norm_scale_shift(x.center, weight, bias, running_mean, running_var, training, eps)
    return scale.abs().max() * (1 + lipschitz.SAFETY) * x.radius


def batch_norm_box(center, radius, x: Bound, weight, bias, running_mean, running_var, num_batches_tracked,
                   training, momentum, eps) -> Bound:
    """Per-channel scale and shift applied to the box (``s m + t ± |s| rad``; the endpoints swap where
    the scale is negative), ∩ ``centre ± |scale| r`` per coordinate (inside the output ball box)."""
    scale, shift = ops.batch_norm_scale_shift(x.center, weight, bias, running_mean, running_var, training, eps)
    view = (1, -1) + (1,) * (x.center.dim() - 2)
    s, t = scale.reshape(view), shift.reshape(view)
    if x.radius is not None:  # the diagonal map through the fused affine path (as linear_box)
        sa = s.abs()
        total, diff = kernels.sum_diff(x.lower, x.upper)
        lower, upper = kernels.affine_box(s * total, sa * diff, t[0], center, sa[0], x.radius)
        return enclose(center, radius, lower, upper)
    a, b = s * x.lower + t, s * x.upper + t
    lower, upper = torch.minimum(a, b), torch.maximum(a, b)
    lower, upper = _intersect_rows(lower, upper, center, s.abs(), x.radius)
    return enclose(center, radius, lower, upper)


def conv_batch_norm_box(center, radius, x: Bound, weight, bias, stride, padding, dilation, groups, conv_center,
                        bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, training, momentum,
                        eps) -> Bound:
    """The box of ``batch_norm(conv(a))`` in one step, for a convolution nothing else reads.

    BatchNorm is the per-channel map ``s z + t`` (its statistics are those of the clean batch in
    training mode, of the running averages in eval mode), so the pair is the convolution with
    weight ``s_c W_c`` and bias ``s_c b_c + t_c``: :func:`conv_box` of that map gives the same box
    as a box after the convolution and another after the BatchNorm (interval arithmetic through a
    diagonal map is exact, and the folded row norms are the convolution's scaled by ``|s_c|``,
    below ``|s_c|`` times the convolution's output radius that the BatchNorm box intersects with),
    without the convolution's box ever being formed: its two activation-sized ends, and the
    BatchNorm's copies of them for backward, are not kept. ``conv_center`` is the convolution's
    clean output (the batch statistics); ``center`` and ``radius`` are the BatchNorm's."""
    scale, shift = ops.batch_norm_scale_shift(conv_center, bn_weight, bn_bias, running_mean, running_var,
                                              training, eps)
    folded_w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    folded_b = shift if bias is None else bias * scale + shift
    return conv_box(center, radius, x, folded_w, folded_b, stride, padding, dilation, groups)


def folded_conv_bound(center, radius, x: Bound, weight, bias, stride, padding, dilation, groups) -> Bound:
    """The Bound of a convolution read only by a BatchNorm: the ball alone, since the pair's box is
    formed at the BatchNorm (:func:`conv_batch_norm_box`). Its arguments are those of
    :func:`conv_box`, which ``CertifiedModule.node_bounds`` calls in its place to show the
    convolution's own box (``folded_conv_bound.bcpc_full = conv_box``)."""
    return Bound(center, radius, None, None)


folded_conv_bound.bcpc_full = conv_box


def _bn_module_adapter(module, args, kwargs):
    (x,) = args
    tracked = module.running_mean is not None
    return (
        x,
        Attr("weight") if module.affine else None,
        Attr("bias") if module.affine else None,
        Attr("running_mean") if tracked else None,
        Attr("running_var") if tracked else None,
        Attr("num_batches_tracked") if tracked else None,
        Attr("training"),
        module.momentum,
        float(module.eps),
    ), {}


def _bn_fn_adapter(module, args, kwargs):
    x, rm, rv, w, b, training, momentum, eps = pick(
        args, kwargs, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    return (x, w, b, rm, rv, None, training, momentum, eps), {}


register(
    ops.batch_norm, ball=batch_norm_ball, box=batch_norm_box, family="affine", name="batch_norm",
    spellings=((nn.BatchNorm1d, _bn_module_adapter), (nn.BatchNorm2d, _bn_module_adapter),
               (nn.BatchNorm3d, _bn_module_adapter), (F.batch_norm, _bn_fn_adapter)),
    check=_check_weight_not_perturbed,
)


# --- Scaling by constants: x * a, a * x, x / a, -x ---------------------------------------------

def _split_const(a, b):
    return (a, b) if is_bound(a) else (b, a)


def _factor_abs_max(k) -> Tensor | float:
    if isinstance(k, Tensor):
        return k.abs().max()
    return abs(float(k))


def mul_ball(a, b):
    """radius_out = max|k| * radius_in for x * k with k constant."""
    x, k = _split_const(a, b)
    return None if x.radius is None else _factor_abs_max(k) * x.radius


def mul_box(center, radius, a, b) -> Bound:
    """Endpoints times k (swapped where k < 0) ∩ ``centre ± |k| r`` (inside the output ball box)."""
    x, k = _split_const(a, b)
    p, q = x.lower * k, x.upper * k
    lower, upper = torch.minimum(p, q), torch.maximum(p, q)
    kabs = k.abs() if isinstance(k, Tensor) else abs(float(k))
    lower, upper = _intersect_rows(lower, upper, center, kabs, x.radius)
    return enclose(center, radius, lower, upper)


def div_ball(a, b):
    """x / k == x * (1/k)."""
    return mul_ball(a, 1.0 / b)


def div_box(center, radius, a, b) -> Bound:
    return mul_box(center, radius, a, 1.0 / b)


def _check_one_perturbed(node):
    if all(perturbed(a) for a in node.args[:2]):
        raise unsupported(node, "the product/quotient of two perturbed values is not affine and has no rule",
                          "Only multiplication or division by a constant is supported")
    check_same_shape_as_perturbed(node)


def _check_div(node):
    _check_one_perturbed(node)
    if perturbed(node.args[1]):
        raise unsupported(node, "dividing by a perturbed value has no rule", "Only x / constant is supported")


def _binary_adapter(module, args, kwargs):
    a, b = pick(args, kwargs, ("input", "other"), {})
    return (a, b), {}


register(operator.mul, ball=mul_ball, box=mul_box, family="affine", name="mul",
         spellings=((torch.mul, _binary_adapter), ("mul", _binary_adapter)), check=_check_one_perturbed)
register(operator.truediv, ball=div_ball, box=div_box, family="affine", name="div",
         spellings=((torch.div, _binary_adapter), ("div", _binary_adapter)), check=_check_div)

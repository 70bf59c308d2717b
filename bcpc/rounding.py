"""The model's own rounding as part of the perturbation set.

Certification runs on a float64 copy of the model; a float32 model computes every node in float32,
and its values differ from the float64 copy's by the rounding of each operation. Each perturbed
node's Bound is widened by a bound ``delta`` on the rounding of the model's operation (elementwise:
the box by ``delta`` on each side, the ball by ``||delta||_2``), computed from the node's input
bounds, which are widened in turn. By induction every value the float32 model computes at any
point of the perturbation set lies in the widened Bound, and the margins of the last affine layer
lose its rounding on both logits of each pair.

The bounds are the standard model of floating-point arithmetic, ``fl(a op b) = (a op b)(1 + d)``
with ``|d| <= u`` (``u = 2^-24`` for float32), for operations computed as sums of products:

- a dot product of ``n`` terms plus a bias, in any order and blocking, with or without fused
  multiply-adds: ``|error| <= gamma(n + 1) (|W| |x| + |b|)``, ``gamma(k) = k u / (1 - k u)``
  (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1). This assumes convolutions are
  computed as such sums (direct or im2col convolution, as oneDNN and cuDNN do by default), not by
  Winograd or FFT transforms, whose errors are not bounded this way;
- one rounding per add, subtract, multiply or divide by a constant (``3 u |result|``: the constant's
  own rounding to float32 and a reciprocal included);
- averages, sums and linear resampling: as dot products with nonnegative weights;
- BatchNorm in eval mode: a per-channel scale and shift computed from the running statistics
  (``gamma(8)`` on ``|s| (|x| + |mean|) + |bias|``);
- elementary functions (tanh, sigmoid, GELU, softplus, ...): at most 16 units in the last place of
  ``|input| + |output| + 1``, an assumption on torch's vectorised implementations (documented at
  1 to 3.5 ulp), not a proof;
- exact operations (ReLU, max and min, MaxMin, clamp, abs, negation, max pooling, reshapes,
  concatenation, selection, padding): no rounding.

A float64 model is its own certification copy: its rounding is the copy's, which the safety
threshold on the final margins covers, so the unit is 0 and nothing is widened. Values computed in
forward without the input (a weight normalised there, say) are computed in float64 by the copy and
in float32 by the model; that difference is not bounded here, and such models are refused under
``model_rounding`` (``_rounds_in_forward`` in passes/lower.py; docs/soundness.md).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bcpc.domain import Bound, expand_radius
from bcpc.rules._util import is_bound

#: rule name -> how the model's operation rounds (every registered rule has one; tests check it)
EXACT = frozenset({
    "relu", "clamp", "abs", "neg", "cat", "stack", "reshape", "flatten", "unflatten", "permute", "transpose",
    "movedim", "unsqueeze", "squeeze", "flip", "roll", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "narrow", "select", "getitem", "expand", "repeat", "pad", "cast", "detach", "group_sort", "maximum",
    "minimum", "amax", "amin", "where", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d"})
ONE = frozenset({"add", "sub", "mul", "div", "leaky_relu", "prelu"})
#: the ONE ops whose constants are factors (a product, a quotient, a slope), not terms
FACTORS = frozenset({"mul", "div", "leaky_relu", "prelu"})
AFFINE = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d"})
AVERAGE = frozenset({"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                     "adaptive_avg_pool3d", "interpolate"})
REDUCE = frozenset({"sum", "mean"})
LIBRARY = frozenset({"tanh", "sigmoid", "elu", "hardsigmoid", "softsign", "logsigmoid", "tanhshrink", "celu",
                     "selu", "softplus", "gelu", "silu", "mish", "hardswish"})
BATCH_NORM = frozenset({"batch_norm"})
KINDS = (EXACT, ONE, AFFINE, AVERAGE, REDUCE, LIBRARY, BATCH_NORM)

#: rule name -> its canonical function, for the rules that apply it to magnitudes
_TARGETS: dict = {}

#: ulps of |input| + |output| + 1 allowed to an elementary function (an assumption, above)
LIBRARY_ULPS = 16
#: how far below float32's largest value an elementary function's float32 kernel may overflow inside
#: its own arithmetic, as a factor of its input's and output's magnitude (hardswish: 6); an assumption,
#: as LIBRARY_ULPS is, from the kernels measured (docs/soundness.md)
LIBRARY_OVERFLOW = 16.0


def unit(dtype: torch.dtype) -> float:
    """The unit roundoff to bound for a model computing in ``dtype``: 0 for float64 (the
    certification copy's own dtype), ``2^-24`` for float32."""
    if dtype == torch.float64:
        return 0.0
    if dtype == torch.float32:
        return 2.0 ** -24
    raise ValueError(f"no rounding bound for a model in {dtype} (float16 and bfloat16 models are not certified)")


#: the largest finite float32: a value the bounds allow beyond it may be inf (or NaN) in the model
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def reduced_precision(device_type: str) -> str:
    """What torch's settings let float32 products on ``device_type`` run in below IEEE float32
    (TF32 or bfloat16), as words for an error message; "" where they run in float32."""
    found = []
    if torch.get_float32_matmul_precision() != "highest":
        found.append(f"matrix products at precision {torch.get_float32_matmul_precision()!r}")
    if device_type == "cuda":
        paths = ("backends.fp32_precision", "backends.cuda.matmul.fp32_precision", "backends.cudnn.fp32_precision",
                 "backends.cudnn.conv.fp32_precision")
        for flag in ("backends.cudnn.allow_tf32", "backends.cuda.matmul.allow_tf32"):
            try:
                if _attribute(flag):
                    found.append(f"in TF32 (torch.{flag})")
            except RuntimeError:  # torch refuses the old flag once the new API is used
                pass
    else:
        paths = ("backends.fp32_precision", "backends.mkldnn.fp32_precision", "backends.mkldnn.matmul.fp32_precision",
                 "backends.mkldnn.conv.fp32_precision")
    for path in paths:
        try:
            value = _attribute(path)
        except (AttributeError, RuntimeError):
            continue
        if isinstance(value, str) and value not in ("none", "ieee"):
            found.append(f"in {value} (torch.{path})")
    if device_type == "cpu":
        # oneDNN reads its math mode from the environment: BF16, F16, TF32 or ANY let it compute float32
        # convolutions with bfloat16 operands on CPUs that have them (a review: 1e4 times the bound)
        for var in ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE"):
            mode = os.environ.get(var, "").strip()
            if mode and mode.lower() != "strict":
                found.append(f"in {mode} ({var}={mode} in the environment)")
        # flush-to-zero (torch.set_flush_denormal(True)): results below 2^-126 become 0, not the gradual
        # underflow the bound's 2^-150 per operation assumes; torch has no getter, so it is measured
        tiny = torch.tensor(2.0 ** -140, dtype=torch.float32)
        if float(tiny * torch.tensor(1.0, dtype=torch.float32)) == 0.0:
            found.append("with subnormal results flushed to zero (torch.set_flush_denormal(True))")
    return ", ".join(dict.fromkeys(found))


def _attribute(path: str):
    obj = torch
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def eta(u: float) -> float:
    """The absolute rounding error of an underflowing result: half the smallest subnormal
    (float32: ``2^-150``; the relative model ``(1 + d)`` does not hold below the normal range)."""
    return u * 2.0 ** -126


def gamma(k: int, u: float) -> float:
    """``k u / (1 - k u)``: the relative error bound of a sum of ``k`` products (Higham 3.1)."""
    ku = k * u
    if ku >= 0.5:
        return math.inf
    return ku / (1.0 - ku)


def magnitude(b: Bound) -> Tensor:
    """Elementwise upper bound on ``|v|`` over the Bound (its box, else centre ± radius)."""
    if b.lower is not None:
        return torch.maximum(b.lower.abs(), b.upper.abs())
    return b.center.abs() + expand_radius(b.radius, b.center)


def widen(b: Bound, delta: Tensor) -> Bound:
    """The Bound enlarged by ``delta`` (elementwise, broadcastable to the centre) on every coordinate."""
    delta = delta.expand_as(b.center)
    radius = None if b.radius is None else b.radius + delta.flatten(1).norm(dim=1)
    lower = None if b.lower is None else b.lower - delta
    upper = None if b.upper is None else b.upper + delta
    return Bound(b.center, radius, lower, upper)


def _affine_delta(u: float, name: str, x: Bound, weight: Tensor, bias: Optional[Tensor] = None, *args,
                  relative: float = 0.0) -> Tensor:
    """The rounding of the model's dot products, Higham's ``gamma(n + 1) (|W| |x| + |b|)``, and the
    difference ``relative (|W| |x| + |b|)`` of a weight or bias the model holds rounded to float32
    (a tensor made in forward in the input's dtype; ``relative`` is the largest elementwise relative
    difference, which subnormal entries make far more than u): counted on the sum of the terms'
    magnitudes, not on the output's, which cancellation can make 0 while each term is not."""
    m = magnitude(x)
    w, b = weight.abs(), (None if bias is None else bias.abs())
    if name == "linear":
        n = weight.shape[1] + 1
        total = F.linear(m, w, b)
        return _overflow(total, (gamma(n, u) * (1 + relative) + relative) * total + (n + 1) * eta(u))
    nd = weight.dim() - 2
    kernel = math.prod(weight.shape[2:])
    if name.startswith("conv_transpose"):
        stride, padding, output_padding, groups, dilation = args
        terms = (weight.shape[0] // groups) * kernel + 1
        total = getattr(F, f"conv_transpose{nd}d")(m, w, b, stride, padding, output_padding, groups, dilation)
        return _overflow(total, (gamma(terms, u) * (1 + relative) + relative) * total + (terms + 1) * eta(u))
    stride, padding, dilation, groups = args
    terms = weight.shape[1] * kernel + 1
    total = getattr(F, f"conv{nd}d")(m, w, b, stride, padding, dilation, groups)
    return _overflow(total, (gamma(terms, u) * (1 + relative) + relative) * total + (terms + 1) * eta(u))


def _bn_scales(running_var: Tensor, eps: float, weight) -> tuple:
    """BatchNorm's per-channel scale ``w / sqrt(var + eps)`` as the copy computes it (float64) and as
    the float32 model does (``fl(eps)``, float32 rsqrt), both in the copy's dtype."""
    exact = torch.rsqrt(running_var + eps)
    own = torch.rsqrt(running_var.float() + torch.tensor(eps, dtype=torch.float32)).to(exact.dtype)
    if weight is not None:
        exact, own = exact * weight, own * weight
    return exact, own


def _batch_norm_delta(u: float, x: Bound, weight, bias, running_mean, running_var, eps) -> Tensor:
    """The model's BatchNorm (eval) against the copy's: its float32 scale ``w / sqrt(var + fl(eps))``
    computed as the model computes it, whose difference from the copy's exact one is counted in
    full (a subnormal or cancelling ``var + eps`` makes it far more than a few units of roundoff),
    plus the rounding of applying it."""
    exact, own = _bn_scales(running_var, eps, weight)
    view = (1, -1) + (1,) * (x.center.dim() - 2)
    own_abs = own.abs() * (1 + gamma(4, u))  # the float32 rsqrt and product themselves
    spread = ((own - exact).abs() + gamma(4, u) * own.abs()).reshape(view)
    centred = magnitude(x) + running_mean.abs().reshape(view)
    total = own_abs.reshape(view) * centred
    if bias is not None:
        total = total + bias.abs().reshape(view)
    delta = spread * centred + gamma(8, u) * total + 8 * eta(u)
    return _overflow(torch.maximum(total, centred), delta)  # x - mean, and its product by the scale


def _overflow(magnitude_bound: Tensor, delta: Tensor) -> Tensor:
    """``delta``, infinite where the values (or a dot product's sum of terms) may pass float32's
    largest finite value: there the model may compute inf or NaN, and nothing is certified."""
    return torch.where(magnitude_bound + delta >= FLOAT32_MAX, torch.full_like(delta, math.inf), delta)


def _window(name: str, x: Bound, out: Bound, rest) -> int:
    """The most terms one output of an averaging op sums: the kernel of a pool, the largest
    adaptive window, at most 8 for linear resampling. Counted on the last ``nd`` dimensions, which
    torch pools whatever the batch and channel dimensions (an unbatched-looking ``(B, L)`` value
    is pooled over L)."""
    nd = int(name[-2])
    spatial = x.center.shape[-nd:]
    if name.startswith("adaptive"):
        return math.prod(-(-s // max(1, o)) + 1 for s, o in zip(spatial, out.center.shape[-nd:]))
    kernel = rest[0]
    kernel = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,) * nd
    return math.prod(int(k) for k in kernel)


def _float32_difference(a) -> Optional[tuple]:
    """``(value, own, err)`` of a constant argument, all float64 tensors: its value in the copy, the
    float32 value the model computes with, and an elementwise bound on their difference; None for
    what the model does not round (Bounds, bools, sizes and ints float32 holds, non-numbers). An
    integer tensor is promoted to float32 by the model's arithmetic (16777217 becomes 16777216), and
    an integer above 2^53 is itself rounded in float64, by at most 2^-53 relative."""
    if isinstance(a, bool) or not isinstance(a, (int, float, Tensor)) or is_bound(a):
        return None
    if isinstance(a, int) and abs(a) <= 2 ** 24:  # sizes, dims, and every int float32 holds
        return None
    t = torch.as_tensor(float(a), dtype=torch.float64) if isinstance(a, (int, float)) else a
    if t.dtype == torch.bool or t.is_complex() or t.numel() == 0:
        return None
    integer = isinstance(a, int) or not t.is_floating_point()
    t = t.detach().to(torch.float64)
    own = t.float().to(torch.float64)
    err = (t - own).abs()
    if integer:
        err = err + torch.where(t.abs() >= 2.0 ** 53, t.abs() * 2.0 ** -52, torch.zeros_like(t))
    return t, own, err


def _constants(args, kwargs) -> tuple[float, float]:
    """``(absolute, relative)``: the largest difference between a constant argument and the float32
    value the model computes with (Python floats and ints above 2^24, and tensors that are no Bound:
    a float64 tensor attribute, ``full_like(x, 0.1)``, an integer buffer), and the largest such
    difference relative to the constant (:func:`_float32_difference`). The model rounds them to
    float32 (a subnormal one by far more than ``u`` relative), the copy does not; an added constant
    moves the result by the first, a factor by the second times the result. Parameters, float32
    already, differ by nothing."""
    flat = list(args) + list(kwargs.values())
    flat += [v for a in list(args) if isinstance(a, (tuple, list)) and not is_bound(a) for v in a]
    absolute = relative = 0.0
    for a in flat:
        found = _float32_difference(a)
        if found is None or not bool((found[2] > 0).any()):
            continue
        t, _, err = found
        absolute = max(absolute, float(err.max()))
        nonzero = t != 0
        relative = max(relative, float((err[nonzero] / t[nonzero].abs()).max()))
    return absolute, relative


def _divisor_relative(d) -> float:
    """How far ``x / d`` in float32 (``x / fl32(d)``) is from ``x / d``, relative to it: the largest
    ``|d - fl32(d)| / |fl32(d)|``, infinite where a nonzero ``d`` is 0 in float32."""
    found = _float32_difference(d)
    if found is None:
        return 0.0
    t, own, err = found
    # a kernel may multiply by the float32 reciprocal (CUDA does for a Python scalar): it overflows
    # below 2^-128 and is subnormal, rounded by more than u, above 2^126
    odd = (own != 0) & ((own.abs() < 2.0 ** -126) | (own.abs() > 2.0 ** 126))
    if bool(odd.any()) or bool(((own == 0) & (t != 0)).any()):
        return math.inf
    moved = err > 0
    return float((err[moved] / own[moved].abs()).max()) if bool(moved.any()) else 0.0


def node(out: Bound, u: float, name: str, *args, **kwargs) -> Bound:
    """``out``, the Bound of a node of rule ``name`` computed from the (widened) input Bounds in
    ``args``, widened by the rounding of the model's own operation (unit roundoff ``u``)."""
    if not u or (out.radius is None and out.lower is None):  # nothing to widen (a folded conv in ibp)
        return out
    if not _TARGETS:
        from bcpc import registry
        _TARGETS.update({r.name: r.target for r in registry.rules()})
    absolute, relative = _constants(args, kwargs)  # the model's float32 copies of constants
    const = absolute + 2 * relative * magnitude(out) if (absolute or relative) else 0.0
    if name in EXACT:
        return widen(out, const + torch.zeros_like(out.center[:1])) if (absolute or relative) else out
    if name in AFFINE:
        # a rounded weight's difference is counted on |W| |x| (inside), not on |output|
        return widen(out, _overflow(magnitude(out), _affine_delta(u, name, *args, relative=relative) + absolute))
    if name in BATCH_NORM:
        x, weight, bias, running_mean, running_var, _, _, _, eps = args
        return widen(out, _batch_norm_delta(u, x, weight, bias, running_mean, running_var, eps) + const)
    if name in ONE:
        if name in FACTORS and (absolute or relative):
            # a constant factor's difference moves the product by its relative difference times the
            # result (x * 1e38: 1e30 absolute, 2^-25 relative); only added constants move it absolutely.
            # A divisor by its difference relative to its float32 value: 1e-46 is 0 in float32
            rel = _divisor_relative(args[1]) if name == "div" else relative
            const = 2 * rel * magnitude(out) if rel < math.inf else torch.full_like(out.center, math.inf)
        return widen(out, _overflow(magnitude(out), 3 * u * magnitude(out) + 3 * eta(u) + const))
    if name == "interpolate":
        # float32 computes the source coordinates in float32 and may take other neighbours (or a
        # nonzero weight on an element float64 gives none): bound by the channel's largest magnitude
        x = args[0]
        per = magnitude(x).flatten(2).amax(2)
        return widen(out, 2 * (1 + 4 * u) * per.reshape(per.shape + (1,) * (out.center.dim() - 2)))
    if name in AVERAGE:
        # nonnegative weights: op(|x|) bounds the sum of |weight * term| over a window
        x, *rest = args
        terms = _window(name, x, out, rest) + 2
        total = _TARGETS[name](magnitude(x), *rest, **kwargs)
        return widen(out, _overflow(total, gamma(terms, u) * total + terms * eta(u) + const))
    if name in REDUCE:
        x, dims, keepdim = args
        terms = max(1, x.center[0].numel() // max(1, out.center[0].numel())) + 1
        reduce = torch.sum if name == "sum" else torch.mean
        total = reduce(magnitude(x), dims, keepdim)
        return widen(out, _overflow(total, gamma(terms, u) * total + terms * eta(u) + const))
    if name in LIBRARY:
        # per sample: the largest |input| of the sample, plus |output| elementwise, plus 1
        inputs = [a for a in args if is_bound(a)]
        per = torch.stack([magnitude(a).flatten(1).amax(1) for a in inputs]).amax(0)
        scale = magnitude(out) + expand_radius(per, out.center)
        delta = LIBRARY_ULPS * 2 * u * (scale + 1.0) + const
        if name == "softplus":
            delta = delta + _softplus_switch(u, *args)
        # torch's float32 kernels overflow inside their own arithmetic below float32's largest value
        # (hardswish computes 6x before dividing; gelu at 3e38): a margin of LIBRARY_OVERFLOW
        return widen(out, _overflow(LIBRARY_OVERFLOW * scale, delta))
    raise NotImplementedError(f"bcpc.rounding has no rounding bound for rule {name!r}: classify it in bcpc/rounding.py")


def _softplus_switch(u: float, x: Bound, beta, threshold) -> Tensor:
    """softplus jumps by ``jump`` at ``x0 = threshold / beta`` (rules/activations.py), and float32
    decides the side by comparing ``fl(beta x)`` with ``fl(threshold)``: within a few units of
    roundoff of ``x0`` it may take the other piece than the copy. There, the jump is added."""
    from bcpc.rules.activations import _softplus_jump

    jump = _softplus_jump(beta, threshold)
    if not jump:
        return torch.zeros((), dtype=x.center.dtype, device=x.center.device)
    x0 = threshold / beta
    lower = x.lower if x.lower is not None else x.center - expand_radius(x.radius, x.center)
    upper = x.upper if x.upper is not None else x.center + expand_radius(x.radius, x.center)
    # in x: the relative rounding of the product and the switch point, plus the absolute rounding of an
    # underflowing product x * beta (2^-150) and of a subnormal threshold, both divided by beta (a
    # review: beta 1e-30 takes the other piece for every x below 7e-16)
    thr_error = abs(float(threshold) - float(torch.tensor(float(threshold), dtype=torch.float32)))
    slack = 8 * u * (abs(x0) + torch.maximum(lower.abs(), upper.abs())) + (8 * eta(u) + thr_error) / abs(beta) \
        + 8 * eta(u)
    near = (lower <= x0 + slack) & (upper >= x0 - slack)
    return jump * near.to(x.center.dtype)


def batch_norm_after_conv(out: Bound, u: float, x: Bound, weight, bias, stride, padding, dilation, groups,
                          conv_center, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                          training, momentum, eps) -> Bound:
    """A BatchNorm whose box was formed through the folded convolution (``conv_batch_norm_box``),
    from the convolution's input: its box also gets the convolution's rounding, scaled by the
    BatchNorm (its ball already has it, through the convolution's widened ball)."""
    if not u:
        return out
    nd = weight.dim() - 2
    conv_delta = _affine_delta(u, f"conv{nd}d", x, weight, bias, stride, padding, dilation, groups)
    exact, own = _bn_scales(running_var, eps, bn_weight)
    scale = torch.maximum(exact.abs(), own.abs()) * (1 + gamma(4, u))  # the larger of the two
    view = (1, -1) + (1,) * (x.center.dim() - 2)
    # |the convolution's float32 output| <= conv(|x|, |W|) + |b| + its rounding
    conv_mag = getattr(F, f"conv{nd}d")(magnitude(x), weight.abs(), None if bias is None else bias.abs(),
                                        stride, padding, dilation, groups) + conv_delta
    bn_delta = _batch_norm_delta(u, Bound(conv_center, None, -conv_mag, conv_mag), bn_weight, bn_bias,
                                 running_mean, running_var, eps)
    box_delta = scale.abs().reshape(view) * conv_delta + bn_delta
    radius = None if out.radius is None else out.radius + bn_delta.expand_as(out.center).flatten(1).norm(dim=1)
    lower = None if out.lower is None else out.lower - box_delta
    upper = None if out.upper is None else out.upper + box_delta
    return Bound(out.center, radius, lower, upper)


def margins(m: Tensor, u: float, p: Bound, weight: Tensor, bias: Optional[Tensor], logits: Tensor,
            y: Optional[Tensor]) -> Tensor:
    """Margins of the last affine layer less its rounding on both logits of each pair."""
    if not u:
        return m
    delta = _affine_delta(u, "linear", p, weight, bias)
    ref = logits.argmax(1) if y is None else y
    return m - (delta.gather(1, ref.unsqueeze(1)) + delta)

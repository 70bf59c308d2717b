"""Fused box arithmetic: one pass over the activations where torch needs one pass per operation.

The box half of an affine layer followed by a monotone activation is a chain of a dozen
elementwise operations (midpoint and half-width of the input box, the interval-arithmetic ends,
the row-norm intersection of eq. 6, the activation on both ends), each a separate pass over the
activations forward and again backward, with its own temporaries. On a CPU these passes cost more
than the convolutions they surround (benchmarks/bench.py; docs/performance.md). Here each chain
is one numba kernel forward and one backward, wrapped in a ``torch.autograd.Function`` that keeps
two bits per element for backward (which side of every max/min and ReLU won).

Every function has a pure-torch path computing the same arithmetic in the same order; it is taken
for tensors that are not on the CPU (so the emitted code runs on CUDA unchanged), for dtypes other
than float32/float64, inside ``torch.compile`` (``bcpc.compile(..., backend="inductor")``, whose
code generator fuses the torch path itself), and when ``BCPC_FUSED=0`` is set in the environment
(the reference the tests compare against). The kernels are serial: ``benchmarks/bench.py``
measures one thread. Each is kept because it beats its torch path (``benchmarks/kernels.py``);
``sum_diff`` stays two torch additions, which were as fast.

Conventions, shared by both paths (DESIGN.md §2, affine rule):

* ``sum_diff(lower, upper)`` gives ``s = upper + lower`` and ``d = upper - lower``; the affine rule
  applies ``A`` to ``s`` and ``|A|`` to ``d``, and ``affine_box`` halves both (exact in binary
  floating point), so the box midpoint and half-width are never materialised;
* ``affine_box(a_s, a_d, bias, center, rownorm, radius)``: with ``m = a_s / 2 + bias`` and
  ``r = a_d / 2``, returns ``lower = max(m - r, center - rownorm * radius)`` and
  ``upper = min(m + r, center + rownorm * radius)``;
* ``relu_box(lower, upper)`` returns ``(relu(lower), relu(upper))``;
* ``abs_square(W)`` returns ``(|W|, W**2)``; ``abs_linear(x, W)`` is ``x @ |W|^T``.
"""
from __future__ import annotations

import os
from typing import Optional

import numba
import numpy as np
import torch
from torch import Tensor

from bcpc.domain import maximum, minimum, relu

# Backward codes, two bits per element packed four to a byte (element n of a row in bits
# 2(n mod 4) and 2(n mod 4) + 1 of byte n // 4): in affine_box the low bit = the interval-arithmetic
# lower end won the max (else the ball end), the high bit = the same for the upper end and the
# min; in relu_box low bit = lower > 0, high bit = upper > 0.


def enabled() -> bool:
    """Whether the fused CPU kernels are used (``BCPC_FUSED=0`` turns them off)."""
    return os.environ.get("BCPC_FUSED", "1") != "0"


def _fusable(*tensors: Tensor) -> bool:
    if not enabled() or torch.compiler.is_compiling():  # under torch.compile inductor fuses the torch path
        return False
    dtype = tensors[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dtype for t in tensors) and dtype in (torch.float32, torch.float64)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _const(like: Tensor, value: float):
    """A scalar of ``like``'s dtype: keeps float32 kernels in float32 arithmetic, like torch."""
    return np.float32(value) if like.dtype == torch.float32 else np.float64(value)


def _code_buffer(like: Tensor) -> Tensor:
    """Backward codes for a (B, N) tensor: 2 bits per element, 4 elements per byte."""
    return torch.empty((like.shape[0], (like.shape[1] + 3) // 4), dtype=torch.uint8)


def _rows(t: Tensor) -> Tensor:
    """(B, ...) -> contiguous (B, N)."""
    return t.reshape(t.shape[0], -1).contiguous()


# --- numba kernels (serial; (B, N) arrays, per-coordinate vectors of length N) --------------------

# Codes are packed four elements to a byte. The kernels walk each row in groups of four with the
# element work in inlined helpers called with constant shifts (a shift that varies per element
# keeps LLVM from vectorising and was 7x slower), then the row's tail.

@numba.njit(inline="always")
def _affine_one(a_s, a_d, bias, center, rownorm, lower, upper, b, n, rb, half):
    m = a_s[b, n] * half + bias[n]
    r = a_d[b, n] * half
    dev = rownorm[n] * rb
    c = center[b, n]
    ia_lo, ia_up = m - r, m + r
    ball_lo, ball_up = c - dev, c + dev
    take_lo, take_up = ia_lo >= ball_lo, ia_up <= ball_up
    # selects, not branches: the winner flips from element to element
    lower[b, n] = ia_lo if take_lo else ball_lo
    upper[b, n] = ia_up if take_up else ball_up
    return take_lo + 2 * take_up


@numba.njit(cache=True, nogil=True)
def _affine_kernel(a_s, a_d, bias, center, rownorm, radius, lower, upper, code, half):
    B, N = a_s.shape
    Q = N // 4
    for b in range(B):
        rb = radius[b]
        for q in range(Q):
            n = 4 * q
            k0 = _affine_one(a_s, a_d, bias, center, rownorm, lower, upper, b, n, rb, half)
            k1 = _affine_one(a_s, a_d, bias, center, rownorm, lower, upper, b, n + 1, rb, half)
            k2 = _affine_one(a_s, a_d, bias, center, rownorm, lower, upper, b, n + 2, rb, half)
            k3 = _affine_one(a_s, a_d, bias, center, rownorm, lower, upper, b, n + 3, rb, half)
            code[b, q] = k0 | (k1 << 2) | (k2 << 4) | (k3 << 6)
        byte = 0
        for n in range(4 * Q, N):
            byte |= _affine_one(a_s, a_d, bias, center, rownorm, lower, upper, b, n, rb, half) << (2 * (n - 4 * Q))
        if N > 4 * Q:
            code[b, Q] = byte


@numba.njit(inline="always")
def _affine_grad_one(gl, gu, k, rownorm, g_as, g_ad, g_center, g_bias, g_rownorm, b, n, rb, half, zero):
    x, y = gl[b, n], gu[b, n]
    ia_l = x if k & 1 else zero
    ia_u = y if k & 2 else zero
    ball_l = x - ia_l
    ball_u = y - ia_u
    g_m = ia_l + ia_u
    g_as[b, n] = g_m * half
    g_ad[b, n] = (ia_u - ia_l) * half
    g_bias[n] += g_m
    g_center[b, n] = ball_l + ball_u
    g_dev = ball_u - ball_l
    g_rownorm[n] += g_dev * rb
    return g_dev * rownorm[n]


# reassociation only (no NaN/Inf assumptions): lets LLVM vectorise the sums; gradients only
@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _affine_backward_kernel(gl, gu, code, rownorm, radius, g_as, g_ad, g_center, g_bias, g_rownorm, g_radius,
                            half, zero):
    B, N = gl.shape
    Q = N // 4
    for b in range(B):
        rb = radius[b]
        acc = 0.0
        for q in range(Q):
            n = 4 * q
            k = code[b, q]
            acc += _affine_grad_one(gl, gu, k, rownorm, g_as, g_ad, g_center, g_bias, g_rownorm, b, n, rb, half, zero)
            acc += _affine_grad_one(gl, gu, k >> 2, rownorm, g_as, g_ad, g_center, g_bias, g_rownorm, b, n + 1, rb,
                                    half, zero)
            acc += _affine_grad_one(gl, gu, k >> 4, rownorm, g_as, g_ad, g_center, g_bias, g_rownorm, b, n + 2, rb,
                                    half, zero)
            acc += _affine_grad_one(gl, gu, k >> 6, rownorm, g_as, g_ad, g_center, g_bias, g_rownorm, b, n + 3, rb,
                                    half, zero)
        for n in range(4 * Q, N):
            k = code[b, Q] >> (2 * (n - 4 * Q))
            acc += _affine_grad_one(gl, gu, k, rownorm, g_as, g_ad, g_center, g_bias, g_rownorm, b, n, rb, half, zero)
        g_radius[b] = acc


@numba.njit(inline="always")
def _relu_one(lower, upper, out_lower, out_upper, b, n, zero):
    lo, up = lower[b, n], upper[b, n]
    pos_lo, pos_up = lo > zero, up > zero
    out_lower[b, n] = lo if pos_lo else zero
    out_upper[b, n] = up if pos_up else zero
    return pos_lo + 2 * pos_up


@numba.njit(cache=True, nogil=True)
def _relu_box_kernel(lower, upper, out_lower, out_upper, code, zero):
    B, N = lower.shape
    Q = N // 4
    for b in range(B):
        for q in range(Q):
            n = 4 * q
            k0 = _relu_one(lower, upper, out_lower, out_upper, b, n, zero)
            k1 = _relu_one(lower, upper, out_lower, out_upper, b, n + 1, zero)
            k2 = _relu_one(lower, upper, out_lower, out_upper, b, n + 2, zero)
            k3 = _relu_one(lower, upper, out_lower, out_upper, b, n + 3, zero)
            code[b, q] = k0 | (k1 << 2) | (k2 << 4) | (k3 << 6)
        byte = 0
        for n in range(4 * Q, N):
            byte |= _relu_one(lower, upper, out_lower, out_upper, b, n, zero) << (2 * (n - 4 * Q))
        if N > 4 * Q:
            code[b, Q] = byte


@numba.njit(inline="always")
def _relu_grad_one(g_lower, g_upper, k, gl, gu, b, n, zero):
    gl[b, n] = g_lower[b, n] if k & 1 else zero
    gu[b, n] = g_upper[b, n] if k & 2 else zero


@numba.njit(cache=True, nogil=True)
def _relu_box_backward_kernel(g_lower, g_upper, code, gl, gu, zero):
    B, N = g_lower.shape
    Q = N // 4
    for b in range(B):
        for q in range(Q):
            n = 4 * q
            k = code[b, q]
            _relu_grad_one(g_lower, g_upper, k, gl, gu, b, n, zero)
            _relu_grad_one(g_lower, g_upper, k >> 2, gl, gu, b, n + 1, zero)
            _relu_grad_one(g_lower, g_upper, k >> 4, gl, gu, b, n + 2, zero)
            _relu_grad_one(g_lower, g_upper, k >> 6, gl, gu, b, n + 3, zero)
        for n in range(4 * Q, N):
            _relu_grad_one(g_lower, g_upper, code[b, Q] >> (2 * (n - 4 * Q)), gl, gu, b, n, zero)


@numba.njit(cache=True, nogil=True)
def _abs_square_kernel(w, w_abs, w_sq):
    for i in range(w.shape[0]):
        v = w[i]
        w_abs[i] = abs(v)
        w_sq[i] = v * v


@numba.njit(cache=True, nogil=True)
def _abs_square_backward_kernel(w, g_abs, g_sq, g, zero, two):
    for i in range(w.shape[0]):
        v = w[i]
        ga = g_abs[i]
        a = ga if v > zero else -ga  # sign(w) * g_abs ...
        a = a if v != zero else zero  # ... with sign(0) = 0, as torch
        g[i] = a + g_sq[i] * (two * v)


@numba.njit(cache=True, nogil=True)
def _sign_mul_kernel(w, g, zero):
    """``g *= sign(w)`` in place (sign(0) = 0, as torch)."""
    for i in range(w.shape[0]):
        v, x = w[i], g[i]
        x = x if v > zero else -x
        g[i] = x if v != zero else zero


# --- autograd functions -----------------------------------------------------------------------

class _AffineBox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_s, a_d, bias, center, rownorm, radius):
        lower, upper = torch.empty_like(a_s), torch.empty_like(a_s)
        code = _code_buffer(a_s)
        _affine_kernel(_np(a_s), _np(a_d), _np(bias), _np(center), _np(rownorm), _np(radius),
                       _np(lower), _np(upper), _np(code), _const(a_s, 0.5))
        ctx.save_for_backward(code, rownorm, radius)
        return lower, upper

    @staticmethod
    def backward(ctx, gl, gu):
        code, rownorm, radius = ctx.saved_tensors
        gl, gu = gl.contiguous(), gu.contiguous()
        g_as, g_ad, g_center = torch.empty_like(gl), torch.empty_like(gl), torch.empty_like(gl)
        g_bias, g_rownorm = torch.zeros_like(rownorm), torch.zeros_like(rownorm)
        g_radius = torch.empty_like(radius)
        _affine_backward_kernel(_np(gl), _np(gu), _np(code), _np(rownorm), _np(radius), _np(g_as), _np(g_ad),
                                _np(g_center), _np(g_bias), _np(g_rownorm), _np(g_radius), _const(gl, 0.5), _const(gl, 0.0))
        return g_as, g_ad, g_bias, g_center, g_rownorm, g_radius


class _ReluBox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lower, upper):
        out_lower, out_upper = torch.empty_like(lower), torch.empty_like(lower)
        code = _code_buffer(lower)
        _relu_box_kernel(_np(lower), _np(upper), _np(out_lower), _np(out_upper), _np(code), _const(lower, 0.0))
        ctx.save_for_backward(code)
        return out_lower, out_upper

    @staticmethod
    def backward(ctx, g_lower, g_upper):
        (code,) = ctx.saved_tensors
        g_lower, g_upper = g_lower.contiguous(), g_upper.contiguous()
        gl, gu = torch.empty_like(g_lower), torch.empty_like(g_lower)
        _relu_box_backward_kernel(_np(g_lower), _np(g_upper), _np(code), _np(gl), _np(gu), _const(gl, 0.0))
        return gl, gu


class _AbsSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        w_abs, w_sq = torch.empty_like(w), torch.empty_like(w)
        _abs_square_kernel(_np(w), _np(w_abs), _np(w_sq))
        ctx.save_for_backward(w)
        return w_abs, w_sq

    @staticmethod
    def backward(ctx, g_abs, g_sq):
        (w,) = ctx.saved_tensors
        g = torch.empty_like(w)
        _abs_square_backward_kernel(_np(w), _np(g_abs.contiguous()), _np(g_sq.contiguous()), _np(g),
                                    _const(w, 0.0), _const(w, 2.0))
        return g


class _AbsLinear(torch.autograd.Function):
    """``x @ |W|^T`` keeping ``W`` (a parameter, stored anyway) instead of ``|W|`` for backward:
    ``|W|`` is recomputed there. Saves one weight-sized tensor per linear layer."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.abs().t()

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g_x = g @ weight.abs() if ctx.needs_input_grad[0] else None
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = g.t() @ x
            _sign_mul_kernel(_np(weight.reshape(-1)), _np(g_w.view(-1)), _const(g_w, 0.0))
        return g_x, g_w


# --- public entry points ----------------------------------------------------------------------

def sum_diff(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``(upper + lower, upper - lower)``: twice the box midpoint and twice its half-width.

    Plain torch: a numba kernel for it was no faster than the two additions
    (``benchmarks/kernels.py``, 0.92x), so it was dropped."""
    return upper + lower, upper - lower


def affine_box(a_s: Tensor, a_d: Tensor, bias: Optional[Tensor], center: Tensor, rownorm: Tensor,
               radius: Tensor) -> tuple[Tensor, Tensor]:
    """Box of an affine output from ``a_s = A (u + l)``, ``a_d = |A| (u - l)`` (see module doc).

    ``bias`` and ``rownorm`` broadcast against one sample (``center[0]``); ``radius`` is ``(B,)``.
    """
    shape = center.shape
    if bias is None:
        bias = torch.zeros((), dtype=center.dtype, device=center.device)
    if not _fusable(a_s, a_d, center, rownorm, radius, bias):
        m = a_s * 0.5 + bias
        r = a_d * 0.5
        dev = rownorm * radius.reshape((-1,) + (1,) * (center.dim() - 1))
        return maximum(m - r, center - dev), minimum(m + r, center + dev)
    per_sample = shape[1:]
    bias_n = bias.expand(per_sample).reshape(-1).contiguous()
    rownorm_n = rownorm.expand(per_sample).reshape(-1).contiguous()
    lower, upper = _AffineBox.apply(_rows(a_s), _rows(a_d), bias_n, _rows(center), rownorm_n,
                                    radius.reshape(-1).contiguous())
    return lower.view(shape), upper.view(shape)


def relu_box(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``(relu(lower), relu(upper))``."""
    if not _fusable(lower, upper):
        return relu(lower), relu(upper)
    out_lower, out_upper = _ReluBox.apply(_rows(lower), _rows(upper))
    return out_lower.view(lower.shape), out_upper.view(lower.shape)


def abs_square(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(|W|, W**2)`` in one pass (and one pass backward: ``sign(W) g_abs + 2 W g_sq``)."""
    if not _fusable(weight):
        return weight.abs(), weight.square()
    w_abs, w_sq = _AbsSquare.apply(weight.reshape(-1).contiguous())
    return w_abs.view(weight.shape), w_sq.view(weight.shape)


def abs_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, |W|)`` for a 2-D ``x``, saving ``W`` rather than ``|W|`` for backward."""
    if not _fusable(x, weight) or x.dim() != 2:
        return torch.nn.functional.linear(x, weight.abs())
    return _AbsLinear.apply(x, weight)

"""Fused box arithmetic: one pass over the activations where torch needs one pass per operation.

The box half of an affine layer followed by a monotone activation is a chain of a dozen
elementwise operations (midpoint and half-width of the input box, the interval-arithmetic ends,
the row-norm intersection of eq. 6, the activation on both ends), each a separate pass over the
activations forward and again backward, with its own temporaries. On a CPU these passes cost more
than the convolutions they surround (benchmarks/bench.py; docs/performance.md). Here each chain
is one numba kernel forward and one backward, registered as a ``torch.library`` custom op
(``torch.ops.bcpc.affine_box``, ...) with a fake implementation and an autograd formula; the
forward keeps two bits per element for backward (which side of every max/min and ReLU won).
The kernels run in parallel (numba ``prange``) on as many threads as torch uses
(``torch.set_num_threads``), with the same results for every thread count.

Every function has a pure-torch path computing the same arithmetic in the same order; it is taken
for tensors that are not on the CPU (so the emitted code runs on CUDA unchanged), for dtypes other
than float32/float64, when ``BCPC_FUSED=0`` is set in the environment (the reference the tests
compare against), and inside ``torch.compile`` (``bcpc.compile(..., backend="inductor")``) when
``BCPC_FUSED_COMPILE=0``, so that inductor's code generator fuses the torch path itself; by
default the compiled graph calls the custom ops instead, which was faster (``compile_fused``).
Each kernel is kept because it beats its torch path (``benchmarks/kernels.py``); ``sum_diff``
stays two torch additions, which were as fast.

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


# the faster of the two on a CPU: 4C3F certified step, batch 50, one thread, 216-252 ms with the
# custom ops in the compiled graph against 269-321 ms for inductor's fusion of the torch path
# (three runs of benchmarks/kernels.py --inductor on a shared 2-core machine; eager: 280 ms)
COMPILE_DEFAULT = "1"


def compile_fused() -> bool:
    """Whether graphs traced by ``torch.compile`` call the fused kernels (``BCPC_FUSED_COMPILE``).

    ``1`` (default, ``COMPILE_DEFAULT``): the graph calls the ``bcpc::`` custom ops (opaque to
    inductor) where the tensors are CPU float32/float64; ``0``: every function takes its torch
    path, which inductor fuses with its neighbours. Off the CPU the torch path is taken either
    way. Read when a graph is traced: changing it afterwards needs ``torch.compiler.reset()``.
    """
    return os.environ.get("BCPC_FUSED_COMPILE", COMPILE_DEFAULT) == "1"


def active() -> bool:
    """Whether the fused kernels are wanted here: ``BCPC_FUSED``, and inside ``torch.compile`` also
    ``BCPC_FUSED_COMPILE`` (bcpc.solver asks this too). Never under CPU autocast (a bfloat16
    training step): the kernels are float32/float64 only, and autocast would mix the dtypes of a
    custom op's forward and backward; the torch paths autocast like any other operation."""
    return (enabled() and (compile_fused() or not torch.compiler.is_compiling())
            and not torch.is_autocast_enabled("cpu"))


def _fusable(*tensors: Tensor) -> bool:
    if not active():
        return False
    dtype = tensors[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dtype for t in tensors) and dtype in (torch.float32, torch.float64)


def set_threads() -> None:
    """Numba's thread count follows torch's (``torch.set_num_threads(1)`` means one thread for the
    kernels too), capped at the size of numba's pool. Called by every kernel launch (~2 us).

    Numba's OpenMP pool, started by the first call, sets the OpenMP thread count to the pool's
    size, and torch can share that OpenMP runtime (then ``torch.get_num_threads()`` would jump
    from 1 to the core count): torch's own count is put back."""
    n = torch.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _const(like: Tensor, value: float):
    """A scalar of ``like``'s dtype: keeps float32 kernels in float32 arithmetic, like torch."""
    return np.float32(value) if like.dtype == torch.float32 else np.float64(value)


def _code_buffer(like: Tensor) -> Tensor:
    """Backward codes for a (B, N) tensor: 2 bits per element, 4 elements per byte."""
    return like.new_empty((like.shape[0], (like.shape[1] + 3) // 4), dtype=torch.uint8)


def _new(like: Tensor) -> Tensor:
    """A contiguous tensor of ``like``'s shape and dtype (real and fake kernels alike: same strides)."""
    return like.new_empty(like.shape)


def _rows(t: Tensor) -> Tensor:
    """(B, ...) -> contiguous (B, N)."""
    return t.reshape(t.shape[0], -1).contiguous()


# --- numba kernels ((B, N) arrays, per-coordinate vectors of length N) ----------------------------

# Codes are packed four elements to a byte. The kernels walk each row in groups of four with the
# element work in inlined helpers called with constant shifts (a shift that varies per element
# keeps LLVM from vectorising and was 7x slower), then the row's tail.
#
# Parallel (numba prange) over the batch rows, or over blocks of elements for the element-wise
# weight kernels. The one kernel with reductions over the batch, the affine backward (``g_bias``,
# ``g_rownorm``), runs over chunks of rows: each chunk sums its rows, in row order, into its own
# row of a (chunks, N) scratch, and the chunks are then summed in chunk order. The chunks depend
# on the batch size alone, never on the thread count, so every result is the same, bit for bit,
# whatever the number of threads (tests/test_kernels.py).

_MAX_CHUNKS = 16  # row chunks of the affine backward: the most threads it can use


def _row_chunks(batch: int) -> int:
    """The number of row chunks (of ``ceil(batch / 16)`` rows each) for a batch of ``batch`` rows."""
    per = -(-batch // _MAX_CHUNKS)
    return -(-batch // per)


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


@numba.njit(cache=True, nogil=True, parallel=True)
def _affine_kernel(a_s, a_d, bias, center, rownorm, radius, lower, upper, code, half):
    B, N = a_s.shape
    Q = N // 4
    for b in numba.prange(B):
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
@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc"})
def _affine_backward_kernel(gl, gu, code, rownorm, radius, g_as, g_ad, g_center, g_bias, g_rownorm, g_radius,
                            part_bias, part_rownorm, half, zero):
    """``part_bias``, ``part_rownorm``: (chunks, N) scratch of the per-chunk sums (``_row_chunks``)."""
    B, N = gl.shape
    Q = N // 4
    chunks = part_bias.shape[0]
    per = (B + chunks - 1) // chunks
    for j in numba.prange(chunks):
        pb = part_bias[j]
        pr = part_rownorm[j]
        for n in range(N):
            pb[n] = zero
            pr[n] = zero
        for b in range(j * per, min(B, (j + 1) * per)):
            rb = radius[b]
            acc = 0.0
            for q in range(Q):
                n = 4 * q
                k = code[b, q]
                acc += _affine_grad_one(gl, gu, k, rownorm, g_as, g_ad, g_center, pb, pr, b, n, rb, half, zero)
                acc += _affine_grad_one(gl, gu, k >> 2, rownorm, g_as, g_ad, g_center, pb, pr, b, n + 1, rb, half,
                                        zero)
                acc += _affine_grad_one(gl, gu, k >> 4, rownorm, g_as, g_ad, g_center, pb, pr, b, n + 2, rb, half,
                                        zero)
                acc += _affine_grad_one(gl, gu, k >> 6, rownorm, g_as, g_ad, g_center, pb, pr, b, n + 3, rb, half,
                                        zero)
            for n in range(4 * Q, N):
                k = code[b, Q] >> (2 * (n - 4 * Q))
                acc += _affine_grad_one(gl, gu, k, rownorm, g_as, g_ad, g_center, pb, pr, b, n, rb, half, zero)
            g_radius[b] = acc
    for n in numba.prange(N):
        sum_bias = zero
        sum_rownorm = zero
        for j in range(chunks):  # chunk order: the same sums for every thread count
            sum_bias += part_bias[j, n]
            sum_rownorm += part_rownorm[j, n]
        g_bias[n] = sum_bias
        g_rownorm[n] = sum_rownorm


@numba.njit(inline="always")
def _relu_one(lower, upper, out_lower, out_upper, b, n, zero):
    lo, up = lower[b, n], upper[b, n]
    pos_lo, pos_up = lo > zero, up > zero
    out_lower[b, n] = lo if pos_lo else zero
    out_upper[b, n] = up if pos_up else zero
    return pos_lo + 2 * pos_up


@numba.njit(cache=True, nogil=True, parallel=True)
def _relu_box_kernel(lower, upper, out_lower, out_upper, code, zero):
    B, N = lower.shape
    Q = N // 4
    for b in numba.prange(B):
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


@numba.njit(cache=True, nogil=True, parallel=True)
def _relu_box_backward_kernel(g_lower, g_upper, code, gl, gu, zero):
    B, N = g_lower.shape
    Q = N // 4
    for b in numba.prange(B):
        for q in range(Q):
            n = 4 * q
            k = code[b, q]
            _relu_grad_one(g_lower, g_upper, k, gl, gu, b, n, zero)
            _relu_grad_one(g_lower, g_upper, k >> 2, gl, gu, b, n + 1, zero)
            _relu_grad_one(g_lower, g_upper, k >> 4, gl, gu, b, n + 2, zero)
            _relu_grad_one(g_lower, g_upper, k >> 6, gl, gu, b, n + 3, zero)
        for n in range(4 * Q, N):
            _relu_grad_one(g_lower, g_upper, code[b, Q] >> (2 * (n - 4 * Q)), gl, gu, b, n, zero)


@numba.njit(cache=True, nogil=True, parallel=True)
def _abs_square_kernel(w, w_abs, w_sq):
    for i in numba.prange(w.shape[0]):
        v = w[i]
        w_abs[i] = abs(v)
        w_sq[i] = v * v


@numba.njit(cache=True, nogil=True, parallel=True)
def _abs_square_backward_kernel(w, g_abs, g_sq, g, zero, two):
    for i in numba.prange(w.shape[0]):
        v = w[i]
        ga = g_abs[i]
        a = ga if v > zero else -ga  # sign(w) * g_abs ...
        a = a if v != zero else zero  # ... with sign(0) = 0, as torch
        g[i] = a + g_sq[i] * (two * v)


@numba.njit(cache=True, nogil=True, parallel=True)
def _sign_mul_kernel(w, g, zero):
    """``g *= sign(w)`` in place (sign(0) = 0, as torch)."""
    for i in numba.prange(w.shape[0]):
        v, x = w[i], g[i]
        x = x if v > zero else -x
        g[i] = x if v != zero else zero


# --- custom ops ---------------------------------------------------------------------------------
#
# Each kernel is a ``torch.library`` custom op (``torch.ops.bcpc.*``) with a fake implementation
# (output shapes, dtypes and strides, for torch.compile's tracing) and, for the forward ops, an
# autograd formula that calls the matching backward op. The forward ops of affine_box and
# relu_box return the packed code buffer as a third (uint8, non-differentiable) output; it is
# what autograd keeps for backward. Inputs of any layout are accepted (made contiguous); outputs
# are new contiguous tensors.


def _grad_or_zeros(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like, memory_format=torch.contiguous_format) if g is None else g.contiguous()


@torch.library.custom_op("bcpc::affine_box", mutates_args=(), device_types="cpu")
def _affine_box_op(a_s: Tensor, a_d: Tensor, bias: Tensor, center: Tensor, rownorm: Tensor,
                   radius: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N) ``a_s``, ``a_d``, ``center``; (N,) ``bias``, ``rownorm``; (B,) ``radius`` ->
    ``lower``, ``upper`` (B, N) and the codes (B, ceil(N / 4)) uint8."""
    a_s, a_d, bias, center, rownorm, radius = (t.contiguous() for t in (a_s, a_d, bias, center, rownorm, radius))
    lower, upper, code = _new(a_s), _new(a_s), _code_buffer(a_s)
    set_threads()
    _affine_kernel(_np(a_s), _np(a_d), _np(bias), _np(center), _np(rownorm), _np(radius),
                   _np(lower), _np(upper), _np(code), _const(a_s, 0.5))
    return lower, upper, code


@_affine_box_op.register_fake
def _(a_s, a_d, bias, center, rownorm, radius):
    return _new(a_s), _new(a_s), _code_buffer(a_s)


@torch.library.custom_op("bcpc::affine_box_backward", mutates_args=(), device_types="cpu")
def _affine_box_backward_op(gl: Tensor, gu: Tensor, code: Tensor, rownorm: Tensor,
                            radius: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> gradients of ``a_s``, ``a_d``, ``bias``, ``center``, ``rownorm``, ``radius``."""
    gl, gu, code, rownorm, radius = (t.contiguous() for t in (gl, gu, code, rownorm, radius))
    g_as, g_ad, g_center = _new(gl), _new(gl), _new(gl)
    g_bias, g_rownorm, g_radius = _new(rownorm), _new(rownorm), _new(radius)
    chunks = _row_chunks(gl.shape[0])
    part_bias, part_rownorm = (np.empty((chunks, gl.shape[1]), dtype=_np(gl).dtype) for _ in range(2))
    set_threads()
    _affine_backward_kernel(_np(gl), _np(gu), _np(code), _np(rownorm), _np(radius), _np(g_as), _np(g_ad),
                            _np(g_center), _np(g_bias), _np(g_rownorm), _np(g_radius), part_bias, part_rownorm,
                            _const(gl, 0.5), _const(gl, 0.0))
    return g_as, g_ad, g_bias, g_center, g_rownorm, g_radius


@_affine_box_backward_op.register_fake
def _(gl, gu, code, rownorm, radius):
    return _new(gl), _new(gl), _new(rownorm), _new(gl), _new(rownorm), _new(radius)


def _affine_box_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], inputs[4], inputs[5])  # codes, rownorm, radius


def _affine_box_grad(ctx, gl, gu, _g_code):
    code, rownorm, radius = ctx.saved_tensors
    like = gu if gl is None else gl
    return torch.ops.bcpc.affine_box_backward(_grad_or_zeros(gl, like), _grad_or_zeros(gu, like), code, rownorm,
                                              radius)


_affine_box_op.register_autograd(_affine_box_grad, setup_context=_affine_box_setup)


@torch.library.custom_op("bcpc::relu_box", mutates_args=(), device_types="cpu")
def _relu_box_op(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N) ``lower``, ``upper`` -> ``relu(lower)``, ``relu(upper)`` and the codes."""
    lower, upper = lower.contiguous(), upper.contiguous()
    out_lower, out_upper, code = _new(lower), _new(lower), _code_buffer(lower)
    set_threads()
    _relu_box_kernel(_np(lower), _np(upper), _np(out_lower), _np(out_upper), _np(code), _const(lower, 0.0))
    return out_lower, out_upper, code


@_relu_box_op.register_fake
def _(lower, upper):
    return _new(lower), _new(lower), _code_buffer(lower)


@torch.library.custom_op("bcpc::relu_box_backward", mutates_args=(), device_types="cpu")
def _relu_box_backward_op(g_lower: Tensor, g_upper: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    g_lower, g_upper, code = g_lower.contiguous(), g_upper.contiguous(), code.contiguous()
    gl, gu = _new(g_lower), _new(g_lower)
    set_threads()
    _relu_box_backward_kernel(_np(g_lower), _np(g_upper), _np(code), _np(gl), _np(gu), _const(gl, 0.0))
    return gl, gu


@_relu_box_backward_op.register_fake
def _(g_lower, g_upper, code):
    return _new(g_lower), _new(g_lower)


def _relu_box_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _relu_box_grad(ctx, g_lower, g_upper, _g_code):
    (code,) = ctx.saved_tensors
    like = g_upper if g_lower is None else g_lower
    return torch.ops.bcpc.relu_box_backward(_grad_or_zeros(g_lower, like), _grad_or_zeros(g_upper, like), code)


_relu_box_op.register_autograd(_relu_box_grad, setup_context=_relu_box_setup)


@torch.library.custom_op("bcpc::abs_square", mutates_args=(), device_types="cpu")
def _abs_square_op(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``W`` (any shape) -> ``|W|``, ``W**2``."""
    w = weight.contiguous()
    w_abs, w_sq = _new(w), _new(w)
    set_threads()
    _abs_square_kernel(_np(w.view(-1)), _np(w_abs.view(-1)), _np(w_sq.view(-1)))
    return w_abs, w_sq


@_abs_square_op.register_fake
def _(weight):
    return _new(weight), _new(weight)


@torch.library.custom_op("bcpc::abs_square_backward", mutates_args=(), device_types="cpu")
def _abs_square_backward_op(weight: Tensor, g_abs: Tensor, g_sq: Tensor) -> Tensor:
    """``sign(W) g_abs + 2 W g_sq``."""
    w, g_abs, g_sq = weight.contiguous(), g_abs.contiguous(), g_sq.contiguous()
    g = _new(w)
    set_threads()
    _abs_square_backward_kernel(_np(w.view(-1)), _np(g_abs.view(-1)), _np(g_sq.view(-1)), _np(g.view(-1)),
                                _const(w, 0.0), _const(w, 2.0))
    return g


@_abs_square_backward_op.register_fake
def _(weight, g_abs, g_sq):
    return _new(weight)


def _abs_square_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _abs_square_grad(ctx, g_abs, g_sq):
    (w,) = ctx.saved_tensors
    return torch.ops.bcpc.abs_square_backward(w, _grad_or_zeros(g_abs, w), _grad_or_zeros(g_sq, w))


_abs_square_op.register_autograd(_abs_square_grad, setup_context=_abs_square_setup)


@torch.library.custom_op("bcpc::abs_linear", mutates_args=(), device_types="cpu")
def _abs_linear_op(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ |W|^T`` for a 2-D ``x``; autograd keeps ``W`` (a parameter, stored anyway) instead of
    ``|W|`` and recomputes ``|W|`` in backward: one weight-sized tensor less per linear layer."""
    return (x @ weight.abs().t()).contiguous()


@_abs_linear_op.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("bcpc::abs_linear_weight_grad", mutates_args=(), device_types="cpu")
def _abs_linear_weight_grad_op(g: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``(g^T x) * sign(W)``: the gradient of ``x @ |W|^T`` with respect to ``W``."""
    g_w = (g.t() @ x).contiguous()
    set_threads()
    _sign_mul_kernel(_np(weight.contiguous().view(-1)), _np(g_w.view(-1)), _const(g_w, 0.0))
    return g_w


@_abs_linear_weight_grad_op.register_fake
def _(g, x, weight):
    return _new(weight)


def _abs_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _abs_linear_grad(ctx, g):
    x, weight = ctx.saved_tensors
    g_x = g @ weight.abs() if ctx.needs_input_grad[0] else None
    g_w = torch.ops.bcpc.abs_linear_weight_grad(g, x, weight) if ctx.needs_input_grad[1] else None
    return g_x, g_w


_abs_linear_op.register_autograd(_abs_linear_grad, setup_context=_abs_linear_setup)


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
    bias_n = bias.expand(per_sample).reshape(-1)
    rownorm_n = rownorm.expand(per_sample).reshape(-1)
    lower, upper, _ = torch.ops.bcpc.affine_box(_rows(a_s), _rows(a_d), bias_n, _rows(center), rownorm_n,
                                                radius.reshape(-1))
    return lower.view(shape), upper.view(shape)


def relu_box(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``(relu(lower), relu(upper))``."""
    if not _fusable(lower, upper):
        return relu(lower), relu(upper)
    out_lower, out_upper, _ = torch.ops.bcpc.relu_box(_rows(lower), _rows(upper))
    return out_lower.view(lower.shape), out_upper.view(lower.shape)


def abs_square(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(|W|, W**2)`` in one pass (and one pass backward: ``sign(W) g_abs + 2 W g_sq``)."""
    if not _fusable(weight):
        return weight.abs(), weight.square()
    return torch.ops.bcpc.abs_square(weight)


def abs_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, |W|)`` for a 2-D ``x``, saving ``W`` rather than ``|W|`` for backward."""
    if not _fusable(x, weight) or x.dim() != 2:
        return torch.nn.functional.linear(x, weight.abs())
    return torch.ops.bcpc.abs_linear(x, weight)

"""Certified lower bounds on last-layer margins over a ball ∩ box (paper eq. 11, DESIGN §3).

For a sample with ball ``||p - z||_2 <= rho`` and box ``lower <= p <= upper`` at the input ``p`` of
the last affine layer, and a class pair with ``c = W_y - W_j`` and ``offset = b_y - b_j``,

    margin_lower = min c·p + offset   over   ball(z, rho) ∩ box[lower, upper].

The exact minimiser is ``p(t*) = clip(z - t* c, l, u)``, where ``t*`` is the smallest ``t >= 0``
with ``||p(t) - z|| = rho`` (``t* = inf`` when the whole box corner lies inside the ball).
``||p(t) - z||^2 = sum_i min(t |c_i|, d_i)^2`` is piecewise quadratic and increasing, so ``t*``
follows from one sort of the breakpoints ``d_i / |c_i|`` and cumulative sums (``solve_t``).

The value is returned through the Lagrangian dual with multiplier ``mu = 1/t``:

    g(mu) = min_{p in box} c·p + mu/2 (||p - z||^2 - rho^2) + offset,   p_mu = clip(z - c/mu, l, u)

Weak duality makes ``g(mu)`` a lower bound for *every* ``mu >= 0``, so a ``t`` that is a few
ulps off ``t*`` still certifies; at ``mu* = 1/t*`` it equals the optimum (Slater holds whenever
``rho > 0``), and by Danskin its gradient — taken with ``t`` held fixed — is the gradient of the
optimum. ``t`` is therefore found under ``torch.no_grad`` and only the dual expression is
differentiated.

Nothing here syncs with the device or branches on data: the functions run unchanged on CUDA and
inside a training step. NaN in any input yields NaN in the affected margins (a NaN margin never
certifies: ``NaN > 0`` is False); the certification path calls ``check_finite`` first to fail
loudly, which is the one place that syncs.

On the CPU (float32/float64) ``solve_t`` runs a numba kernel that finds the same ``t*`` without the
sort: a quickselect-style search over the breakpoints, O(n) expected per (sample, pair), float64
inside, the samples in parallel on torch's thread count (``_solve_t_kernel``; ~10x faster than the
torch path single-threaded at (50, 10, 512), benchmarks/solver_kernel.py). ``BCPC_FUSED=0`` in the
environment, another device or dtype takes the torch path, which is the reference the kernel is
tested against (tests/test_solver_kernel.py). Inside ``torch.compile`` the graph calls the kernel
as the custom op ``bcpc::solve_t``, or takes the torch path with ``BCPC_FUSED_COMPILE=0``
(``bcpc.kernels.compile_fused``).

``iterative_projection`` is the paper's Algorithm 1 inner loop in numba, kept as an independent
oracle for tests and benchmarks; it is not on the certification path.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from bcpc import kernels

__all__ = [
    "margin_lower",
    "solve_t",
    "dual_margin_lower",
    "lipschitz_margin_lower",
    "box_margin_lower",
    "optimal_point",
    "check_finite",
    "iterative_projection",
]


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _widen_box(z, lower, upper):
    """Box ``[min(l, z), max(u, z)]``: contains the given box and ``z``, so bounds over it stay sound.

    Rounding upstream can leave ``z`` a hair outside ``[l, u]``; the solver assumes ``z`` inside.
    Enlarging the feasible set can only lower the minimum, so this never breaks soundness.
    ``torch.minimum``/``maximum`` propagate NaN, so a NaN in ``z`` is not hidden by the widening.
    ``None`` bounds mean an unbounded box (ball only).
    """
    if lower is None:
        lower = torch.full_like(z, -math.inf)
    if upper is None:
        upper = torch.full_like(z, math.inf)
    return torch.minimum(lower, z), torch.maximum(upper, z)


def _poison(value, per_sample=(), per_pair=(), finite_per_sample=(), finite_per_pair=()):
    """``value`` (B, K) with NaN wherever an input feeding that entry is NaN (or must be finite and is not).

    Several branches below (corner selection, ``where`` on ``t``) would otherwise turn a NaN input
    into an ordinary number — and a number can certify. This keeps NaN in, NaN out, without a sync.
    Each input is tested through its sum over the trailing dims (one cheap pass instead of a
    full-size ``isnan``): a NaN entry, or ``+inf`` next to ``-inf``, makes the sum NaN, and any
    infinite entry makes it non-finite. A finite input whose sum overflows would be flagged too;
    that errs towards NaN (no certificate), never towards a number.
    """
    bad = torch.zeros(value.shape, dtype=torch.bool, device=value.device)

    def total(x, keep):
        return x.reshape(*x.shape[:keep], -1).sum(-1) if x.dim() > keep else x

    for x in per_sample:
        if x is not None:
            bad = bad | torch.isnan(total(x, 1)).unsqueeze(-1)
    for x in finite_per_sample:
        if x is not None:
            bad = bad | ~torch.isfinite(total(x, 1)).unsqueeze(-1)
    for x in per_pair:
        if x is not None:
            bad = bad | torch.isnan(total(x, 2))
    for x in finite_per_pair:
        if x is not None:
            bad = bad | ~torch.isfinite(total(x, 2))
    return torch.where(bad, math.nan, value)


def _add_offset(value, offset):
    return value if offset is None else value + offset


# --------------------------------------------------------------------------------------------
# the exact solver
# --------------------------------------------------------------------------------------------


def solve_t(z, rho, lower, upper, c):
    """The optimal ``t* >= 0`` (B, K) of ``min c·p`` over ball ∩ box; ``+inf`` where the box corner is inside the ball.

    Exact up to rounding, no gradient. ``p(t) = clip(z - t c, l, u)`` moves coordinate ``i`` by
    ``min(t |c_i|, d_i)``, where ``d_i`` is the distance from ``z_i`` to the face ``-c_i`` points to.
    Sorting the breakpoints ``t_i = d_i / |c_i|`` and taking prefix sums of ``d_i^2`` and suffix
    sums of ``c_i^2`` gives ``f(t_j) = ||p(t_j) - z||^2`` at every breakpoint. Coordinates with
    ``f(t_j) < rho^2`` are saturated at ``t*``; the rest are free, so
    ``rho^2 = D + t*^2 A`` with ``D`` = sum of saturated ``d_i^2``, ``A`` = sum of free ``c_i^2``.
    ``A == 0`` means every coordinate that matters sits on its corner inside the ball: ``t* = inf``.

    Ties in breakpoints need no care: at ``t_j`` a tied coordinate contributes ``t_j^2 c_i^2 = d_i^2``
    whichever side of the tie it is sorted on, so ``f(t_j)`` is the same.
    ``lower``/``upper`` may be ``None`` (ball only: ``t* = rho/||c||``); ``rho`` may be ``None``
    (box only: ``t* = inf``). Shapes: z (B, n), rho (B,), lower/upper (B, n), c (B, K, n).
    Computed with ``c`` scaled to ``max|c| = 1`` and distances to ``rho = 1`` (``t*`` is homogeneous
    in both), so the overall scale of the inputs cannot make squares underflow or overflow. Only a
    ratio ``|c_i| / max|c|`` below ~1e-154 (float32: ~1e-19) still underflows in ``c_i^2``; ``t``
    may then come out as a huge finite number instead of ``inf`` (same point, same bound) — any
    ``t`` is a sound dual point, so this costs nothing but that label.
    On CPU float32/float64 tensors this runs ``_solve_t_kernel`` (numba, no sort, same ``t`` up to
    rounding) unless ``BCPC_FUSED=0`` is set; elsewhere ``_solve_t_torch``.
    """
    with torch.no_grad():
        if rho is None:
            return torch.full(c.shape[:-1], math.inf, dtype=c.dtype, device=c.device)
        if _kernel_applies(z, rho, lower, upper, c):
            return torch.ops.bcpc.solve_t(z, rho, lower, upper, c)
        return _solve_t_torch(z, rho, lower, upper, c)


def _solve_t_torch(z, rho, lower, upper, c):
    """``solve_t`` in batched torch (any device, no sync): one sort of the breakpoints, prefix sums."""
    lo, hi = _widen_box(z, lower, upper)
    n = c.shape[-1]
    # t* is homogeneous: t*(s c) = t*(c)/s and t*(s (z, rho, l, u)) = s t*. Solving with
    # max|c| = 1 and rho = 1 keeps c_i^2 and rho^2 clear of underflow (float32: |c| < 1e-19).
    rho = rho.reshape(-1, 1)
    r_scale = torch.where((rho > 0) & torch.isfinite(rho), rho, 1.0)
    rho2 = (rho / r_scale).square().unsqueeze(-1)  # 1, 0, inf or NaN; (B, 1, 1)
    down = ((z - lo) / r_scale).unsqueeze(-2)  # >= 0 after widening (or NaN)
    up = ((hi - z) / r_scale).unsqueeze(-2)
    a = c.abs()
    c_scale = a.amax(-1, keepdim=True)
    c_scale = torch.where(c_scale > 0, c_scale, 1.0)
    a.div_(c_scale)
    # breakpoints d_i/|c_i|; c_i == 0 never moves: +inf (inf/0 = inf), contributes nothing
    tb = torch.where(a > 0, torch.where(c > 0, down, up), math.inf).div_(a)
    tb, order = tb.sort(dim=-1)
    a = a.gather(-1, order)
    finite = tb < math.inf  # tb >= 0 (NaN rows are poisoned by the caller)
    # d_i = t_i |c_i|; +inf breakpoints (c_i = 0, unbounded side) are never saturated: 0, not
    # inf, so that no inf - inf or 0 * inf appears below
    d2 = torch.where(finite, tb * a, 0.0).square_()
    prefix_d2 = d2.cumsum(-1)
    suffix_a2 = (a * a).flip(-1).cumsum(-1).flip(-1)
    # exclusive suffix by shifting, not subtracting (no cancellation)
    later_a2 = torch.cat([suffix_a2[..., 1:], torch.zeros_like(suffix_a2[..., :1])], -1)
    # f(t_j) = sum_{i<=j} d_i^2 + t_j^2 sum_{i>j} c_i^2 (a coordinate tied with j contributes
    # d_i^2 on either side). Formed as (t_j ||c_later||)^2, not t_j^2 * ||c_later||^2: t_j^2
    # alone overflows when a tiny |c_j| gives a huge breakpoint, and inf * 0 would be NaN.
    f_at_break = torch.where(finite, prefix_d2 + (tb * later_a2.sqrt()).square(), math.inf)
    # coordinates with f(t_j) < rho^2 are saturated at t*: the first k in sorted order (f is
    # nondecreasing; should rounding break that, the first k is still a split, and the dual
    # value at the resulting t stays a sound bound)
    k = (f_at_break < rho2).sum(-1, keepdim=True)
    sat_d2 = torch.where(k > 0, prefix_d2.gather(-1, (k - 1).clamp_min(0)), 0.0).squeeze(-1)
    remaining = (rho2.reshape(-1, 1) - sat_d2).clamp_min(0)  # clamp_min keeps NaN
    # ||c_free|| scaled by its largest entry: a free |c_i| far below max|c| must not vanish in
    # c_i^2 and turn a finite t* into inf (the point would leave the ball)
    free_a = torch.where(torch.arange(n, device=c.device) >= k, a, 0.0)
    free_max = free_a.amax(-1, keepdim=True)
    has_free = free_max > 0
    free_max = torch.where(has_free, free_max, 1.0)
    free_norm = torch.linalg.vector_norm(free_a.div_(free_max), dim=-1) * free_max.squeeze(-1)
    t = torch.sqrt(remaining) / free_norm
    # In exact arithmetic t lies on its segment [t_(k-1), t_(k)]. Rounding in rho^2 - D (e.g.
    # the corner a few ulps outside the sphere, the last free |c_i| tiny) can push it off,
    # even to 0, i.e. mu = inf and a bound near -inf. Clamping to the segment keeps t
    # consistent with the saturation pattern it was computed for.
    seg_lo = torch.where(k > 0, tb.gather(-1, (k - 1).clamp_min(0)), 0.0).squeeze(-1)
    seg_hi = torch.where(k < n, tb.gather(-1, k.clamp_max(n - 1)), math.inf).squeeze(-1)
    t = torch.minimum(torch.maximum(t, seg_lo), seg_hi)
    # undo the scaling on finite t only: inf * (tiny rho / |c|) would be inf * 0 = NaN
    t = t * r_scale / c_scale.squeeze(-1)
    return torch.where(has_free.squeeze(-1), t, math.inf)


# --------------------------------------------------------------------------------------------
# the same t on the CPU: a numba kernel with a selection search instead of a sort
# --------------------------------------------------------------------------------------------


def _kernel_applies(z, rho, lower, upper, c):
    """Whether ``solve_t`` takes the numba kernel: CPU, float32/float64 throughout, canonical shapes;
    inside ``torch.compile`` unless ``BCPC_FUSED_COMPILE=0`` (``kernels.active``)."""
    if not kernels.active() or c.device.type != "cpu" or c.dtype not in (torch.float32, torch.float64):
        return False
    if c.dim() != 3 or z is None or z.shape != (c.shape[0], c.shape[2]) or rho.numel() != c.shape[0]:
        return False
    for x in (z, rho, lower, upper):
        if x is not None and (x.device != c.device or x.dtype != c.dtype):
            return False
    return all(x is None or x.shape == z.shape for x in (lower, upper))


def _solve_t_cpu(z, rho, lower, upper, c):
    """``solve_t`` by ``_solve_t_kernel`` (parallel over samples with torch's thread count,
    arithmetic in float64, result in c's dtype)."""
    inf = np.full(tuple(z.shape), np.inf, dtype=np.float64)

    def arr(x, fill=None):
        return fill if x is None else x.detach().contiguous().numpy()

    zn = arr(z)
    lo = arr(lower, -inf)
    hi = arr(upper, inf)
    if lower is None or upper is None:  # one dtype per kernel call (one compiled variant per dtype)
        lo, hi = lo.astype(zn.dtype, copy=False), hi.astype(zn.dtype, copy=False)
    out = np.empty(tuple(c.shape[:2]), dtype=zn.dtype)
    kernels.set_threads()
    _solve_t_kernel(zn, arr(rho).reshape(-1), lo, hi, arr(c), out)
    return torch.from_numpy(out)


# A torch custom op, so that a graph traced by torch.compile can call the kernel (opaque to
# inductor, no graph break; see bcpc.kernels.compile_fused). No autograd formula: t is found under
# no_grad.
@torch.library.custom_op("bcpc::solve_t", mutates_args=(), device_types="cpu",
                         schema="(Tensor z, Tensor rho, Tensor? lower, Tensor? upper, Tensor c) -> Tensor")
def _solve_t_op(z, rho, lower, upper, c):
    return _solve_t_cpu(z, rho, lower, upper, c)


@_solve_t_op.register_fake
def _(z, rho, lower, upper, c):
    return c.new_empty(c.shape[:2])


@numba.njit(cache=True, parallel=True)
def _solve_t_kernel(z, rho, lower, upper, c, out):
    """``solve_t`` per (sample, pair) row in O(n) expected time, float64 arithmetic; the samples in
    parallel (numba prange; each sample's rows alone, so the thread count changes no result).

    The same quantities as the torch path (box widened to contain ``z``, ``c`` scaled to
    ``max|c| = 1``, distances to ``rho = 1``, breakpoints ``t_i = d_i/|c_i|``, ``f(t) = ||p(t) - z||^2``),
    but the split between saturated and free coordinates is found by a quickselect-style search
    instead of a sort: take a pivot breakpoint ``P`` among the undecided ones and evaluate
    ``f(P) = D + sum_{t_i <= P} d_i^2 + (P ||c_{t_i > P}||)^2`` over them (``D``, and the free
    ``c_i^2``, accumulated from the coordinates already decided). ``f(P) < rho^2``: every undecided
    coordinate with ``t_i <= P`` is saturated; otherwise every one with ``t_i >= P`` is free (ties
    fall on one side together, as in the sorted path). Keep the other side and repeat; each round
    is one pass over the undecided coordinates, which halve on average. The result is the largest
    saturated breakpoint ``seg_lo``, the smallest free one ``seg_hi``, ``D`` and ``A = sum free c_i^2``,
    and ``t = sqrt(rho^2 - D) / sqrt(A)`` clamped to ``[seg_lo, seg_hi]`` exactly as in the torch path.
    Float64 inside even for float32 inputs: ``c_i^2`` cannot underflow there (float32 ratios are
    above 1e-83); for float64 inputs a free norm small enough to risk underflow is recomputed scaled.
    ``rho = inf`` gives ``t = inf`` (the box alone). NaN anywhere in a row's inputs, or an infinite
    ``c``, gives ``t = NaN`` for that row (the margin is NaN either way).
    """
    batch, classes, n = c.shape
    for b in numba.prange(batch):
        down = np.empty(n)
        up = np.empty(n)
        tbs = np.empty(n)  # the undecided finite breakpoints, compacted to the front each round
        als = np.empty(n)  # their |c_i| / max|c|
        r = np.float64(rho[b])
        r_scale = r if (r > 0.0 and r < np.inf) else 1.0
        rho2 = (r / r_scale) * (r / r_scale)
        sample_nan = r != r
        for i in range(n):
            zi = np.float64(z[b, i])
            li = np.float64(lower[b, i])
            ui = np.float64(upper[b, i])
            lo = zi if zi < li else li  # widened box; a NaN in z, l or u comes through
            hi = zi if zi > ui else ui
            down[i] = (zi - lo) / r_scale
            up[i] = (hi - zi) / r_scale
            if down[i] != down[i] or up[i] != up[i]:
                sample_nan = True
        for k in range(classes):
            if sample_nan:
                out[b, k] = np.nan
                continue
            c_scale = 0.0
            row_nan = False
            for i in range(n):
                ai = abs(np.float64(c[b, k, i]))
                if ai > c_scale:
                    c_scale = ai
                elif ai != ai:
                    row_nan = True
            if row_nan or c_scale == np.inf:
                out[b, k] = np.nan
                continue
            if c_scale == 0.0:
                c_scale = 1.0
            # split the coordinates: finite breakpoints (undecided), infinite ones (always free)
            m = 0
            q_free = 0.0  # sum of free (|c_i|/max|c|)^2
            has_free = False
            any_sat = False
            for i in range(n):
                ci = np.float64(c[b, k, i])
                ai = abs(ci) / c_scale
                if ai > 0.0:
                    tb = (down[i] if ci > 0.0 else up[i]) / ai
                    if tb < np.inf:
                        tbs[m] = tb
                        als[m] = ai
                        m += 1
                    else:  # unbounded side, or d_i / |c_i| overflows: never saturated
                        q_free += ai * ai
                        has_free = True
            # the search
            d_sat = 0.0  # sum of saturated d_i^2
            seg_lo = 0.0
            seg_hi = np.inf
            while m > 0:
                # pivot: median of three undecided breakpoints
                x0 = tbs[0]
                x1 = tbs[m // 2]
                x2 = tbs[m - 1]
                if x0 > x1:
                    x0, x1 = x1, x0
                if x1 > x2:
                    x1 = x2
                pivot = x1 if x1 > x0 else x0
                w_le = 0.0
                q_eq = 0.0
                q_gt = 0.0
                for j in range(m):
                    x = tbs[j]
                    a = als[j]
                    d = x * a
                    q = a * a
                    w_le += d * d if x <= pivot else 0.0
                    q_gt += q if x > pivot else 0.0
                    q_eq += q if x == pivot else 0.0
                s = pivot * math.sqrt(q_free + q_gt)
                if d_sat + w_le + s * s < rho2:
                    # every undecided coordinate with t_i <= pivot is saturated
                    d_sat += w_le
                    seg_lo = pivot
                    any_sat = True
                    kept = 0
                    for j in range(m):
                        x = tbs[j]
                        tbs[kept] = x
                        als[kept] = als[j]
                        kept += 1 if x > pivot else 0
                else:
                    # every undecided coordinate with t_i >= pivot is free
                    q_free += q_gt + q_eq
                    has_free = True  # the pivot's coordinate at least
                    seg_hi = pivot
                    kept = 0
                    for j in range(m):
                        x = tbs[j]
                        tbs[kept] = x
                        als[kept] = als[j]
                        kept += 1 if x < pivot else 0
                m = kept
            if not has_free:
                out[b, k] = np.inf  # the corner lies inside the ball
                continue
            if rho2 == np.inf:
                out[b, k] = np.inf  # the ball is everything: the box alone decides
                continue
            if rho2 == 0.0:
                out[b, k] = 0.0  # the set is {z}
                continue
            if q_free < 1e-200:
                # free |c_i| this small may have underflowed in the squares: recompute the norm
                # scaled by the largest free |c_i| (free: t_i > seg_lo, or every c_i != 0 when
                # nothing is saturated; t_i is recomputed exactly as above)
                f_max = 0.0
                for i in range(n):
                    ci = np.float64(c[b, k, i])
                    ai = abs(ci) / c_scale
                    if ai > 0.0 and (not any_sat or (down[i] if ci > 0.0 else up[i]) / ai > seg_lo):
                        f_max = max(f_max, ai)
                acc = 0.0
                for i in range(n):
                    ci = np.float64(c[b, k, i])
                    ai = abs(ci) / c_scale
                    if ai > 0.0 and (not any_sat or (down[i] if ci > 0.0 else up[i]) / ai > seg_lo):
                        acc += (ai / f_max) * (ai / f_max)
                free_norm = math.sqrt(acc) * f_max
            else:
                free_norm = math.sqrt(q_free)
            t = math.sqrt(max(rho2 - d_sat, 0.0)) / free_norm
            t = min(max(t, seg_lo), seg_hi)
            out[b, k] = t * r_scale / c_scale


def optimal_point(z, rho, lower, upper, c, t=None):
    """The minimiser ``p(t) = clip(z - t c, l, u)`` (B, K, n) over the widened box; ``t = solve_t(...)`` by default.

    At ``t = inf`` this is the box corner (``l`` where ``c > 0``, ``u`` where ``c < 0``, ``z`` where
    ``c == 0``); at ``t = 0`` it is ``z``. For ``t = t*`` it lies in the box and in the ball.
    """
    if t is None:
        t = solve_t(z, rho, lower, upper, c)
    return _point(z, *_widen_box(z, lower, upper), c, t.detach())


def _point(z, lo, hi, c, t):
    # t = inf stands for "far enough": the largest float sends every coordinate with
    # |c_i| >= d_i / finfo.max to its face (z - t c may overflow to +-inf, which clamp takes to
    # the face), i.e. exactly the box corner for every c that is not subnormal-small, and keeps
    # c_i == 0 at z with no inf * 0.
    t = torch.where(torch.isinf(t), torch.finfo(t.dtype).max, t).unsqueeze(-1)
    return torch.clamp(z.unsqueeze(-2) - t * c, lo.unsqueeze(-2), hi.unsqueeze(-2))


def _dual_value(z, lo, hi, c, t, rho2):
    """``c·p + (||p - z||^2 - rho^2) / (2 t)`` at ``p = clip(z - t c, lo, hi)`` (no penalty at t = inf or 0)."""
    p = _point(z, lo, hi, c, t)  # t = 0: p = z
    value = (c * p).sum(-1)
    # mu = 1/t for 0 < t < inf. mu = 0 (t = inf) drops the penalty, which may be -inf (rho = inf):
    # select, don't multiply. Divide by t rather than multiply by 1/t: 1/t overflows for
    # subnormal t.
    scaled = torch.isfinite(t) & (t > 0)
    penalty = (((p - z.unsqueeze(-2)) ** 2).sum(-1) - rho2) / (2 * torch.where(scaled, t, 1.0))
    return value + torch.where(scaled, penalty, 0.0)


class _DualValue(torch.autograd.Function):
    """``_dual_value`` with its gradient written out: the chain rule autograd would apply to it,
    with ``p`` recomputed in backward rather than stored (tests/test_solver.py compares both)."""

    @staticmethod
    def forward(ctx, z, lo, hi, c, t, rho2, weight=None, ref=None):
        # c = W[ref] - W (the last layer's margins, bcpc.margins.spec) is (B, K, n), K times the
        # layer's input: kept as W and ref and rebuilt in backward (W is a parameter, kept anyway)
        ctx.rebuild = weight is not None
        ctx.save_for_backward(z, lo, hi, *((weight, ref) if ctx.rebuild else (c,)), t, rho2)
        return _dual_value(z, lo, hi, c, t, rho2)

    @staticmethod
    def backward(ctx, g):
        if ctx.rebuild:
            z, lo, hi, weight, ref, t, rho2 = ctx.saved_tensors
            c = weight[ref].unsqueeze(1) - weight.unsqueeze(0)
        else:
            z, lo, hi, c, t, rho2 = ctx.saved_tensors
        scaled = torch.isfinite(t) & (t > 0)
        t_div = torch.where(scaled, t, 1.0)  # (B, K)
        t_far = torch.where(torch.isinf(t), torch.finfo(t.dtype).max, t).unsqueeze(-1)
        zz, lo3, hi3 = z.unsqueeze(-2), lo.unsqueeze(-2), hi.unsqueeze(-2)
        x = zz - t_far * c
        p = torch.clamp(x, lo3, hi3)
        g_pen = torch.where(scaled, g / t_div, 0.0).unsqueeze(-1)  # d value / d (||p - z||^2 / 2)
        dev = p - zz
        g_p = g.unsqueeze(-1) * c + g_pen * dev  # d value / d p
        inside = (x >= lo3) & (x <= hi3)  # torch.clamp's backward: the input where it is kept
        g_x = torch.where(inside, g_p, 0.0)
        g_z = g_x.sum(-2) - (g_pen * dev).sum(-2) if ctx.needs_input_grad[0] else None
        g_lo = torch.where(x < lo3, g_p, 0.0).sum(-2) if ctx.needs_input_grad[1] else None
        g_hi = torch.where(x > hi3, g_p, 0.0).sum(-2) if ctx.needs_input_grad[2] else None
        g_c = g.unsqueeze(-1) * p - t_far * g_x if ctx.needs_input_grad[3] else None
        g_rho2 = (-g_pen.squeeze(-1) / 2).sum(-1, keepdim=True) if ctx.needs_input_grad[5] else None
        return g_z, g_lo, g_hi, g_c, None, g_rho2, None, None


def dual_margin_lower(z, rho, lower, upper, c, offset, t, c_from=None):
    """A certified lower bound ``g(1/t)`` (B, K) on ``min c·p + offset`` over ball ∩ box, valid for every ``t`` in ``[0, inf]``.

    ``g(mu) = min_{p in box} c·p + mu/2 (||p - z||^2 - rho^2) + offset`` with ``mu = 1/t``. For any
    feasible ``p`` the penalty is ``<= 0``, so ``g(mu)`` is below the objective at every feasible
    point (weak duality). The inner minimum is separable and convex per coordinate, attained at
    ``clip(z - t c, l, u)``. Limits: ``t = inf`` (``mu = 0``) is the box-only minimum (the corner);
    ``t = 0`` (``mu = inf``) is ``c·z`` when ``rho == 0`` (the set is ``{z}``) and ``-inf`` otherwise.
    ``t`` is detached: gradients are those of the dual at fixed ``mu``, which equal those of the
    optimum at ``t = t*`` (Danskin). ``c_from = (W, ref)``: ``c`` is ``W[ref] - W`` (rebuilt in
    backward instead of kept).

    The corner at ``t = inf`` is reached through ``t = finfo.max``: exact for every ``c_i`` with
    ``|c_i| >= d_i / finfo.max``; a smaller (subnormal-range) ``c_i`` stops short of its face and
    overstates the bound by at most ``|c_i| d_i < d_i^2 / finfo.max``, far below rounding of ``c·p``.
    """
    if rho is None:
        rho = torch.full(z.shape[:1], math.inf, dtype=z.dtype, device=z.device)
    lo, hi = _widen_box(z, lower, upper)
    t = t.detach()
    rho2 = (rho * rho).unsqueeze(-1)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (z, lo, hi, c, rho2)):
        # same numbers; the backward is written out (Danskin at fixed t), keeping only c and the
        # (B, n) inputs instead of four (B, K, n) intermediates of autograd's
        value = _DualValue.apply(z, lo, hi, c, t, rho2, *(c_from or ()))
    else:
        value = _dual_value(z, lo, hi, c, t, rho2)
    value = torch.where((t == 0) & (rho2 > 0), -math.inf, value)
    value = _add_offset(value, offset)
    return _poison(
        value,
        per_sample=(rho, lower, upper),
        per_pair=(t,),
        finite_per_sample=(z,),
        finite_per_pair=(c, offset),
    )


def lipschitz_margin_lower(z, rho, c, offset):
    """Certified ``min c·p + offset`` over the ball alone: ``c·z - rho ||c|| + offset`` (B, K), exact for the ball.

    Cauchy–Schwarz: ``c·(p - z) >= -||c|| ||p - z|| >= -rho ||c||``, attained at ``z - rho c/||c||``.
    """
    value = (c * z.unsqueeze(-2)).sum(-1) - rho.unsqueeze(-1) * torch.linalg.vector_norm(c, dim=-1)
    value = _add_offset(value, offset)
    return _poison(value, per_sample=(rho,), finite_per_sample=(z,), finite_per_pair=(c, offset))


def box_margin_lower(lower, upper, c, offset):
    """Certified ``min c·p + offset`` over the box alone: ``c·mid - |c|·rad + offset`` (B, K), exact for the box.

    Computed as ``sum_i c_i (l_i if c_i > 0 else u_i)``, the same number without forming mid/rad,
    so no rounding is added. ``c_i == 0`` picks ``u_i`` with weight 0.
    """
    lo, hi = lower.unsqueeze(-2), upper.unsqueeze(-2)
    value = torch.where(c > 0, c * lo, c * hi).sum(-1)
    value = _add_offset(value, offset)
    return _poison(value, per_sample=(lower, upper), finite_per_pair=(c, offset))


def margin_lower(z, rho, lower, upper, c, offset, c_from=None):
    """Certified lower bound (B, K) on ``min c·p + offset`` over ``ball(z, rho) ∩ box[lower, upper]``; exact and differentiable.

    Shapes: z (B, n); rho (B,) >= 0; lower, upper (B, n); c (B, K, n); offset (B, K) or None (0).
    - ``lower = upper = None``: ball only, the Lipschitz bound ``c·z - rho ||c|| + offset``;
    - ``rho = None``: box only, ``c·mid - |c|·rad + offset`` (``z`` may then be None);
    - otherwise the exact ball ∩ box optimum: ``t* = solve_t(...)`` under no_grad, then the dual
      value at ``mu = 1/t*`` (``dual_margin_lower``), sound for any ``t`` and exact at ``t*``.

    Handled: ``z`` a hair outside the box (box widened to contain it), ``c == 0`` rows (= offset),
    ``rho == 0`` (= ``c·z + offset``), degenerate boxes ``l == u``, infinite box sides and
    ``rho = inf``. ``c_from = (W, ref)``: ``c`` is ``W[ref] - W`` (bcpc.margins.spec), rebuilt in
    backward rather than kept. NaN in any input, or a non-finite ``z``, ``c`` or ``offset``, gives NaN in the
    affected entries — never a number. Call ``check_finite`` on the certification path to raise.
    Batched, no Python loops over samples or classes, no host-device sync.
    """
    if (lower is None) != (upper is None):
        raise ValueError("margin_lower: give both lower and upper, or neither (ball only)")
    if rho is None and lower is None:
        raise ValueError("margin_lower: need a ball (rho) or a box (lower, upper), got neither")
    if rho is None:
        return box_margin_lower(lower, upper, c, offset)
    if lower is None:
        return lipschitz_margin_lower(z, rho, c, offset)
    t = solve_t(z, rho, lower, upper, c)
    # For rho > 0 the true t* is > 0; a computed 0 can only be underflow (rho / max|c| below the
    # smallest float) and would select the rho == 0 answer c·z, which is not a bound for rho > 0.
    # Any t > 0 is a sound dual point, so nudge it off zero.
    tiny = torch.finfo(t.dtype).tiny
    t = torch.where(rho.unsqueeze(-1) > 0, t.clamp_min(tiny), t)
    return dual_margin_lower(z, rho, lower, upper, c, offset, t, c_from)


def check_finite(z=None, rho=None, lower=None, upper=None, c=None, offset=None):
    """Raise ``ValueError`` naming the first argument that holds NaN/Inf (or a negative ``rho``); ``None`` skips it.

    Same argument order as ``margin_lower``. All arguments must be finite on the certification
    path: an infinite box side or radius means an upstream bound blew up, and a certificate built
    on it is meaningless. Costs one host-device sync for all arguments together.
    """
    named = [("z", z), ("rho", rho), ("lower", lower), ("upper", upper), ("c", c), ("offset", offset)]
    present = [(name, x) for name, x in named if x is not None]
    if not present:
        return
    flags = [(~torch.isfinite(torch.as_tensor(x))).any() for _, x in present]
    checks = [f"{name} contains NaN or Inf" for name, _ in present]
    if rho is not None:
        flags.append((torch.as_tensor(rho) < 0).any())
        checks.append("rho is negative")
    # one sync for every check together
    device = flags[0].device
    hits = torch.stack([f.to(device) for f in flags]).tolist()
    failed = [msg for msg, hit in zip(checks, hits) if hit]
    if failed:
        raise ValueError("margin bound inputs are not usable: " + "; ".join(failed))


# --------------------------------------------------------------------------------------------
# the paper's iterative projection (Algorithm 1), an independent oracle
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _iterative_projection_kernel(z, rho, lo, hi, c, out):
    batch, classes, n = c.shape
    p = np.empty(n)
    on_box = np.empty(n, dtype=np.bool_)
    for b in range(batch):
        r2 = rho[b] * rho[b]
        for k in range(classes):
            cn2 = 0.0
            for i in range(n):
                cn2 += c[b, k, i] * c[b, k, i]
            if cn2 == 0.0:
                out[b, k] = 0.0
                continue
            # start at the ball-only optimum z - rho c/||c||
            step = rho[b] / math.sqrt(cn2)
            for i in range(n):
                p[i] = z[b, i] - step * c[b, k, i]
            converged = False
            for _ in range(n + 2):  # I only grows, so at most n rounds (Prop. 2)
                inside = True
                for i in range(n):
                    if p[i] < lo[b, i] or p[i] > hi[b, i]:
                        inside = False
                        break
                if inside:
                    converged = True
                    break
                # first phase: I = {i: |p_i - m_i| >= r_i}, project p[I] onto the box
                sat = 0.0
                free = 0.0
                for i in range(n):
                    if p[i] <= lo[b, i]:
                        p[i] = lo[b, i]
                        on_box[i] = True
                    elif p[i] >= hi[b, i]:
                        p[i] = hi[b, i]
                        on_box[i] = True
                    else:
                        on_box[i] = False
                    diff = p[i] - z[b, i]
                    if on_box[i]:
                        sat += diff * diff
                    else:
                        free += diff * diff
                # second phase: rescale p[I^c] about z by eta (eq. 12), back onto the sphere
                if free > 0.0:
                    # ratio of norms, not sqrt of a ratio: rho^2 / free overflows for tiny free
                    eta = math.sqrt(max(r2 - sat, 0.0)) / math.sqrt(free)
                    for i in range(n):
                        if not on_box[i] and p[i] != z[b, i]:  # c_i == 0 stays at z (no inf * 0)
                            p[i] = z[b, i] + eta * (p[i] - z[b, i])
            if not converged:
                out[b, k] = math.nan  # an oracle that did not finish must not pass for a value
                continue
            val = 0.0
            for i in range(n):
                val += c[b, k, i] * p[i]
            out[b, k] = val


def _as_f64(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float64)


def iterative_projection(z, rho, lower, upper, c):
    """The optimal values ``min c·p`` (B, K) over ball ∩ box, WITHOUT offset, by the paper's Algorithm 1 (float64 numpy).

    Start at ``z - rho c/||c||``; repeat: ``I`` = coordinates on or outside the box, project
    ``p[I]`` onto the box, rescale ``p[I^c]`` about ``z`` by ``eta`` (eq. 12) so ``p`` is back on
    the sphere; stop when ``p`` is inside the box. ``I`` only grows, so this ends within ``n``
    rounds (Prop. 2); a non-finished problem returns NaN. An independent oracle for ``solve_t``:
    numba, float64, explicit loops, single thread. The box is widened to contain ``z`` exactly as
    in ``margin_lower``; ``lower``/``upper`` may be ``None`` (ball only). Inputs: torch or numpy.
    """
    z = _as_f64(z)
    rho = _as_f64(rho).reshape(-1)
    c = _as_f64(c)
    lo = np.full_like(z, -np.inf) if lower is None else _as_f64(lower)
    hi = np.full_like(z, np.inf) if upper is None else _as_f64(upper)
    lo, hi = np.minimum(lo, z), np.maximum(hi, z)
    out = np.empty(c.shape[:2], dtype=np.float64)
    _iterative_projection_kernel(z, rho, lo, hi, c, out)
    return out

"""The numba ``solve_t`` (CPU, selection search) gives the same margins as the torch path (sort).

Both paths solve for the same ``t*``; the certified value is the dual at that ``t``
(``dual_margin_lower``), so the check is on margins: float64, relative to the size of the terms of
``c·p`` (as in test_solver.py). Random problems mix in every case the torch path handles
specially: ``c_i == 0`` (and whole ``c == 0`` rows), ``d_i == 0`` (``z`` on a face, ``l == u``),
infinite box sides, ``rho`` in ``{0, inf}``, ``z`` a hair outside the box, tied breakpoints.
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcpc import solver
from bcpc.solver import box_margin_lower, dual_margin_lower, iterative_projection, margin_lower, solve_t

F64 = torch.float64
RTOL = 1e-9

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# small integers and halves make ties between breakpoints and zero entries likely
coef = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0, -0.5]), st.floats(-3, 3, allow_subnormal=False))
gap = st.one_of(st.sampled_from([0.0, 0.5, 1.0, math.inf]), st.floats(0, 3))
rho_factor = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.5, math.inf]), st.floats(0, 1.6))
nudge = st.sampled_from([0.0, 0.0, 0.0, 1e-12, -1e-12])  # z a hair outside [l, u]


@st.composite
def problems(draw, max_n=40, max_b=3, max_k=4):
    """(z, rho, lower, upper, c) float64; rho scaled to class 0's box-corner distance (finite sides)."""
    b = draw(st.integers(1, max_b))
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))

    def arr(elem, shape):
        size = int(np.prod(shape))
        return np.array(draw(st.lists(elem, min_size=size, max_size=size)), dtype=np.float64).reshape(shape)

    z = arr(st.floats(-2, 2), (b, n))
    lower = z - arr(gap, (b, n))
    upper = z + arr(gap, (b, n))
    z = z + arr(nudge, (b, n))  # after the box: may leave it by 1e-12 (a degenerate side too)
    c = arr(coef, (b, k, n))
    if draw(st.booleans()):
        c[draw(st.integers(0, b - 1)), draw(st.integers(0, k - 1))] = 0.0  # a c == 0 row
    d = np.where(c[:, 0] > 0, z - lower, upper - z)
    d = np.where((c[:, 0] != 0) & np.isfinite(d), d, 0.0)
    corner = np.sqrt((d**2).sum(-1))
    corner = np.where(corner > 0, corner, 1.0)
    rho = arr(rho_factor, (b,)) * corner
    return tuple(torch.tensor(x, dtype=F64) for x in (z, rho, lower, upper, c))


def scale_of(z, rho, lower, upper, c):
    """Magnitude of the terms in c·p (finite parts): the tolerance is relative to this."""
    reach = torch.maximum((upper - z).abs(), (z - lower).abs())
    reach = torch.where(torch.isfinite(reach), reach, 0.0) + z.abs()
    r = torch.where(torch.isfinite(rho), rho, 0.0)
    return 1.0 + (c.abs() * reach.unsqueeze(1)).sum(-1) + r.unsqueeze(-1) * c.norm(dim=-1)


def assert_same_margins(prob, rtol=RTOL):
    """Kernel and torch margins agree where rho is finite; where rho = inf the kernel gives the box optimum.

    ``rho = inf`` is treated apart: the kernel returns ``t = inf`` (the box alone) outright, while
    the torch path can stop at a huge finite breakpoint when ``(t_j ||c||)^2`` overflows (a free
    ``|c_i|`` ~1e-200 next to an unbounded side), and its dual then reads ``inf - inf`` (NaN) or
    ``-inf``: no certificate either way, but not the box optimum the kernel gives.
    """
    z, rho, lower, upper, c = prob
    off = torch.zeros(c.shape[:2], dtype=c.dtype)
    t_torch = solver._solve_t_torch(z, rho, lower, upper, c)
    t_kernel = solver._solve_t_cpu(z, rho, lower, upper, c)
    assert t_kernel.dtype == t_torch.dtype and t_kernel.shape == t_torch.shape
    assert not torch.isnan(t_kernel).any()
    assert torch.all(t_kernel >= 0)
    ref = dual_margin_lower(z, rho, lower, upper, c, off, t_torch)
    got = dual_margin_lower(z, rho, lower, upper, c, off, t_kernel)
    assert not torch.isnan(got).any()
    tol = rtol * scale_of(z, rho, lower, upper, c)
    ball = torch.isfinite(rho).unsqueeze(-1).expand_as(ref)
    # finite rho: the same values, the same -inf (none expected: the ball is bounded)
    assert torch.equal(torch.isfinite(ref[ball]), torch.isfinite(got[ball])), (ref, got)
    fin = ball & torch.isfinite(ref)
    assert torch.all((ref - got).abs()[fin] <= tol[fin]), (ref, got, t_torch, t_kernel)
    # rho = inf: t = inf, and the margin is the box-only optimum wherever that is finite
    assert torch.all(torch.isinf(t_kernel[~ball]))
    box = box_margin_lower(torch.minimum(lower, z), torch.maximum(upper, z), c, off)
    fin = ~ball & torch.isfinite(box)
    assert torch.all((box - got).abs()[fin] <= tol[fin]), (box, got)


@SETTINGS
@given(problems())
def test_kernel_margins_equal_torch_margins(prob):
    assert_same_margins(prob)


@SETTINGS
@given(problems(max_n=6, max_b=2, max_k=3))
def test_kernel_margins_equal_iterative_projection(prob):
    """Against the independent oracle too, where its inputs are finite (it takes no infinite rho)."""
    z, rho, lower, upper, c = prob
    if not torch.isfinite(rho).all():
        rho = torch.where(torch.isfinite(rho), rho, 1e3)
    t = solver._solve_t_cpu(z, rho, lower, upper, c)
    got = dual_margin_lower(z, rho, lower, upper, c, None, t).numpy()
    ref = iterative_projection(z, rho, lower, upper, c)
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), fin)
    tol = RTOL * scale_of(z, rho, lower, upper, c).numpy()
    assert np.all(np.abs(got - ref)[fin] <= tol[fin])


@SETTINGS
@given(problems(max_n=12), st.floats(1e-150, 1e150), st.floats(1e-150, 1e150))
def test_kernel_is_scale_invariant_like_torch(prob, s_c, s_x):
    """Scaling c and (z, rho, l, u) by extreme factors changes neither path's margin beyond rounding."""
    z, rho, lower, upper, c = prob
    assert_same_margins((z * s_x, rho * s_x, lower * s_x, upper * s_x, c * s_c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(50, 10, 512), (7, 3, 100), (1, 1, 1)])
def test_kernel_at_training_sizes(dtype, shape):
    gen = torch.Generator().manual_seed(3)
    b, k, n = shape
    z = torch.randn(b, n, generator=gen, dtype=F64)
    lower = z - torch.rand(b, n, generator=gen, dtype=F64)
    upper = z + torch.rand(b, n, generator=gen, dtype=F64)
    c = torch.randn(b, k, n, generator=gen, dtype=F64)
    c[0, 0] = 0  # the reference class's own row in bcpc.margins
    d = torch.where(c > 0, z.unsqueeze(1) - lower.unsqueeze(1), upper.unsqueeze(1) - z.unsqueeze(1))
    rho = d.norm(dim=-1)[:, -1] * torch.linspace(0.05, 1.2, b, dtype=F64)
    prob = tuple(x.to(dtype) for x in (z, rho, lower, upper, c))
    # float32: the torch path rounds in float32, the kernel in float64; compare both in float64
    t_torch = solver._solve_t_torch(*prob)
    t_kernel = solver._solve_t_cpu(*prob)
    assert t_kernel.dtype == dtype
    p64 = tuple(x.double() for x in prob)
    ref = dual_margin_lower(*p64, None, t_torch.double())
    got = dual_margin_lower(*p64, None, t_kernel.double())
    rtol = 1e-9 if dtype == F64 else 1e-5
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale_of(*p64).max().item())


def test_nan_inputs_give_nan_t():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 5, generator=gen, dtype=F64)
    lower, upper = z - 1, z + 1
    c = torch.randn(3, 2, 5, generator=gen, dtype=F64)
    rho = torch.ones(3, dtype=F64)
    z[0, 1] = math.nan
    rho[1] = math.nan
    c[2, 0, 3] = math.nan
    t = solver._solve_t_cpu(z, rho, lower, upper, c)
    assert torch.isnan(t[0]).all() and torch.isnan(t[1]).all() and torch.isnan(t[2, 0])
    assert torch.isfinite(t[2, 1])
    c[2, 1, 0] = math.inf  # an infinite c has no usable t either
    assert torch.isnan(solver._solve_t_cpu(z, rho, lower, upper, c)[2, 1])


def test_dispatch(monkeypatch):
    """CPU float32/float64 take the kernel; BCPC_FUSED=0, other dtypes and odd shapes take torch."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 6, generator=gen, dtype=F64)
    lower, upper, c, rho = z - 1, z + 1, torch.randn(2, 3, 6, generator=gen, dtype=F64), torch.ones(2, dtype=F64)
    monkeypatch.delenv("BCPC_FUSED", raising=False)
    assert solver._kernel_applies(z, rho, lower, upper, c)
    assert solver._kernel_applies(z.float(), rho.float(), None, None, c.float())
    assert not solver._kernel_applies(z.half(), rho.half(), lower.half(), upper.half(), c.half())
    assert not solver._kernel_applies(z.float(), rho, lower, upper, c)  # mixed dtypes
    assert not solver._kernel_applies(z[:1], rho[:1], lower[:1], upper[:1], c)  # broadcast batch
    monkeypatch.setenv("BCPC_FUSED", "0")
    assert not solver._kernel_applies(z, rho, lower, upper, c)
    torch_t = solve_t(z, rho, lower, upper, c)
    monkeypatch.delenv("BCPC_FUSED")
    torch.testing.assert_close(solve_t(z, rho, lower, upper, c), torch_t, rtol=1e-12, atol=0)
    # gradients flow through margin_lower on the kernel path as on the torch path
    zz = z.clone().requires_grad_()
    margin_lower(zz, rho, lower, upper, c, None).sum().backward()
    assert torch.isfinite(zz.grad).all()
    assert os.environ.get("BCPC_FUSED") is None

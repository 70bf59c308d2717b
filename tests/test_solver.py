"""The last-layer ball ∩ box solver gives the exact optimum, a sound dual bound, and the optimum's gradient.

Three independent methods must agree (float64, ~1e-9 relative): the sort-based exact solver
(``margin_lower``), the paper's iterative projection (``iterative_projection``, numba), and
``brute_force`` below (enumeration of which box face every coordinate sits on). Soundness is also
checked against sampled feasible points, tightness against hand-computed values.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcpc import solver
from bcpc.solver import (
    box_margin_lower,
    check_finite,
    dual_margin_lower,
    iterative_projection,
    lipschitz_margin_lower,
    margin_lower,
    optimal_point,
    solve_t,
)

F64 = torch.float64
RTOL = 1e-9


def brute_force(z, rho, lower, upper, c):
    """Exact ``min c·p`` over ball(z, rho) ∩ box[lower, upper] for small n, by face enumeration.

    Method (independent of the sort and of the iterative projection): a minimiser ``p*`` has each
    coordinate at ``lower``, at ``upper``, or strictly inside the box. Fix such a pattern; the
    inside coordinates ``F`` then minimise ``c_F·p_F`` over the remaining ball of radius
    ``sqrt(rho^2 - S)`` (``S`` = squared distance of the fixed coordinates) — locally, hence
    globally, by convexity — so ``p*_F = z_F - sqrt(rho^2 - S) c_F/||c_F||`` (or anything, e.g.
    ``z_F``, with the same value, when ``c_F = 0``). Every pattern's candidate that is feasible is
    an upper bound, and ``p*``'s pattern yields ``p*``'s value, so the minimum over all 3^n
    patterns' feasible candidates is the optimum. z must lie in the box.
    """
    z, lower, upper, c = (np.asarray(x, dtype=np.float64) for x in (z, lower, upper, c))
    rho = float(rho)
    n = z.shape[0]
    tol = 1e-12 * (1.0 + rho + np.abs(z).sum() + np.abs(lower).sum() + np.abs(upper).sum())
    best = math.inf
    for pattern in itertools.product((-1, 0, 1), repeat=n):
        pattern = np.array(pattern)
        fixed = pattern != 0
        p = np.where(pattern < 0, lower, np.where(pattern > 0, upper, z))
        spent = float(((p - z)[fixed] ** 2).sum())
        if math.sqrt(spent) > rho + tol:  # compare distances, not squares: tol^2 would be far too loose
            continue
        cf2 = float((c[~fixed] ** 2).sum())
        if cf2 > 0:
            step = math.sqrt(max(rho * rho - spent, 0.0)) / math.sqrt(cf2)
            p = np.where(fixed, p, z - step * c)
        if np.all(p >= lower - tol) and np.all(p <= upper + tol):
            best = min(best, float(c @ p))
    return best


# ---------------------------------------------------------------------------------------------
# random problems: small integers make ties between breakpoints and zero entries likely
# ---------------------------------------------------------------------------------------------

# Subnormal c_i are left out: t* ~ d_i/|c_i| then overflows, so p(t*) is not representable (the
# bound itself stays sound through the dual, only the feasibility check of the point would fail).
coef = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0, -0.5]), st.floats(-3, 3, allow_subnormal=False))
gap = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 3))
rho_factor = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.5]), st.floats(0, 1.6))


@st.composite
def problems(draw, max_n=6, max_b=2, max_k=3):
    """(z, rho, lower, upper, c) float64 tensors; z inside the box; rho scaled to class 0's box-corner distance."""
    b = draw(st.integers(1, max_b))
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))

    def arr(elem, shape):
        return np.array(draw(st.lists(elem, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))).reshape(shape)

    z = arr(st.floats(-2, 2), (b, n))
    lower = z - arr(gap, (b, n))
    upper = z + arr(gap, (b, n))
    c = arr(coef, (b, k, n))
    # distance from z to the box corner of class 0: rho around it covers t* finite and t* = inf
    d = np.where(c[:, 0] > 0, z - lower, upper - z) * (c[:, 0] != 0)
    corner = np.sqrt((d**2).sum(-1))
    corner = np.where(corner > 0, corner, 1.0)
    rho = arr(rho_factor, (b,)) * corner
    return tuple(torch.tensor(x, dtype=F64) for x in (z, rho, lower, upper, c))


def scale_of(z, rho, lower, upper, c):
    """Magnitude of the terms in c·p: the tolerance is relative to this."""
    reach = torch.maximum((upper - z).abs(), (z - lower).abs()) + z.abs()
    return 1.0 + (c.abs() * reach.unsqueeze(1)).sum(-1) + rho.unsqueeze(-1) * c.norm(dim=-1)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(problems())
def test_exact_equals_iterative_equals_brute_force(prob):
    z, rho, lower, upper, c = prob
    exact = margin_lower(z, rho, lower, upper, c, torch.zeros(c.shape[:2], dtype=F64)).numpy()
    iterative = iterative_projection(z, rho, lower, upper, c)
    tol = RTOL * scale_of(*prob).numpy()
    brute = np.array(
        [[brute_force(z[i], rho[i], lower[i], upper[i], c[i, j]) for j in range(c.shape[1])] for i in range(c.shape[0])]
    )
    np.testing.assert_array_less(np.abs(exact - brute), tol)
    np.testing.assert_array_less(np.abs(iterative - brute), tol)


@SETTINGS
@given(problems(), st.integers(0, 2**32 - 1))
def test_optimal_point_is_feasible_and_no_sampled_point_is_lower(prob, seed):
    z, rho, lower, upper, c = prob
    t = solve_t(*prob)
    p = optimal_point(*prob, t=t)  # (B, K, n)
    tol = RTOL * scale_of(*prob)
    assert torch.all(p >= lower.unsqueeze(1) - 1e-12) and torch.all(p <= upper.unsqueeze(1) + 1e-12)
    dist = (p - z.unsqueeze(1)).norm(dim=-1)
    assert torch.all(dist <= rho.unsqueeze(-1) * (1 + 1e-9) + 1e-12)
    # the minimiser is the box corner exactly when the corner lies inside the ball (t* = inf;
    # solve_t may return a huge finite t instead when |c_i| / max|c| < 1e-154 makes c_i^2
    # underflow — the point, and the bound, are the same)
    lo, hi, zz = lower.unsqueeze(1), upper.unsqueeze(1), z.unsqueeze(1)
    d = torch.where(c > 0, zz - lo, hi - zz)
    d = torch.where(c != 0, d, 0.0)
    d_max = d.amax(-1, keepdim=True).clamp_min(1e-300)
    corner_dist = (d / d_max).norm(dim=-1) * d_max.squeeze(-1)  # scaled: d^2 may underflow
    corner = torch.where(c > 0, lo, torch.where(c < 0, hi, zz))
    r = rho.unsqueeze(-1)
    inside = corner_dist < r * (1 - 1e-9)
    assert torch.equal(p[inside], corner[inside])
    assert torch.all(torch.isfinite(t)[corner_dist > r * (1 + 1e-9)])
    bound = margin_lower(*prob, None)
    # primal value at p(t*) equals the dual value returned: the bound is attained
    assert torch.all(((c * p).sum(-1) - bound).abs() <= tol)

    # Feasible samples without rejection: clipping towards a box that contains z never moves a
    # point further from z, so clip(z + s rho u) stays in the ball for |u| = 1, s in [0, 1].
    gen = torch.Generator().manual_seed(seed)
    m = 256
    u = torch.randn(m, *z.shape, generator=gen, dtype=F64)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    s = torch.rand(m, z.shape[0], 1, generator=gen, dtype=F64)
    s[: m // 2] = 1.0  # half on the sphere before clipping
    pts = torch.minimum(torch.maximum(z + s * rho[:, None] * u, lower), upper)  # (m, B, n)
    vals = torch.einsum("mbn,bkn->mbk", pts, c)
    assert torch.all(vals >= bound - tol)


@SETTINGS
@given(problems())
def test_exact_is_at_least_ball_only_and_box_only(prob):
    z, rho, lower, upper, c = prob
    off = torch.zeros(c.shape[:2], dtype=F64)
    exact = margin_lower(z, rho, lower, upper, c, off)
    tol = RTOL * scale_of(*prob)
    assert torch.all(exact >= margin_lower(z, rho, None, None, c, off) - tol)
    assert torch.all(exact >= margin_lower(z, None, lower, upper, c, off) - tol)


@SETTINGS
@given(problems(), st.data())
def test_dual_bound_is_sound_for_every_t(prob, data):
    z, rho, lower, upper, c = prob
    b, k = c.shape[:2]
    off = torch.zeros(b, k, dtype=F64)
    exact = margin_lower(z, rho, lower, upper, c, off)
    t_star = solve_t(*prob)
    ts = data.draw(st.lists(st.one_of(st.sampled_from([0.0, math.inf]), st.floats(0, 10)), min_size=b * k, max_size=b * k))
    for t in (torch.tensor(ts, dtype=F64).reshape(b, k), t_star * 1.01, t_star * 0.99):
        dual = dual_margin_lower(z, rho, lower, upper, c, off, t)
        assert not torch.isnan(dual).any()
        assert torch.all(dual <= exact + RTOL * scale_of(*prob))
    # and the dual at t* is the optimum itself
    torch.testing.assert_close(dual_margin_lower(z, rho, lower, upper, c, off, t_star), exact, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# tightness pins: hand-computed, n = 2 unless stated, rho = 1, offset 0
# ---------------------------------------------------------------------------------------------

S3 = math.sqrt(3) / 2
PINS = [
    # id, z, lower, upper, c, (exact, ball only, box only), t*
    # corner (-1/2, -1/2) lies in the unit ball: the box decides
    ("corner_in_ball", [0, 0], [-0.5, -0.5], [0.5, 0.5], [1, 1], (-1.0, -math.sqrt(2), -1.0), math.inf),
    # box far away: the ball decides
    ("box_inactive", [0, 0], [-2, -2], [2, 2], [1, 1], (-math.sqrt(2), -math.sqrt(2), -4.0), 1 / math.sqrt(2)),
    # x saturates at t = 1/2, then 1/4 + t^2 = 1: p = (-1/2, -sqrt(3)/2); strictly between both
    ("one_face", [0, 0], [-0.5, -2], [0.5, 2], [1, 1], (-0.5 - S3, -math.sqrt(2), -2.5), S3),
    # ball optimum -(3, 4)/5 is inside the box
    ("ball_inside_box", [0, 0], [-1, -1], [1, 1], [3, 4], (-5.0, -5.0, -7.0), 0.2),
    # c_y = 0: only x moves, stops at its face
    ("zero_coordinate", [0, 0], [-0.5, -0.5], [0.5, 0.5], [1, 0], (-0.5, -1.0, -0.5), math.inf),
    # z on the lower x face: x cannot move, y takes the whole radius
    ("z_on_face", [-0.5, 0], [-0.5, -2], [0.5, 2], [1, 1], (-1.5, -0.5 - math.sqrt(2), -2.5), 1.0),
    # negative c points to the upper faces; ties: both breakpoints at t = 1/2, corner at distance
    # sqrt(1/2) < 1 -> the corner (1/2, 1/2)
    ("negative_c_tie", [0, 0], [-3, -3], [0.5, 0.5], [-1, -1], (-1.0, -math.sqrt(2), -1.0), math.inf),
    # degenerate box l = u = z on x: y alone
    ("degenerate_x", [0.25, 0], [0.25, -3], [0.25, 3], [2, -1], (0.5 - 1.0, 0.5 - math.sqrt(5), 0.5 - 3.0), 1.0),
    # z a hair outside: x = 0.6 above the box [-0.5, 0.5]; widened box [-0.5, 0.6] x [-0.5, 0.5].
    # y saturates at t = 1/2 (f = 1/4), then 1/4 + t^2 = 1 -> x = 0.6 - sqrt(3)/2. Box-only is
    # over the box as given (no z), ball-only ignores the box.
    ("z_outside_box", [0.6, 0], [-0.5, -0.5], [0.5, 0.5], [1, 1], (0.1 - S3, 0.6 - math.sqrt(2), -1.0), S3),
]


@pytest.mark.parametrize("name,z,lower,upper,c,expected,t_star", PINS, ids=[p[0] for p in PINS])
def test_pinned_tightness(name, z, lower, upper, c, expected, t_star):
    z, lower, upper = (torch.tensor([x], dtype=F64) for x in (z, lower, upper))
    c = torch.tensor([[c]], dtype=F64)
    rho = torch.ones(1, dtype=F64)
    off = torch.full((1, 1), 0.75, dtype=F64)  # the offset is added once, to every variant
    exact, ball, box = expected
    assert margin_lower(z, rho, lower, upper, c, off).item() == pytest.approx(exact + 0.75, abs=1e-15)
    assert margin_lower(z, rho, None, None, c, off).item() == pytest.approx(ball + 0.75, abs=1e-15)
    assert margin_lower(None, None, lower, upper, c, off).item() == pytest.approx(box + 0.75, abs=1e-15)
    assert iterative_projection(z, rho, lower, upper, c)[0, 0] == pytest.approx(exact, abs=1e-15)
    assert solve_t(z, rho, lower, upper, c).item() == pytest.approx(t_star, abs=1e-15)


def test_edge_cases_have_exact_answers():
    """c = 0 gives the offset; rho = 0 gives c·z; l = u = z gives c·z; unbounded box gives the ball bound."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=gen, dtype=F64)
    lower, upper = z - 1, z + 1
    c = torch.randn(3, 2, 4, generator=gen, dtype=F64)
    c[1, 0] = 0
    off = torch.randn(3, 2, generator=gen, dtype=F64)
    rho = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    out = margin_lower(z, rho, lower, upper, c, off)
    assert out[1, 0] == off[1, 0]  # c == 0
    cz = torch.einsum("bn,bkn->bk", z, c)
    torch.testing.assert_close(out[2], cz[2] + off[2], rtol=0, atol=1e-13)  # rho == 0
    torch.testing.assert_close(margin_lower(z, rho, z, z, c, off), cz + off, rtol=0, atol=1e-14)  # l == u
    inf = torch.full_like(z, math.inf)
    torch.testing.assert_close(  # infinite box sides: the ball alone
        margin_lower(z, rho, -inf, inf, c, off), lipschitz_margin_lower(z, rho, c, off), rtol=1e-13, atol=1e-13
    )
    torch.testing.assert_close(  # infinite radius: the box alone
        margin_lower(z, torch.full_like(rho, math.inf), lower, upper, c, off),
        box_margin_lower(lower, upper, c, off),
        rtol=1e-13,
        atol=1e-13,
    )


def test_runs_without_data_dependent_python():
    """On the meta device there is no data: any .item(), bool(tensor) or sync would raise here."""
    meta = dict(device="meta", dtype=F64)
    b, k, n = 4, 3, 7
    z, lower, upper = (torch.empty(b, n, **meta) for _ in range(3))
    rho, c, off = torch.empty(b, **meta), torch.empty(b, k, n, **meta), torch.empty(b, k, **meta)
    z.requires_grad_()
    out = margin_lower(z, rho, lower, upper, c, off)
    out.sum().backward()
    assert out.shape == (b, k) and z.grad.shape == (b, n)
    assert margin_lower(z, rho, None, None, c, off).shape == (b, k)
    assert margin_lower(None, None, lower, upper, c, off).shape == (b, k)


def test_float32_matches_float64():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 32, generator=gen, dtype=F64)
    lower, upper = z - torch.rand(8, 32, generator=gen, dtype=F64), z + torch.rand(8, 32, generator=gen, dtype=F64)
    c = torch.randn(8, 9, 32, generator=gen, dtype=F64)
    rho = torch.rand(8, generator=gen, dtype=F64) * 3
    off = torch.randn(8, 9, generator=gen, dtype=F64)
    ref = margin_lower(z, rho, lower, upper, c, off)
    got = margin_lower(*(x.float() for x in (z, rho, lower, upper, c, off)))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# gradients: envelope (Danskin) gradient == finite differences of the optimum at generic points
# ---------------------------------------------------------------------------------------------


def generic_problem(seed, rho_factor, reduce="amin"):
    """B=2, K=3, n=5; rho = rho_factor * (min | mean | max over classes of the box-corner distance)."""
    gen = torch.Generator().manual_seed(seed)
    b, k, n = 2, 3, 5
    z = torch.randn(b, n, generator=gen, dtype=F64)
    lower = z - 0.2 - torch.rand(b, n, generator=gen, dtype=F64)
    upper = z + 0.2 + torch.rand(b, n, generator=gen, dtype=F64)
    c = torch.randn(b, k, n, generator=gen, dtype=F64)
    c = torch.where(c.abs() < 0.2, c + 0.4 * c.sign(), c)  # no near-zero entries
    d = torch.where(c > 0, z.unsqueeze(1) - lower.unsqueeze(1), upper.unsqueeze(1) - z.unsqueeze(1))
    rho = rho_factor * getattr(d.norm(dim=-1), reduce)(-1)
    off = torch.randn(b, k, generator=gen, dtype=F64)
    return z, rho, lower, upper, c, off


def assert_generic(z, rho, lower, upper, c):
    """The test point must be away from kinks: t* not at a breakpoint, the corner not on the sphere."""
    t = solve_t(z, rho, lower, upper, c)
    d = torch.where(c > 0, z.unsqueeze(1) - lower.unsqueeze(1), upper.unsqueeze(1) - z.unsqueeze(1))
    breaks = d / c.abs()
    finite = torch.isfinite(t)
    assert torch.all((breaks - t.unsqueeze(-1)).abs()[finite] > 1e-3)
    corner2 = (d**2).sum(-1)
    assert torch.all((corner2 - rho.unsqueeze(-1) ** 2).abs() > 1e-3)
    return t


@pytest.mark.parametrize(
    "rho_factor,reduce,case",
    [(0.3, "amin", "finite"), (0.8, "amin", "finite_with_faces"), (1.3, "amax", "corner_inside"), (1.0, "mean", "mixed")],
)
def test_gradcheck_exact(rho_factor, reduce, case):
    z, rho, lower, upper, c, off = generic_problem(3, rho_factor, reduce)
    t = assert_generic(z, rho, lower, upper, c)
    p = optimal_point(z, rho, lower, upper, c, t)
    on_face = (p == lower.unsqueeze(1)) | (p == upper.unsqueeze(1))
    if case == "finite":
        assert torch.isfinite(t).all()
    if case == "finite_with_faces":  # the gradient must flow to lower/upper through the clip
        assert torch.isfinite(t).all() and on_face.any(-1).all() and not on_face.all(-1).any()
    if case == "corner_inside":
        assert torch.isinf(t).all()
    if case == "mixed":
        assert torch.isinf(t).any() and torch.isfinite(t).any()
    args = tuple(x.clone().requires_grad_() for x in (z, rho, lower, upper, c, off))
    assert torch.autograd.gradcheck(margin_lower, args)


def test_gradcheck_ball_only_and_box_only():
    z, rho, lower, upper, c, off = generic_problem(5, 1.0)
    z, rho, lower, upper, c, off = (x.clone().requires_grad_() for x in (z, rho, lower, upper, c, off))
    assert torch.autograd.gradcheck(lambda z, r, c, o: margin_lower(z, r, None, None, c, o), (z, rho, c, off))
    assert torch.autograd.gradcheck(lambda l, u, c, o: margin_lower(None, None, l, u, c, o), (lower, upper, c, off))


def test_gradient_is_finite_on_degenerate_inputs():
    """c == 0 rows, rho == 0 and l == u must not put NaN into a training step."""
    z, rho, lower, upper, c, off = generic_problem(7, 0.9)
    c[0, 1] = 0
    rho[1] = 0
    lower[0, 2] = upper[0, 2] = z[0, 2]
    args = [x.clone().requires_grad_() for x in (z, rho, lower, upper, c, off)]
    margin_lower(*args).sum().backward()
    for x in args:
        assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# NaN never becomes a number; check_finite names the culprit
# ---------------------------------------------------------------------------------------------

ARGS = ["z", "rho", "lower", "upper", "c", "offset"]


def small_problem():
    z, rho, lower, upper, c, off = generic_problem(11, 0.9)
    c[0, 0] = 0  # a c == 0 row must not hide a NaN elsewhere (0 * NaN would, where-selection too)
    return dict(z=z, rho=rho, lower=lower, upper=upper, c=c, offset=off)


@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("variant", ["exact", "ball", "box"])
def test_nan_input_gives_nan_output(name, variant):
    kw = small_problem()
    if variant == "ball":
        kw["lower"] = kw["upper"] = None
    if variant == "box":
        kw["rho"] = None
    if kw[name] is None or (variant == "box" and name == "z"):
        pytest.skip("argument not used by this variant")
    x = kw[name].clone()
    if name in ("z", "lower", "upper"):
        x[0, 1] = math.nan  # sample 0, one coordinate: every class of sample 0 is affected
        hit = (0, slice(None))
    elif name == "rho":
        x[0] = math.nan
        hit = (0, slice(None))
    elif name == "c":
        x[0, 0, 3] = math.nan  # the c == 0 row, one coordinate
        hit = (0, 0)
    else:
        x[0, 0] = math.nan
        hit = (0, 0)
    kw[name] = x
    out = margin_lower(**{k: kw[k] for k in ARGS})
    assert torch.isnan(out[hit]).all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[hit] = False
    assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("name", ARGS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_argument(name, bad):
    kw = small_problem()
    check_finite(**kw)  # clean inputs pass
    x = kw[name].clone()
    x.view(-1)[0] = bad
    kw[name] = x
    with pytest.raises(ValueError, match=rf"\b{name} contains NaN or Inf"):
        check_finite(**kw)


def test_check_finite_rejects_negative_rho():
    kw = small_problem()
    kw["rho"] = kw["rho"].clone()
    kw["rho"][1] = -0.1
    with pytest.raises(ValueError, match="rho is negative"):
        check_finite(**kw)


# ---------------------------------------------------------------------------------------------
# realistic size
# ---------------------------------------------------------------------------------------------


def test_large_batch_agrees_with_iterative_projection():
    gen = torch.Generator().manual_seed(2)
    b, k, n = 64, 9, 512
    z = torch.randn(b, n, generator=gen, dtype=F64)
    lower = z - torch.rand(b, n, generator=gen, dtype=F64)
    upper = z + torch.rand(b, n, generator=gen, dtype=F64)
    c = torch.randn(b, k, n, generator=gen, dtype=F64)
    d = torch.where(c > 0, z.unsqueeze(1) - lower.unsqueeze(1), upper.unsqueeze(1) - z.unsqueeze(1))
    corner = d.norm(dim=-1)[:, 0]
    rho = corner * torch.linspace(0.05, 1.2, b, dtype=F64)  # from ball-dominated to corner inside
    off = torch.randn(b, k, generator=gen, dtype=F64)
    exact = margin_lower(z, rho, lower, upper, c, off)
    t = solve_t(z, rho, lower, upper, c)
    assert torch.isinf(t).any() and torch.isfinite(t).any()
    ref = iterative_projection(z, rho, lower, upper, c) + off.numpy()
    np.testing.assert_allclose(exact.numpy(), ref, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("seed", range(40))
def test_dual_value_backward_is_autograds_chain_rule(seed, monkeypatch):
    """The written-out backward of the dual value (which stores c, not the (B, K, n) intermediates)
    gives autograd's gradients, ties included (z on a box face as after a dead ReLU, c_i = 0,
    rho = 0 and a huge rho with t = inf)."""
    g = torch.Generator().manual_seed(seed)
    B, K, n = 4, 5, 7

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)
    z = rnd(B, n)
    lower, upper = z - rnd(B, n).abs(), z + rnd(B, n).abs()
    lower[0, :3] = z[0, :3]
    c = rnd(B, K, n)
    c[1, 2] = 0
    c[2, :, 1] = 0
    rho = rnd(B).abs()
    rho[3] = 0.0 if seed % 2 else 50.0
    offset = rnd(B, K)
    inputs = [a.requires_grad_() for a in (z, rho, lower, upper, c, offset)]
    t = solver.solve_t(*[a.detach() for a in inputs[:5]])
    upstream = rnd(B, K)

    def grads():
        value = solver.dual_margin_lower(*inputs, t)
        return value.detach(), torch.autograd.grad((value.nan_to_num(0, 0, 0) * upstream).sum(), inputs)
    value, written = grads()
    monkeypatch.setattr(solver._DualValue, "apply", staticmethod(solver._dual_value))  # plain autograd
    ref_value, reference = grads()
    assert torch.equal(value.nan_to_num(1e300), ref_value.nan_to_num(1e300))
    for a, b in zip(written, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_margins_rebuilt_from_the_weight_have_the_same_values_and_gradients():
    """The training path passes c = W[ref] - W as (W, ref), rebuilt in backward (issue 16: c is
    (B, K, n), 10 MiB at batch 512 of the 4C3F, kept for nothing): same values and gradients."""
    torch.manual_seed(0)
    B, K, n = 5, 4, 7
    weight = torch.randn(K, n, dtype=torch.float64, requires_grad=True)
    z = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    half = torch.rand(B, n, dtype=torch.float64) * 0.5
    lo, hi = (z - half).detach().requires_grad_(), (z + half).detach().requires_grad_()
    rho = torch.rand(B, dtype=torch.float64, requires_grad=True)
    ref = torch.randint(0, K, (B,))
    runs = []
    for c_from in (None, True):
        c = weight[ref].unsqueeze(1) - weight.unsqueeze(0)
        m = solver.margin_lower(z, rho, lo, hi, c, None, c_from=(weight, ref) if c_from else None)
        m = torch.where(torch.isfinite(m), m, 0.0)
        grads = torch.autograd.grad((m * torch.linspace(0.5, 2, K, dtype=m.dtype)).sum(), (weight, z, lo, hi, rho))
        runs.append((m.detach(), grads))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

"""The fused CPU kernels (bcpc.kernels) compute exactly what their pure-torch paths compute:
the same values and the same gradients, ties included, in float32 and float64; the same numbers
for every thread count; and they are well-formed torch custom ops (``torch.library.opcheck``)."""
import contextlib
import os
import subprocess
import sys

import numba
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bcpc import kernels


@contextlib.contextmanager
def torch_path():
    """Run the block with the fused kernels off (the pure-torch reference path)."""
    old = os.environ.get("BCPC_FUSED")
    os.environ["BCPC_FUSED"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["BCPC_FUSED"]
        else:
            os.environ["BCPC_FUSED"] = old


def _grid(gen, shape, dtype):
    # values on a coarse grid so that max/min and ReLU ties (and exact zeros) really happen
    return (torch.randint(-4, 5, shape, generator=gen).to(dtype) / 2).requires_grad_()


def _run(fn, inputs, grads):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [None if t.grad is None else t.grad for t in leaves]


def _same(fused, ref):
    for a, b in zip(fused[0] + fused[1], ref[0] + ref[1]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0)


cases = st.tuples(st.integers(1, 5), st.sampled_from([(3,), (2, 3, 4), (1, 5, 5)]), st.integers(0, 2**31 - 1),
                  st.sampled_from([torch.float32, torch.float64]))


@settings(max_examples=60)
@given(cases)
def test_affine_box_matches_torch(case):
    batch, per, seed, dtype = case
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) + per
    a_s, a_d, center = (_grid(gen, shape, dtype) for _ in range(3))
    a_d = a_d.detach().abs().requires_grad_()
    bias = _grid(gen, per[:1] + (1,) * (len(per) - 1), dtype)  # per channel
    rownorm = _grid(gen, per, dtype).detach().abs().requires_grad_()
    radius = _grid(gen, (batch,), dtype).detach().abs().requires_grad_()
    grads = [_grid(gen, shape, dtype).detach() for _ in range(2)]
    inputs = (a_s, a_d, bias, center, rownorm, radius)
    fused = _run(kernels.affine_box, inputs, grads)
    with torch_path():
        ref = _run(kernels.affine_box, inputs, grads)
    # gradients of the per-coordinate/per-sample inputs are sums: same terms, maybe another order
    for a, b in zip(fused[1][2:], ref[1][2:]):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    _same((fused[0], fused[1][:2]), (ref[0], ref[1][:2]))


@settings(max_examples=60)
@given(cases)
def test_relu_box_matches_torch(case):
    batch, per, seed, dtype = case
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) + per
    lower = _grid(gen, shape, dtype)
    upper = (lower.detach() + _grid(gen, shape, dtype).detach().abs()).requires_grad_()
    grads = [_grid(gen, shape, dtype).detach() for _ in range(2)]
    for fn in (kernels.relu_box,):
        fused = _run(fn, (lower, upper), grads)
        with torch_path():
            ref = _run(fn, (lower, upper), grads)
        _same(fused, ref)


@settings(max_examples=30)
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_abs_square_matches_torch(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    w = _grid(gen, (7, 3, 2), dtype)
    grads = [_grid(gen, (7, 3, 2), dtype).detach() for _ in range(2)]
    fused = _run(kernels.abs_square, (w,), grads)
    with torch_path():
        ref = _run(kernels.abs_square, (w,), grads)
    _same(fused, ref)


@settings(max_examples=30)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_abs_linear_matches_torch(batch, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x, w = _grid(gen, (batch, 6), dtype), _grid(gen, (5, 6), dtype)
    grads = [_grid(gen, (batch, 5), dtype).detach()]
    fused = _run(lambda a, b: (kernels.abs_linear(a, b),), (x, w), grads)
    with torch_path():
        ref = _run(lambda a, b: (kernels.abs_linear(a, b),), (x, w), grads)
    _same(fused, ref)


def test_gradcheck_float64():
    """Away from ties the fused functions' backward is the derivative of their forward."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    a_s, a_d, center = rnd(2, 3, 4), rnd(2, 3, 4), rnd(2, 3, 4)
    bias, rownorm = rnd(3, 1), rnd(3, 4).detach().abs().requires_grad_()
    radius = rnd(2).detach().abs().requires_grad_()
    assert torch.autograd.gradcheck(kernels.affine_box, (a_s, a_d, bias, center, rownorm, radius))
    lower = rnd(2, 5)
    upper = (lower.detach() + 1).requires_grad_()
    assert torch.autograd.gradcheck(kernels.relu_box, (lower, upper))
    assert torch.autograd.gradcheck(kernels.abs_square, (rnd(4, 3),))
    assert torch.autograd.gradcheck(kernels.abs_linear, (rnd(2, 3), rnd(4, 3)))


def _ops_called(fn):
    """The ``bcpc::`` ops that ``fn()`` (forward and backward) runs, as the profiler records them."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("bcpc::")}


def test_fused_path_is_taken_on_cpu_and_switchable():
    x = torch.rand(2, 3, requires_grad=True)

    def step(dtype=torch.float32):
        lo, hi = kernels.relu_box((x - 0.5).to(dtype), (x + 0.5).to(dtype))
        (lo + hi).sum().backward()
    assert _ops_called(step) == {"bcpc::relu_box", "bcpc::relu_box_backward"}
    with torch_path():
        assert _ops_called(step) == set()
    assert _ops_called(lambda: step(torch.float16)) == set()  # other dtypes take the torch path


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_kernels_leave_torchs_thread_count_alone():
    """The first kernel launch starts numba's thread pool; torch's thread count stays what it was
    (a fresh process: the pool starts once per process)."""
    code = ("import torch; torch.set_num_threads(1); from bcpc import kernels; "
            "x = torch.rand(3, 8, requires_grad=True); lo, hi = kernels.relu_box(x - 1, x); "
            "(lo + hi).sum().backward(); "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1", out.stdout


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has one thread here: nothing to compare")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_numbers_for_one_and_two_threads(dtype):
    """The kernels run in parallel over rows (the affine backward's sums over the batch in fixed
    chunks of rows); the chunks depend on the batch size only, so the thread count changes no
    bit. The batch gives several chunks (of two rows, the last one of one), the rows a partial
    last group of four. (abs_linear is left out: it is
    torch's matmul, whose float32 sums change with torch's thread count.)"""
    gen = torch.Generator().manual_seed(3)
    shape, per = (19, 3, 7, 9), (3, 7, 9)
    a_s, a_d, center = (_grid(gen, shape, dtype) for _ in range(3))
    a_d = a_d.detach().abs().requires_grad_()
    bias, rownorm = _grid(gen, (3, 1, 1), dtype), _grid(gen, per, dtype).detach().abs().requires_grad_()
    radius = _grid(gen, (19,), dtype).detach().abs().requires_grad_()
    w = _grid(gen, (33, 41), dtype)
    grads = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(2)]
    w_grads = [torch.randn((33, 41), generator=gen, dtype=dtype) for _ in range(2)]
    runs = {}
    for n in (1, 2):
        with torch_threads(n):
            affine = _run(kernels.affine_box, (a_s, a_d, bias, center, rownorm, radius), grads)
            assert numba.get_num_threads() == n  # set by the kernel launch, from torch's count
            assert torch.get_num_threads() == n
            relu = _run(kernels.relu_box, (a_s, (a_s.detach() + a_d.detach()).requires_grad_()), grads)
            square = _run(kernels.abs_square, (w,), w_grads)
            runs[n] = (affine, relu, square)
    for one, two in zip(runs[1], runs[2]):
        _same(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_ops_pass_opcheck(dtype):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every ``bcpc::`` op
    (``bcpc::solve_t`` is registered by bcpc.solver, which importing bcpc loads)."""
    gen = torch.Generator().manual_seed(5)

    def rnd(*shape, grad=True):
        return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(grad)
    B, N = 3, 10
    a_s, a_d, center, rownorm, bias, radius = rnd(B, N), rnd(B, N).abs(), rnd(B, N), rnd(N).abs(), rnd(N), rnd(B).abs()
    for t in (a_d, rownorm, radius):
        t.detach_().requires_grad_()
    g = rnd(B, N, grad=False)
    code = torch.ops.bcpc.affine_box(a_s, a_d, bias, center, rownorm, radius)[2]
    relu_code = torch.ops.bcpc.relu_box(a_s, a_s + a_d)[2]
    w, x = rnd(4, N), rnd(B, N)
    z, rho = rnd(B, N, grad=False), rnd(B, grad=False).abs()
    cases = [
        (torch.ops.bcpc.affine_box.default, (a_s, a_d, bias, center, rownorm, radius)),
        (torch.ops.bcpc.affine_box_backward.default, (g, g * 2, code, rownorm.detach(), radius.detach())),
        (torch.ops.bcpc.relu_box.default, (a_s, (a_s + a_d).detach().requires_grad_())),
        (torch.ops.bcpc.relu_box_backward.default, (g, g * 2, relu_code)),
        (torch.ops.bcpc.abs_square.default, (w,)),
        (torch.ops.bcpc.abs_square_backward.default, (w.detach(), rnd(4, N, grad=False), rnd(N, 4, grad=False).t())),
        (torch.ops.bcpc.abs_linear.default, (x, w)),
        (torch.ops.bcpc.abs_linear_weight_grad.default, (rnd(B, 4, grad=False), x.detach(), w.detach())),
        # bcpc.solver's kernel (no autograd: t is found under no_grad)
        (torch.ops.bcpc.solve_t.default, (z, rho, z - 1, z + 0.5, rnd(B, 5, N, grad=False))),
        (torch.ops.bcpc.solve_t.default, (z, rho, None, z + 0.5, rnd(B, 5, N, grad=False))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)

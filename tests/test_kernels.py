"""The fused CPU kernels (bcpc.kernels) compute exactly what their pure-torch paths compute:
the same values and the same gradients, ties included, in float32 and float64."""
import contextlib
import os

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


def _made_by_kernel(t):
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return type(fn).__name__.startswith("_ReluBox")


def test_fused_path_is_taken_on_cpu_and_switchable():
    x = torch.rand(2, 3, requires_grad=True)
    lo, hi = kernels.relu_box(x - 0.5, x + 0.5)
    assert _made_by_kernel(lo)
    with torch_path():
        lo, hi = kernels.relu_box(x - 0.5, x + 0.5)
        assert not _made_by_kernel(lo)
    # other dtypes take the torch path
    lo, hi = kernels.relu_box((x - 0.5).half(), (x + 0.5).half())
    assert lo.dtype == torch.float16 and not _made_by_kernel(lo)

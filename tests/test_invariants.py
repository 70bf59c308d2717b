"""Invariants between the three methods, on random architectures (float64, sound mode):
bcp box ⊆ ibp box at every node; bcp margins >= ibp margins and >= lipschitz margins."""
import torch
from hypothesis import given, strategies as st

import bcpc
from tests.strategies import architectures


@given(arch=architectures(), norm=st.sampled_from(["l2", "linf"]), eps=st.floats(0.01, 1.0),
       domain=st.booleans(), seed=st.integers(0, 1000))
def test_bcp_is_at_least_as_tight_as_both_baselines(arch, norm, eps, domain, seed):
    model, shape = arch
    x = torch.rand((3,) + shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dom = (0.0, 1.0) if domain else None
    certs = {m: bcpc.compile(model, norm, example_input=x, input_domain=dom, method=m)
             for m in ("bcp", "ibp", "lipschitz")}
    with torch.no_grad():
        y = model(x).argmax(1)
    tol = 1e-9
    nb_bcp, nb_ibp = certs["bcp"].node_bounds(x, eps), certs["ibp"].node_bounds(x, eps)
    assert nb_bcp.keys() == nb_ibp.keys()
    for name, b in nb_bcp.items():
        i = nb_ibp[name]
        scale = 1 + i.upper.abs().max() + i.lower.abs().max()
        assert (b.lower >= i.lower - tol * scale).all(), name
        assert (b.upper <= i.upper + tol * scale).all(), name
    m = {k: c.margins(x, y, eps) for k, c in certs.items()}
    finite = torch.isfinite(m["bcp"])
    scale = 1 + m["bcp"][finite].abs().max()
    assert (m["bcp"][finite] >= m["ibp"][finite] - tol * scale).all()
    assert (m["bcp"][finite] >= m["lipschitz"][finite] - tol * scale).all()
    # the bcp ball is inside the lipschitz ball at every node; the same ball where no rule reads the
    # box for its radius (softplus counts the coordinates whose box straddles its threshold jump,
    # which the lipschitz method, having no box, must take to be all of them)
    nb_lip = certs["lipschitz"].node_bounds(x, eps)
    reads_box = any(isinstance(m, torch.nn.Softplus) or getattr(m, "name", "") == "softplus" for m in model.modules())
    for name, b in nb_bcp.items():
        if reads_box:
            assert (b.radius <= nb_lip[name].radius * (1 + 1e-12)).all(), name
        else:
            torch.testing.assert_close(b.radius, nb_lip[name].radius, rtol=1e-12, atol=0)

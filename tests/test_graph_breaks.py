"""The certified training loss traces into one graph with no graph break, with the fused kernels
as custom ops in the graph (``BCPC_FUSED_COMPILE=1``) or the torch path (``0``), and
``torch.compile(fullgraph=True)`` of it gives the eager loss and gradients.

Each model's Lipschitz cache is warmed by one eager step first: the first call of a fresh cache
runs 50 power-iteration steps per layer (a one-off graph, recompiled away on the second call),
every later training step one; the graph checked is the later one.

Tracing is slow (seconds per model), so the cases are the fewest that cover every model, method
and setting: the ball path of ``method="lipschitz"`` calls no fused kernel, so its graph is the
same under both settings and is traced once; ``mnist_small`` with ``bcp`` is traced by the
fullgraph run, which fails on any graph break and counts the graphs its backend receives; that
run uses ``aot_eager`` (the same capture, AOT autograd through the custom ops' fake kernels and
autograd formulas, no code generation); inductor's code is compared with eager in
tests/test_backend.py, under both settings.
"""
import contextlib
import os

import pytest
import torch

import bcpc
from bcpc.models import ARCHITECTURES

EPS, LAM = 0.3, 0.5
SHAPES = {"mnist_small": (1, 28, 28), "mnist_small_minmax": (1, 28, 28), "resnet_small": (3, 32, 32)}


@contextlib.contextmanager
def fused_compile(setting):
    """``BCPC_FUSED_COMPILE=setting`` for the block, with dynamo's caches cleared on both sides
    (the switch is read when a graph is traced)."""
    old = os.environ.get("BCPC_FUSED_COMPILE")
    os.environ["BCPC_FUSED_COMPILE"] = setting
    torch.compiler.reset()
    try:
        yield
    finally:
        torch.compiler.reset()
        if old is None:
            del os.environ["BCPC_FUSED_COMPILE"]
        else:
            os.environ["BCPC_FUSED_COMPILE"] = old


def _setup(name, method):
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    x = torch.rand((4,) + SHAPES[name])
    y = torch.arange(4) % 10
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), method=method)
    cert.loss(x, y, EPS, LAM)  # eager: warms the Lipschitz cache
    return model, cert, x, y


def _bcpc_ops(graphs):
    return {str(n.target) for g in graphs for n in g.graph.nodes if str(n.target).startswith("bcpc.")}


EXPLAINED = [("mnist_small", "lipschitz", "1"), ("mnist_small_minmax", "bcp", "0"),
             ("mnist_small_minmax", "bcp", "1"), ("mnist_small_minmax", "lipschitz", "1")]


def _capturing(graphs):
    """``aot_eager``, keeping every graph dynamo hands it."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return backend


def _check_ops(ops, method, setting):
    if setting == "0":
        assert not ops, ops  # the torch path throughout: inductor fuses it
    elif method == "bcp":
        # the box kernels and the ball ∩ box solver are in the graph as custom ops
        assert {"bcpc.affine_box", "bcpc.solve_t"} <= ops, ops


@pytest.mark.parametrize("name, method, setting", EXPLAINED)
def test_certified_loss_is_one_graph(name, method, setting):
    _, cert, x, y = _setup(name, method)
    with fused_compile(setting):
        explained = torch._dynamo.explain(lambda a, b: cert.loss(a, b, EPS, LAM))(x, y)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1
    _check_ops(_bcpc_ops(explained.graphs), method, setting)


@pytest.mark.parametrize("setting", ["0", "1"])
def test_fullgraph_compiled_step_matches_eager(setting):
    model, cert, x, y = _setup("mnist_small", "bcp")
    cert.propagation.lip.eval()  # the same frozen estimates in both runs (no power-iteration step)

    def step(fn):
        model.zero_grad()
        loss = fn(x, y, EPS, LAM)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = step(cert.loss)
    graphs = []
    with fused_compile(setting):
        loss, grads = step(torch.compile(cert.loss, fullgraph=True, backend=_capturing(graphs)))
    assert len(graphs) == 1  # and fullgraph=True raised on any graph break
    _check_ops(_bcpc_ops(graphs), "bcp", setting)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resnet_loss_is_one_graph():
    """With ``fullgraph=True``, which stops at the first graph break (explain would trace on)."""
    _, cert, x, y = _setup("resnet_small", "bcp")
    graphs = []
    with fused_compile("1"):
        torch.compile(lambda a, b: cert.loss(a, b, EPS, LAM), fullgraph=True, backend=_capturing(graphs))(x, y)
    assert len(graphs) == 1
    _check_ops(_bcpc_ops(graphs), "bcp", "1")

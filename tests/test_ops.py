"""The ops of real models (issue 14): constants of the activation rules against a dense sampling,
radius factors pinned to their hand-computed values, the patterns pass, and refusals that say why.

Soundness of every rule is the generated test in tests/test_rules.py; this file pins tightness
and the compile-time behaviour.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
from bcpc import ops
from bcpc.errors import UnsupportedOpError
from bcpc.ops import group_sort
from bcpc.rules.smooth import CONSTANTS

D = torch.float64


# --- the constants of the unimodal activations ------------------------------------------------

FUNCTIONS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
             "mish": F.mish, "hardswish": F.hardswish}


@pytest.mark.parametrize("key", sorted(FUNCTIONS))
def test_unimodal_constants_against_dense_sampling(key):
    f, const = FUNCTIONS[key], CONSTANTS[key]
    x = torch.linspace(-20, 20, 2_000_001, dtype=D, requires_grad=True)
    y = f(x)
    (slope,) = torch.autograd.grad(y.sum(), x)
    steepest = float(slope.abs().max())
    assert steepest <= const.lipschitz, "the Lipschitz constant must bound |f'| everywhere"
    assert const.lipschitz - steepest < 1e-5, "and be tight"
    y = y.detach()
    assert float(y.min()) >= const.minimum - 1e-15 and float(y.min()) - const.minimum < 1e-9
    assert abs(float(x.detach()[y.argmin()]) - const.argmin) < 1e-4
    left, right = x.detach() <= const.argmin, x.detach() >= const.argmin
    # decreasing left of the minimiser, increasing right of it (up to float64 rounding)
    assert (y[left].diff() <= 1e-15).all() and (y[right].diff() >= -1e-15).all()


def test_gelu_constant_is_the_closed_form():
    # f'(sqrt 2) = Phi(sqrt 2) + sqrt 2 phi(sqrt 2) = (1 + erf 1) / 2 + e^-1 / sqrt(pi)
    t = torch.tensor(math.sqrt(2.0), dtype=D, requires_grad=True)
    (slope,) = torch.autograd.grad(F.gelu(t), t)
    assert CONSTANTS["gelu"].lipschitz == pytest.approx(float(slope), rel=1e-11)


def test_unimodal_box_holds_the_minimum():
    model = nn.Sequential(nn.Linear(1, 1), nn.GELU(), nn.Linear(1, 2)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-0.75)  # the pre-activation straddles GELU's minimiser -0.7518
    x = torch.zeros(1, 1, dtype=D)
    nb = bcpc.compile(model, "l2", example_input=x).node_bounds(x, 0.5)
    gelu = nb["_1"]
    assert gelu.lower.item() == pytest.approx(CONSTANTS["gelu"].minimum, abs=1e-12)
    assert gelu.upper.item() == pytest.approx(max(F.gelu(torch.tensor(-1.25, dtype=D)).item(),
                                                  F.gelu(torch.tensor(-0.25, dtype=D)).item()))


# --- GroupSort / MaxMin: the radius passes unchanged --------------------------------------------

class HandMaxMin(nn.Module):
    def __init__(self, w1, w2):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6, bias=False), nn.Linear(6, 3)
        with torch.no_grad():
            self.fc1.weight.copy_(w1)
            self.fc2.weight.copy_(w2)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=1)
        return self.fc2(torch.cat([torch.max(a, b), torch.min(a, b)], dim=1))


class ModuleMaxMin(HandMaxMin):
    def __init__(self, w1, w2):
        super().__init__(w1, w2)
        self.act = bcpc.nn.MaxMin()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FunctionMaxMin(HandMaxMin):
    """bcpc.ops.group_sort called in forward, as docs/ops.md spells it."""

    def forward(self, x):
        return self.fc2(ops.group_sort(self.fc1(x), 2, 1, True, True))


class ImportedMaxMin(HandMaxMin):
    """group_sort imported by name into the model's module (fx.wrap only covers bcpc.nn's globals:
    this raised a misleading "control flow on tensor values" TraceError, found by a new-user review)."""

    def forward(self, x):
        return self.fc2(group_sort(self.fc1(x), group_size=2, strided=True, descending=True))


@pytest.mark.parametrize("cls", [FunctionMaxMin, ImportedMaxMin])
def test_group_sort_called_as_a_function_is_the_module(cls):
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 4, dtype=D), torch.randn(3, 6, dtype=D)
    x = torch.rand(5, 4, dtype=D)
    models = []
    for c in (cls, HandMaxMin):
        torch.manual_seed(1)  # the same fc2 bias
        models.append(c(w1, w2).double().eval())
    certs = [bcpc.compile(m, "l2", example_input=x) for m in models]
    assert list(certs[0].rules.values()).count("group_sort") == 1
    y = certs[1].model(x).argmax(1)
    torch.testing.assert_close(certs[0].margins(x, y, 0.1), certs[1].margins(x, y, 0.1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [HandMaxMin, ModuleMaxMin])
def test_maxmin_keeps_the_radius_exactly(cls):
    """method="lipschitz" margin == clean margin - eps * sigma(W1) * ||w_y - w_j||: the factor of the
    MaxMin layer is exactly 1 (generic max, min and cat rules would give 2 for the halves)."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 4, dtype=D), torch.randn(3, 6, dtype=D)
    model = cls(w1, w2).double().eval()
    x = torch.rand(5, 4, dtype=D)
    cert = bcpc.compile(model, "l2", example_input=x, method="lipschitz")
    assert "group_sort" in cert.rules.values()
    eps = 0.1
    y = model(x).argmax(1)
    margins = cert.margins(x, y, eps)
    logits = model(x)
    sigma = torch.linalg.matrix_norm(w1, 2).item()
    for i in range(len(x)):
        for j in range(3):
            if j == y[i]:
                continue
            gap = (w2[y[i]] - w2[j]).norm().item()
            expected = (logits[i, y[i]] - logits[i, j]).item() - eps * sigma * gap
            assert margins[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
            assert margins[i, j].item() <= expected + 1e-12  # guaranteed bounds: never above


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("dim", [1, 2, -1])
def test_group_sort_of_pairs_is_the_sort(strided, descending, dim):
    """group_size 2 runs as a max and a min of the pairs (bcpc.ops._MaxMin), not a sort: the same
    values as sorting each pair, ties included, and every gradient routed to an input it came from."""
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (3, 4, 6, 6)).to(D).requires_grad_()  # small integers: many ties
    out = ops.group_sort(x, 2, dim, strided, descending)
    d = dim % x.dim()
    n = x.shape[d] // 2
    grouped = x.unflatten(d, (2, n) if strided else (n, 2))
    reference = grouped.sort(d if strided else d + 1, descending=descending).values.flatten(d, d + 1)
    assert torch.equal(out, reference)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    # a permutation of the output gradient within each pair: same sums, same multiset
    pair = (lambda t: t.unflatten(d, (2, n)).sort(d).values) if strided else (lambda t: t.unflatten(d, (n, 2)).sort(d + 1).values)
    assert torch.equal(pair(grad), pair(g))
    torch.autograd.gradcheck(lambda t: ops.group_sort(t, 2, dim, strided, descending), (torch.randn(2, 4, 4, 4, dtype=D, requires_grad=True),))


@pytest.mark.parametrize("strided", [True, False])
def test_group_sort_of_pairs_under_torch_compile(strided):
    """Under torch.compile (no strided out=) the pairs are joined instead: same values and gradients."""
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (3, 4, 6, 6)).to(D).requires_grad_()
    weights = torch.randn(4, 6, 6, dtype=D)

    def f(t):
        return ops.group_sort(t, 2, 1, strided, strided) * weights

    eager, compiled = f(x), torch.compile(f, fullgraph=True)(x)
    assert torch.equal(eager, compiled)
    g = torch.randn_like(eager)
    assert torch.equal(torch.autograd.grad(eager, x, g)[0], torch.autograd.grad(compiled, x, g)[0])


def test_view_sort_flatten_is_one_group_sort():
    class ViewSort(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc1(x)
            h = torch.sort(h.view(h.size(0), -1, 4), dim=2, descending=True)[0]
            return self.fc2(h.reshape(h.size(0), -1))

    model = ViewSort().double().eval()
    x = torch.rand(3, 4, dtype=D)
    cert = bcpc.compile(model, "l2", example_input=x)
    calls = [n for n in cert.canonical.graph.nodes if n.target is ops.group_sort]
    assert len(calls) == 1 and calls[0].args[1:] == (4, 1, False, True)
    assert calls[0].args[0].target is torch.nn.functional.linear  # the sort reads fc1's output directly
    torch.testing.assert_close(cert(x, 0.1).logits, model(x))


@pytest.mark.parametrize("fn", [lambda h: torch.cat(h.chunk(2, 1), 1) - h,
                                lambda h: torch.stack(h.view(-1, 2, 4).unbind(1), 1).flatten(1),
                                lambda h: torch.cat(torch.split(h, [3, 5], 1), dim=1)])
def test_whole_tuple_of_a_split_is_spelled_out(fn):
    model = Reshaped(lambda x: fn(x[:, :8] * 1.0), 8).double().eval()
    x = torch.rand(3, 12, dtype=D)
    cert = bcpc.compile(model, "l2", example_input=x)
    torch.testing.assert_close(cert(x, 0.0).logits, model(x))
    assert not any(n.target in (torch.chunk, torch.split, torch.unbind, "chunk", "unbind")
                   for n in cert.canonical.graph.nodes)


def test_hand_written_silu_becomes_the_activation():
    class Swish(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h * torch.sigmoid(h))

    x = torch.rand(3, 4, dtype=D)
    cert = bcpc.compile(Swish().double().eval(), "l2", example_input=x)
    assert "silu" in cert.rules.values()


# --- radius factors -------------------------------------------------------------------------

class Reshaped(nn.Module):
    def __init__(self, fn, head_in):
        super().__init__()
        self.fn = fn
        self.head = nn.Linear(head_in, 2)

    def forward(self, x):
        return self.head(self.fn(x).flatten(1))


@pytest.mark.parametrize("fn,head_in,factor", [
    (lambda x: x.view(-1, 4, 3).mean(dim=2), 4, 1 / math.sqrt(3)),
    (lambda x: x.view(-1, 4, 3).sum(dim=(1, 2), keepdim=True), 1, math.sqrt(12)),
    (lambda x: x.view(-1, 4, 3).amax(dim=2), 4, 1.0),
    (lambda x: x.view(-1, 12, 1).expand(-1, 12, 5), 60, math.sqrt(5)),
    (lambda x: x.repeat(1, 3), 36, math.sqrt(3)),
    (lambda x: F.interpolate(x.view(-1, 3, 2, 2), scale_factor=2), 48, 2.0),  # 4 copies of each value
    (lambda x: F.pad(x.view(-1, 3, 4), (1, 2)), 21, 1.0),
    (lambda x: x.view(-1, 3, 4).permute(0, 2, 1)[:, 1:, ::2], 6, 1.0),
    (lambda x: torch.stack([x, x], dim=2), 24, math.sqrt(2)),
])
def test_layout_and_reduction_radius_factors(fn, head_in, factor):
    x = torch.rand(2, 12, dtype=D)
    model = Reshaped(fn, head_in).double().eval()
    cert = bcpc.compile(model, "l2", example_input=x)
    nb = cert.node_bounds(x, 0.3)
    head_input = [n for n in cert.canonical.graph.nodes if n.target is torch.nn.functional.linear][-1].args[0]
    assert nb[head_input.name].radius[0].item() == pytest.approx(0.3 * factor, rel=1e-12)


def test_narrowing_cast_widens_the_radius_soundly():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2).double()

        def forward(self, x):
            return self.fc(x.float().double())

    x = torch.rand(2, 4, dtype=D)
    cert = bcpc.compile(Half().eval(), "l2", example_input=x)
    nb = cert.node_bounds(x, 0.3)
    narrowing = [name for name, rule in cert.rules.items() if rule == "cast"][0]  # x.float()
    cast = nb[narrowing]
    assert cast.center.dtype == D  # rounded to float32, kept in the working dtype (bcpc.ops.cast)
    assert torch.equal(cast.center, x.float().double())
    assert 0.3 < cast.radius[0].item() < 0.3 * (1 + 1e-6) + 1e-6


# --- refusals -----------------------------------------------------------------------------------

def _refusal(model, x):
    with pytest.raises(UnsupportedOpError) as err:
        bcpc.compile(model.double().eval(), "l2", example_input=x.double())
    return str(err.value)


def test_layernorm_inside_sequential_names_the_module_and_why():
    msg = _refusal(nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.ReLU(), nn.LayerNorm(6)), nn.Linear(6, 2)),
                   torch.rand(2, 4))
    assert "torch.nn.LayerNorm (module '1.1')" in msg and "<source unknown>" not in msg
    assert "not Lipschitz" in msg and "BatchNorm" in msg


def test_relu6_inside_sequential_compiles():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU6()), nn.Flatten(),
                          nn.Linear(8, 2)).double().eval()
    cert = bcpc.compile(model, "l2", example_input=torch.rand(2, 1, 4, 4, dtype=D))
    assert "clamp" in cert.rules.values()


@pytest.mark.parametrize("final,words", [(nn.Softmax(dim=1), "Return the logits"),
                                         (nn.LogSoftmax(dim=1), "Return the logits")])
def test_final_softmax_is_refused_with_the_reason(final, words):
    assert words in _refusal(nn.Sequential(nn.Linear(4, 3), final), torch.rand(2, 4))


def test_attention_product_is_refused_with_the_reason():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = x.view(-1, 2, 4)
            scores = self.q(h) @ self.k(h).transpose(1, 2)
            return self.head((scores @ h).mean(1))

    msg = _refusal(Attention(), torch.rand(2, 8))
    assert "operator.matmul" in msg and "both depend on the input" in msg


@pytest.mark.parametrize("fn,words", [
    (lambda h: h.max(dim=1)[1].double().unsqueeze(1) * h, "tuple"),  # the argmax indices
    (lambda h: h.sum().expand(h.size(0), 1) + h, "mixes"),
    (lambda h: h[0:1].expand(2, -1), "batch"),
    (lambda h: h.view(-1, 2, 4).permute(1, 0, 2).reshape(-1, 8), "batch"),
    (lambda h: F.interpolate(h.view(-1, 2, 2, 2), scale_factor=2, mode="bicubic").flatten(1)[:, :8], "negative"),
])
def test_layout_refusals_say_why(fn, words):
    msg = _refusal(Reshaped(lambda x: fn(x[:, :8] * 1.0 + 0.0), 8), torch.rand(2, 12))
    assert words in msg


def test_cast_of_a_non_floating_value_takes_the_target_dtype():
    """Only floating values keep their dtype through ops.cast; a mask or an index becomes the dtype
    the user asked for, as in the model itself."""
    mask = torch.tensor([True, False])
    assert ops.cast(mask, torch.float32).dtype == torch.float32
    assert ops.cast(torch.tensor([1, 2]), torch.float64).dtype == torch.float64
    assert torch.equal(ops.cast(torch.tensor([3, 5]), torch.float32) / 2, torch.tensor([1.5, 2.5]))
    h = torch.tensor([1.0, 2.0 ** -12 + 1.0], dtype=D)
    assert ops.cast(h, torch.float16).dtype == D and ops.cast(h, torch.float16)[1] == 1.0  # rounded, kept
    assert ops.cast(h.float(), torch.float64).dtype == torch.float32  # widening: unchanged


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_conv_with_a_padding_mode_is_its_pad_then_the_convolution(mode):
    """nn.Conv2d(padding_mode=...) was refused (a new-user review: docs/ops.md did not say so); it is
    traced through torch's own forward, F.pad then the unpadded convolution, two ops with rules."""
    from bcpc.testing import check_soundness, pgd_margin, sample_perturbations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode=mode), nn.ReLU(),
                          nn.Conv2d(3, 2, 3, padding="same", padding_mode=mode), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 3)).double().eval()
    x = torch.rand(4, 1, 6, 6, dtype=D)
    cert = bcpc.compile(model, example_input=x[:1], input_domain=(0.0, 1.0))
    assert list(cert.rules.values()).count("pad") == 2
    y, eps = model(x).argmax(1), 0.02
    pts = torch.cat([sample_perturbations(x, eps, 2.0, n=100, domain=(0.0, 1.0)),
                     pgd_margin(model, x, y, eps, 2.0, steps=20, domain=(0.0, 1.0))[None]])
    assert check_soundness(cert, model, x, y, eps, pts).nodes_checked == 8
    assert cert.certified_radius(x, y).min() > 0

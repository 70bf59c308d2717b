"""``cert.model_rounding``: certificates that also cover the float32 model's own rounding.

By default a certificate is for the model's function computed in float64 (the certification copy);
a twentieth-session review found float32 models misclassified inside certified balls where their
own rounding moves a margin across zero (a hidden value 3e7 + 0.9 that float32 rounds to 3e7; a
random MLP at its certified radius). With ``model_rounding`` every Bound is widened by a
worst-case bound on that rounding (bcpc.rounding) and neither is certified."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
from bcpc import registry, rounding


def _hidden_rounding_model():
    """z0 = (x + 3e7) - 3e7 (in float32 a multiple of 2), z1 = 0.5."""
    m = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0], [0.0]]))
        m[0].bias.copy_(torch.tensor([3e7, 3e7]))
        m[1].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        m[1].bias.copy_(torch.tensor([0.0, 0.5]))
    return m.eval()


def test_a_hidden_rounding_of_the_float32_model_is_covered():
    model = _hidden_rounding_model()
    x, y = torch.tensor([[2.0]]), torch.tensor([0])
    inside = torch.tensor([[0.9]])  # distance 1.1
    assert model(inside).argmax(1).item() == 1  # float32: 3e7 + 0.9 rounds to 3e7, z0 = 0 < 0.5
    assert model.double()(inside.double()).argmax(1).item() == 0  # the float64 function: z0 = 0.9
    model.float()
    cert = bcpc.compile(model, example_input=x)
    assert bool(cert.certify(x, y, 1.2)[0])  # the default: the float64 function, which is correct there
    cert.model_rounding = True
    assert not bool(cert.certify(x, y, 1.2)[0])
    assert float(cert.certified_radius(x, y)[0]) < 1.1


def test_a_random_float32_mlp_at_its_certified_radius():
    """The review's case: certified radius 0.1365702 by default, and the float32 model misclassifies
    a point at distance 0.1365701; with model_rounding the radius stops short of that point."""
    torch.manual_seed(51)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(8, 2)[2:3]
    y = model(x).argmax(1)
    inside = torch.tensor([[0.7067648768424988, 0.6411675214767456]])
    distance = float((inside.double() - x.double()).norm())
    assert model(inside).argmax(1).item() != y.item()
    cert = bcpc.compile(model, example_input=x)
    assert float(cert.certified_radius(x, y)[0]) > distance  # the float64 function's radius
    cert.model_rounding = True
    assert float(cert.certified_radius(x, y)[0]) < distance


def test_every_rule_has_a_rounding_kind():
    kinds = rounding.KINDS
    for rule in registry.rules():
        assert sum(rule.name in k for k in kinds) == 1, rule.name
    assert not set().union(*kinds) - {r.name for r in registry.rules()}  # no stale names


class _Mixed(nn.Module):
    """One node of each rounding kind: conv + BatchNorm (folded), affine, one rounding, averages,
    reductions, an elementary function, exact ops, a transposed convolution."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 4 * 4 + 2, 3)

    def forward(self, x):
        h = F.gelu(self.bn(self.conv(x)))
        h = F.leaky_relu(h * 0.5 + 1.0, 0.1) / 3.0
        h = F.avg_pool2d(h, 2) - h.mean((2, 3), keepdim=True)
        h = torch.tanh(self.up(h))
        h = F.interpolate(h, scale_factor=0.5, mode="bilinear", align_corners=False)
        s = h.sum((2, 3))
        return self.fc(torch.cat([torch.relu(h).flatten(1), s], 1))


@pytest.mark.parametrize("method", ["bcp", "ibp", "lipschitz"])
def test_model_rounding_only_lowers_margins_and_holds_on_sampled_points(method):
    torch.manual_seed(0)
    model = _Mixed()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(6, 1, 8, 8)
    y = model(x).argmax(1)
    cert = bcpc.compile(model, example_input=x[:1], input_domain=(0.0, 1.0), method=method)
    eps = 0.05
    plain = cert(x, eps, y).margins
    cert.model_rounding = True
    rounded = cert(x, eps, y).margins
    finite = torch.isfinite(plain)
    assert torch.isfinite(rounded[finite]).all()
    assert (rounded[finite] <= plain[finite]).all() and (rounded[finite] < plain[finite]).any()
    # every float32 value of the model at sampled points of the ball lies in the widened margins
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        d = torch.randn(x.shape, generator=g)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(6, 1, 1, 1, generator=g)
        z = model((x + d).clamp(0, 1)).double()
        true = z.gather(1, y[:, None]) - z
        assert (rounded[finite] <= true[finite]).all()


def test_a_float64_model_is_its_own_certification_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    x = torch.rand(4, 3, dtype=torch.float64)
    cert = bcpc.compile(model, example_input=x[:1])
    plain = cert(x, 0.1).margins
    cert.model_rounding = True
    torch.testing.assert_close(cert(x, 0.1).margins, plain, rtol=0, atol=0)


class _Head(nn.Module):
    """``fc(body(x))`` with ``fc`` fixed: z0 = h0 + bias0, z1 = h1 (identity weights)."""

    def __init__(self, body, bias0=-0.5, width=1):
        super().__init__()
        self.body, self.fc = body, nn.Linear(width, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2)[:, :width])
            self.fc.bias.copy_(torch.tensor([bias0, 0.0]))

    def forward(self, x):
        return self.fc(self.body(x))


# A second review's violations of model_rounding, each a float32 point x' inside the ball that the
# float32 model misclassifies while the first version certified it: (body, x, x', eps, bias0, width)
_CASES = {
    # a clamp bound float32 cannot hold: the model clamps to fl32(C) = 25165824, the copy to C
    "clamp to a Python constant": (lambda x: torch.clamp(x * 2.0 ** 25, min=25165824.9) - 25165824.0,
                                   [[0.75 + 4 * 2.0 ** -24]], [[0.75]], 2.5e-7, -0.5, 1),
    "pad with a Python constant": (lambda x: F.pad(x * 2.0 ** 25, (0, 1), value=25165824.9).amax(1, keepdim=True)
                                   - 25165824.0, [[0.75 + 4 * 2.0 ** -24]], [[0.75]], 2.5e-7, -0.5, 1),
    # x - C with |x - C| much smaller than C: the constant's own rounding, not the result's
    "subtracting a Python constant": (lambda x: torch.clamp(x - 25165825.1, 0.0, 1.0),
                                      [[25165832.0]], [[25165826.0]], 6.06, -0.5, 1),
    # softplus jumps at threshold / beta, and float32 compares fl(beta x) with fl(threshold)
    "softplus at its switch point": (lambda x: -F.softplus(x, beta=1.0, threshold=0.1),
                                     [[0.2]], [[0.1]], 0.10000000224, 0.5, 1),
    # results below float32's normal range are rounded absolutely, not relatively
    "a product that underflows": (lambda x: torch.clamp(x * 1e-44 * 1e38 * 1e6, 0.0, 0.85),
                                  [[1.0]], [[0.9]], 0.101, -0.845, 1),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_what_the_second_review_found_is_not_certified(case):
    body, x, inside, eps, bias0, width = _CASES[case]

    class Body(nn.Module):
        def forward(self, h):
            return body(h)

    model = _Head(Body(), bias0, width).eval()
    x, inside, y = torch.tensor(x), torch.tensor(inside), torch.tensor([0])
    assert float((inside.double() - x.double()).norm()) <= eps
    assert model(inside).argmax(1).item() == 1  # the float32 model, inside the ball
    cert = bcpc.compile(model, example_input=x)
    cert.model_rounding = True
    assert not bool(cert.certify(x, y, eps)[0])
    z = model(inside).double()
    assert float(cert(x, eps, y).margins[0, 1]) <= float(z[0, 0] - z[0, 1])


def test_bilinear_resampling_that_takes_another_neighbour_in_float32():
    """Upsampling 8 to 24 columns (align_corners): at the last column float64's source coordinate is
    exactly 7, float32's 6.9999995, which puts a weight of 4.8e-7 on the large element 6."""

    class Body(nn.Module):
        def forward(self, x):
            out = F.interpolate(x, size=(1, 24), mode="bilinear", align_corners=True)
            return torch.relu(torch.cat([out[..., 0], out[..., 23]], dim=-1)).flatten(1)

    model = _Head(Body(), 0.0, 2).eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(2))
        model.fc.bias.copy_(torch.tensor([0.02, 0.0]))
    x = torch.tensor([[[[-5.0, 0, 0, 0, 0, 0, 1e5, -1.0]]]])
    inside = x.clone()
    inside[..., 7] = -0.01
    assert model(inside).argmax(1).item() == 1
    cert = bcpc.compile(model, example_input=x)
    cert.model_rounding = True
    assert not bool(cert.certify(x, torch.tensor([0]), 1.0)[0])


class _Lambda(nn.Module):
    def __init__(self, fn, **tensors):
        super().__init__()
        self.fn = fn
        for name, t in tensors.items():
            setattr(self, name, t)

    def forward(self, x):
        return self.fn(self, x)


def _not_certified_where_the_float32_model_is_wrong(model, x, y, eps):
    cert = bcpc.compile(model, example_input=x)
    cert.model_rounding = True
    z = model(x).double()
    own = z.gather(1, y[:, None]) - z  # the float32 model's margins at the centre itself
    others = torch.ones_like(own, dtype=torch.bool).scatter(1, y[:, None], False)
    assert (cert(x, eps, y).margins[others] <= own[others]).all()
    return cert


def test_constants_the_model_rounds_far_more_than_a_unit_are_counted_in_full():
    """A third review: a subnormal constant (1e-40 is 5e-6 off in float32), a BatchNorm eps that is
    subnormal in float32, a float64 tensor attribute and a tensor filled in forward, each rounded by
    the float32 model and not by the copy."""
    x, y = torch.tensor([[1000.0, 999.99]]), torch.tensor([0])
    big = torch.tensor(1e38)
    subnormal = _Lambda(lambda s, h: torch.cat([h[:, :1] * 1e-40 * s.big * 100.0, h[:, 1:]], 1), big=big).eval()
    cert = _not_certified_where_the_float32_model_is_wrong(subnormal, x, y, 1e-3)
    assert not bool(cert.certify(x, y, 1e-3)[0])

    bn = nn.BatchNorm1d(2, eps=1e-40).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.0, 1.0]))
        bn.weight.copy_(torch.tensor([1e-20, 1.0]))
    x2, y2 = torch.tensor([[999.99, 1000.0]]), torch.tensor([1])
    cert = _not_certified_where_the_float32_model_is_wrong(nn.Sequential(bn).eval(), x2, y2, 1e-3)
    assert not bool(cert.certify(x2, y2, 1e-3)[0])

    lin = nn.Linear(1, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1e6], [1e6], [0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.0, -100.0]))
    x3, y3 = torch.tensor([[0.1]]), torch.tensor([1])
    attribute = _Lambda(lambda s, h: s.lin(h - s.c), lin=lin, c=torch.tensor(0.1, dtype=torch.float64)).eval()
    filled = _Lambda(lambda s, h: s.lin(h - torch.full_like(h, 0.1)), lin=lin).eval()
    for model in (attribute, filled):
        assert model(x3).argmax(1).item() == 0  # float32: 0.1 - fl32(0.1) is 0, not 1e6 * 1.5e-9
        cert = _not_certified_where_the_float32_model_is_wrong(model, x3, y3, 1e-12)
        assert not bool(cert.certify(x3, y3, 1e-12)[0])


def test_audit_and_check_soundness_attack_the_float32_model_under_model_rounding():
    from bcpc import testing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(6, 4)
    y = model(x).argmax(1)
    cert = bcpc.compile(model, example_input=x[:1], input_domain=(0.0, 1.0))
    assert testing.reference_model(model, x)[1] == torch.float64
    cert.model_rounding = True
    assert testing.reference_model(model, x, own_dtype=True) == (model, torch.float32)
    rep = testing.audit(cert, x, y, 0.05, pgd_steps=10, restarts=1, sphere_samples=8)
    assert rep.violations == 0 and rep.certified > 0
    points = x.unsqueeze(0) + 0.01 * torch.randn(5, *x.shape)
    assert not testing.check_soundness(cert, model, x, y, 0.05, points.clamp(0, 1)).violations


def test_a_fourth_reviews_cases_are_not_certified():
    """An average pool over an unbatched-looking (B, L) value sums L terms (not the 3 that its
    'channel map' would suggest); an integer constant above 2^24 is rounded by the float32 model."""
    length = 32
    c = 2.0 ** -5 + 8 * 2.0 ** -28
    pool = _Lambda(lambda s, h: torch.cat([F.avg_pool1d(h, length), torch.full_like(h[:, :1], c)], 1)).eval()
    x = torch.full((1, length), 2.0 ** -24)
    x[0, 0] = 1.0
    cert = _not_certified_where_the_float32_model_is_wrong(pool, x, torch.tensor([0]), 0.0)
    assert not bool(cert.certify(x, torch.tensor([0]), 0.0)[0])

    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [0.0]]))
        lin.bias.copy_(torch.tensor([0.5, 0.0]))
    big_int = _Lambda(lambda s, h: s.lin(torch.clamp(h, max=16777219) - 16777220.0), lin=lin).eval()
    x, y = torch.tensor([[16777210.0]]), torch.tensor([1])
    assert big_int(torch.tensor([[16777220.0]])).argmax(1).item() == 0  # at distance 10
    cert = bcpc.compile(big_int, example_input=x)
    cert.model_rounding = True
    assert not bool(cert.certify(x, y, 12.0)[0])


def test_reduced_float32_precision_is_refused_under_model_rounding():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.rand(2, 4)
    cert = bcpc.compile(model, example_input=x[:1])
    cert.model_rounding = True
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.raises(bcpc.errors.ConfigError, match="set_float32_matmul_precision"):
            cert.certify(x, model(x).argmax(1), 0.1)
        cert.model_rounding = False
        cert.certify(x, model(x).argmax(1), 0.1)  # the float64 function's certificate does not depend on it
    finally:
        torch.set_float32_matmul_precision(before)


def test_onednn_math_modes_and_flushed_subnormals_are_refused_under_model_rounding(monkeypatch):
    """A tenth review: ONEDNN_DEFAULT_FPMATH_MODE=BF16 makes oneDNN compute float32 convolutions with
    bfloat16 operands (1e4 times the bound; torch's settings do not show it), and flush-to-zero
    gives 0 where the bound assumes gradual underflow. Both were certified; both are refused."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.rand(2, 4)
    cert = bcpc.compile(model, example_input=x[:1])
    cert.model_rounding = True
    y = model(x).argmax(1)
    for var in ("ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE"):
        monkeypatch.setenv(var, "BF16")
        with pytest.raises(bcpc.errors.ConfigError, match=var):
            cert.certify(x, y, 0.1)
        monkeypatch.setenv(var, "strict")
        cert.certify(x, y, 0.1)
    torch.set_flush_denormal(True)
    try:
        with pytest.raises(bcpc.errors.ConfigError, match="set_flush_denormal"):
            cert.certify(x, y, 0.1)
    finally:
        torch.set_flush_denormal(False)
    cert.certify(x, y, 0.1)


def test_weights_computed_in_forward_are_refused_under_model_rounding():
    """The copy computes a weight normalised in forward (by the user's code or a torch.nn.utils
    parametrization) in float64 and the model in float32; bcpc.rounding does not bound that
    difference, so model_rounding is refused, naming the value. Exact re-layouts of a weight (its
    transpose, a view) round nothing and are accepted."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(3)
    x = torch.randn(4, 3)
    lin = nn.Linear(3, 2)
    v, g = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.rand(5) + 0.5)
    by_hand = _Lambda(lambda s, h: s.lin(F.relu(F.linear(h, s.v / s.v.norm(dim=1, keepdim=True) * s.g[:, None]))),
                      lin=nn.Linear(5, 2), v=v, g=g).eval()
    inverse = _Lambda(lambda s, h: s.lin(h * (1 / s.std)), lin=lin,
                      std=nn.Parameter(torch.tensor([0.3, 0.7, 1.1]), requires_grad=False)).eval()
    parametrized = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 5)), nn.ReLU(), nn.Linear(5, 2)).eval()
    cases = [(by_hand, "'norm' (Tensor.norm)"), (inverse, "'truediv'"), (parametrized, "'0.weight' (computed by")]
    for model, named in cases:
        y = model(x).argmax(1)
        cert = bcpc.compile(model, example_input=x, input_domain=None)
        assert cert.certify(x, y, 1e-3).all()  # the float64 function, by default
        cert.model_rounding = True
        with pytest.raises(bcpc.errors.ConfigError, match="from its weights alone") as err:
            cert.certify(x, y, 1e-3)
        assert named in str(err.value) and "remove_parametrizations" in str(err.value)
    relayout = _Lambda(lambda s, h: F.linear(h, s.w.t().contiguous()) * s.scale.view(1, -1),
                       w=nn.Parameter(torch.randn(3, 2)), scale=nn.Parameter(torch.rand(2) + 0.5)).eval()
    cert = bcpc.compile(relayout, example_input=x, input_domain=None)
    cert.model_rounding = True
    y = relayout(x).argmax(1)
    assert cert.certify(x, y, 0.0).shape == (4,)  # accepted


def test_an_overflow_that_meets_a_zero_weight_is_not_certified():
    """The float32 model overflows (1e37 * 40.5 > 3.4e38) and its next layer multiplies the inf by a
    zero weight: its logits are NaN. The float64 function certifies; model_rounding gives "not
    certified" for those inputs (it stopped with NonFiniteBoundError before)."""
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1e37, 0.0], [0.0, 1.0]]))
        m[0].bias.copy_(torch.tensor([0.0, 100.0]))
        m[2].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
        m[2].bias.zero_()
    x, y = torch.tensor([[0.5, 1.0], [1e-3, 1.0]]), torch.tensor([0, 0])
    assert torch.isnan(m(torch.tensor([[40.5, 1.0]]))).all()  # inside the ball of the first input
    cert = bcpc.compile(m, example_input=x, input_domain=None)
    assert cert.certify(x, y, 40.0).all()
    cert.model_rounding = True
    assert not cert.certify(x, y, 40.0).any()
    assert cert.certify(x, y, 1.0).all()  # no overflow inside the smaller balls


def _out_layer():
    out = nn.Linear(1, 3)
    with torch.no_grad():
        out.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))
        out.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
    return out


def test_a_weights_tuple_valued_op_and_a_comparison_with_a_float_are_refused_under_model_rounding():
    """A sixth review's false certificates: the smallest eigenvalue of a weight (torch.linalg.eigh
    returns a tuple, which the first check did not look at: 0.099945 in float32, 0.099976 in the
    copy) and a weight compared with 0.1 (the model compares with float32's 0.1, the copy with
    0.1): each moved a decision boundary by more than the certificate's slack. Both are refused;
    exact tuple-valued selections of a weight (its sorted values, a chunk) are accepted."""
    w = torch.tensor([[1000.0, 999.9], [999.9, 1000.0]])
    assert abs(float(torch.linalg.eigh(w)[0][0]) - float(torch.linalg.eigh(w.double())[0][0])) > 1e-5
    eig = _Lambda(lambda s, h: s.out(h - torch.linalg.eigh(s.w)[0][0]), w=nn.Parameter(w), out=_out_layer())
    gate = _Lambda(lambda s, h: s.out(h + torch.where(s.w > 0.1, s.k, s.z)), w=nn.Parameter(torch.tensor([0.1])),
                   k=nn.Parameter(torch.tensor([1e-4])), z=nn.Parameter(torch.tensor([0.0])), out=_out_layer())
    x = torch.tensor([[0.05], [0.2]])
    for model, named in ((eig, "'linalg_eigh'"), (gate, "'gt'")):
        cert = bcpc.compile(model.eval(), example_input=x, input_domain=None)
        cert.model_rounding = True
        with pytest.raises(bcpc.errors.ConfigError, match=named):
            cert.certify(x, model(x).argmax(1), 1e-3)
    for fn in (lambda s, h: h * torch.sort(s.v)[0], lambda s, h: h * s.v.chunk(1)[0],
               lambda s, h: h * torch.t(s.v[None])[:, 0] + torch.zeros_like(s.v)):
        model = _Lambda(fn, v=nn.Parameter(torch.tensor([0.3]))).eval()
        cert = bcpc.compile(model, example_input=x, input_domain=None)
        cert.model_rounding = True
        assert cert.certify(x, model(x).argmax(1), 0.0).shape == (2,)


def test_tensors_made_in_forward_then_cast_or_computed_in_float32_are_refused_under_model_rounding():
    """A seventh review's false certificates: a tensor made in forward in the input's dtype is
    float32 in the model and float64 in the copy; cast to int (3 - 1e-9 is 3 in float32, 2 after
    truncation in the copy) or to bool (1e-46 underflows to 0 in float32), or computed by float32
    arithmetic (linspace), its difference is not the rounding bcpc.rounding counts where it is used."""
    x = torch.tensor([[3.5], [0.5]])
    cases = [(lambda h: torch.full_like(h, 3 - 1e-9).to(torch.int64), "'to'"),
             (lambda h: torch.full_like(h, 1e-46).to(torch.bool).to(h.dtype), "'to'"),
             (lambda h: torch.linspace(0, 1000, 7777, dtype=h.dtype)[3795], "'linspace'")]
    for make, named in cases:
        model = _Lambda(lambda s, h, make=make: s.out(torch.relu(h - make(h))), out=_out_layer()).eval()
        cert = bcpc.compile(model, example_input=x, input_domain=None)
        cert.model_rounding = True
        with pytest.raises(bcpc.errors.ConfigError, match=named):
            cert.certify(x, model(x).argmax(1), 1e-3)
    # a float tensor made in forward and used as a float is counted where it is used, not refused
    kept = _Lambda(lambda s, h: s.out(h - torch.full_like(h, 0.1)), out=_out_layer()).eval()
    cert = bcpc.compile(kept, example_input=x, input_domain=None)
    cert.model_rounding = True
    assert cert.certify(x, kept(x).argmax(1), 1e-3).shape == (2,)


class _Activated(nn.Module):
    """relu(x - 3) scaled by 1e38, through an activation, scaled back: the float32 kernel of hardswish
    computes 6x first and gives inf from 6e37 on, where the copy's value is finite."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.l0, self.l1, self.a, self.b = (nn.Linear(1, 1) for _ in range(4))
        with torch.no_grad():
            for layer, w, b in ((self.l0, 1.0, -3.0), (self.l1, 1e38, 0.0), (self.a, 1e-38, 0.0), (self.b, 0.0, 10.0)):
                layer.weight.fill_(w)
                layer.bias.fill_(b)

    def forward(self, x):
        r = torch.relu(self.l0(x))
        return torch.cat([self.a(self.act(self.l1(r))), self.b(r)], 1)


class _SubnormalWeight(nn.Module):
    """A weight made in forward in the input's dtype with subnormal entries that float32 rounds by
    far more than u (1e-40 to 9.99994610e-41), applied to two equal values of 1e38: the float32
    product is exactly 0, the copy's 5.4e-8, and the output's magnitude is no measure of it."""

    def __init__(self):
        super().__init__()
        self.l1, self.head = nn.Linear(1, 2), nn.Linear(2, 2)
        with torch.no_grad():
            self.l1.weight.fill_(1.0)
            self.l1.bias.fill_(1e38)
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [2e7, 2.0]]))
            self.head.bias.copy_(torch.tensor([1e5, 1e5 - 1.5]))

    def forward(self, x):
        w = torch.tensor([[1e-40, -9.99994610e-41]], dtype=x.dtype)
        return self.head(torch.cat([F.linear(self.l1(x), w), x], 1))


def test_an_eighth_reviews_cases_are_not_certified():
    """An activation's float32 kernel overflowing below float32's largest value (hardswish: inf at
    x = 3.59, inside the ball of 3.0 at eps 1, where the float64 function is class 1), and a rounded
    weight whose difference cancels in the output but not term by term (the model is class 0 at
    x = 0.74, inside the ball of 1.0 at eps 0.5)."""
    x, y = torch.tensor([[3.0]]), torch.tensor([1])
    model = _Activated(F.hardswish).eval()
    assert model(torch.tensor([[3.59]])).argmax(1).item() == 0
    cert = _not_certified_where_the_float32_model_is_wrong(model, x, y, 1.0)
    assert not bool(cert.certify(x, y, 1.0)[0])
    x2 = torch.tensor([[1.0]])
    model = _SubnormalWeight().eval()
    assert model(torch.tensor([[0.74]])).argmax(1).item() == 0
    cert = bcpc.compile(model, example_input=x2, input_domain=None)
    assert bool(cert.certify(x2, y, 0.5)[0])  # the float64 function
    cert.model_rounding = True
    assert not bool(cert.certify(x2, y, 0.5)[0])


def test_an_integer_buffer_above_2_24_is_rounded_by_the_float32_model():
    """A ninth review: an int64 buffer 16777217 added to a float32 value is promoted to float32
    (16777216) by the model and kept exact by the copy; the model is class 1 at distance 0.44."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.tensor([16777217], dtype=torch.long))
            self.head = nn.Linear(1, 2)
            with torch.no_grad():
                self.head.weight.copy_(torch.tensor([[0.0], [10.0]]))
                self.head.bias.copy_(torch.tensor([1.0, 0.0]))

        def forward(self, x):
            return self.head(torch.relu(x[:, 1:2] - (x[:, 0:1] + self.k)))

    model = Net().eval()
    x, y = torch.tensor([[-16777216.0, 0.0]]), torch.tensor([0])
    assert model(torch.tensor([[-16777216.0, 0.44]])).argmax(1).item() == 1
    cert = bcpc.compile(model, example_input=x, input_domain=None)
    assert bool(cert.certify(x, y, 0.45)[0])  # the float64 function
    cert.model_rounding = True
    assert not bool(cert.certify(x, y, 0.45)[0])


def test_softplus_takes_the_other_piece_where_its_product_underflows():
    """An eleventh review: softplus(beta=1e-30, threshold=0) of x = 6e-16 is 6.9e29 in float32 (beta x
    underflows to 0, the left piece), x in the copy; the switch's slack now counts the absolute
    rounding of the product and of the threshold, divided by beta."""
    model = nn.Sequential(nn.Softplus(beta=1e-30, threshold=0.0), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0], [1.0]]))
        model[1].bias.copy_(torch.tensor([0.5, 0.0]))
    x, y = torch.tensor([[2e-15]]), torch.tensor([0])
    assert model(torch.tensor([[6e-16]])).argmax(1).item() == 1  # distance 1.4e-15
    cert = bcpc.compile(model, example_input=x, input_domain=None)
    assert bool(cert.certify(x, y, 1.5e-15)[0])  # the float64 function
    cert.model_rounding = True
    assert not bool(cert.certify(x, y, 1.5e-15)[0])


def test_a_divisor_that_float32_rounds_to_zero_is_not_certified():
    """A twelfth review: x / 1e-46 is x / 0 in float32 (inf), while the copy's quotient is finite and
    the constant's difference relative to 1e-46 is only 1; a divisor is now counted relative to its
    float32 value, and one that is 0 there (or whose reciprocal leaves float32's normal range)
    certifies nothing."""
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1e-3], [1e-3]]))
        head.bias.copy_(torch.tensor([1.0, -1.0]))
    model = _Lambda(lambda s, h: s.head(torch.clamp(torch.relu((2.0 ** -148 - torch.abs(h - 2.0 ** -149)) / 1e-46),
                                                    max=2.0 ** 100)), head=head).eval()
    x, y = torch.tensor([[-2.0 ** -148]]), torch.tensor([0])
    assert model(torch.tensor([[2.0 ** -149]])).argmax(1).item() == 1  # 4.2e-45 from the centre
    cert = bcpc.compile(model, example_input=torch.zeros(1, 1), input_domain=None)
    assert bool(cert.certify(x, y, 5e-45)[0])  # the float64 function
    cert.model_rounding = True
    assert not bool(cert.certify(x, y, 5e-45)[0])
    assert rounding._divisor_relative(2.0 ** -140) == math.inf  # exact, but its reciprocal overflows
    assert rounding._divisor_relative(0.1) == pytest.approx(abs(0.1 - float(torch.tensor(0.1))) / float(torch.tensor(0.1)))

"""One soundness test generated over the whole rule table: every registered rule must have a case
here (a tiny model that exercises it), or the test for that rule fails and says so."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
from bcpc import registry
from bcpc.errors import ConfigError, UnsupportedOpError
from bcpc.testing import check_soundness, pgd_margin, sample_perturbations
import bcpc.rules  # noqa: F401


class Lambda(nn.Module):
    def __init__(self, fn, head_in: int, classes: int = 3):
        super().__init__()
        self.fn = fn
        self.head = nn.Linear(head_in, classes)

    def forward(self, x):
        return self.head(self.fn(self, x).flatten(1))


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def case(name):
    """(model, per-sample input shape) exercising rule `name` right after the input."""
    img = (2, 5, 5)
    if name == "linear":
        return Lambda(lambda s, x: torch.relu(s.lin(x)), 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "conv1d":
        return Lambda(lambda s, x: s.c(x), 3 * 5), (2, 7), dict(c=nn.Conv1d(2, 3, 3, stride=1, padding=0))
    if name == "conv2d":
        return Lambda(lambda s, x: s.c(x), 3 * 3 * 3), img, dict(c=nn.Conv2d(2, 3, 3, stride=2, padding=1))
    if name == "conv3d":
        return (Lambda(lambda s, x: s.c(x), 2 * 4 * 2 * 2), (2, 3, 4, 3),
                dict(c=nn.Conv3d(2, 2, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0))))
    if name == "conv_transpose1d":
        return (Lambda(lambda s, x: s.c(x), 3 * 8), (2, 4),
                dict(c=nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1)))
    if name == "conv_transpose2d":  # functional spelling, groups 2, output padding in one dim
        return (Lambda(lambda s, x: F.conv_transpose2d(x, s.w, s.b, stride=2, padding=1, output_padding=(1, 0),
                                                       groups=2), 4 * 6 * 5), (2, 3, 3),
                dict(w=nn.Parameter(torch.randn(2, 2, 3, 3)), b=nn.Parameter(torch.randn(4))))
    if name == "conv_transpose3d":  # output_padding >= stride (allowed by dilation 2) in dim 2
        return (Lambda(lambda s, x: s.c(x), 2 * 5 * 4 * 3), (1, 2, 3, 2),
                dict(c=nn.ConvTranspose3d(1, 2, 2, stride=(2, 1, 1), padding=(0, 1, 0), output_padding=(1, 1, 0),
                                          dilation=(1, 2, 1))))
    if name == "batch_norm":
        return Lambda(lambda s, x: s.bn(x), 50), img, dict(bn=_bn(2))
    if name == "mul":
        return Lambda(lambda s, x: x * s.k, 50), img, dict(k=nn.Parameter(torch.randn(1, 2, 1, 1)))
    if name == "div":
        return Lambda(lambda s, x: x / -0.7, 50), img, {}
    if name in ("relu", "tanh", "sigmoid"):
        fn = getattr(torch, name)
        return Lambda(lambda s, x: fn(s.lin(x)), 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "abs":  # the method spelling
        return Lambda(lambda s, x: s.lin(x).abs(), 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "leaky_relu":
        return Lambda(lambda s, x: F.leaky_relu(s.lin(x), 0.2), 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "softplus":
        # threshold 1: the switch to the identity at x = threshold / beta drops the value by 0.1,
        # inside the input range, so the jump is exercised (a monotone rule fails here)
        return (Lambda(lambda s, x: F.softplus(s.lin(x), beta=3.0, threshold=1.0), 6), (4,),
                dict(lin=nn.Linear(4, 6)))
    if name == "elu":
        return Lambda(lambda s, x: F.elu(s.lin(x), alpha=1.5), 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "add":
        return Lambda(lambda s, x: torch.relu(s.lin(x)) + s.lin(x) + 1.0, 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "sub":
        return Lambda(lambda s, x: 0.5 - (torch.relu(s.lin(x)) - s.lin(x)), 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "neg":
        return Lambda(lambda s, x: -torch.tanh(s.lin(x)), 6), (4,), dict(lin=nn.Linear(4, 6))
    if name == "cat":
        return Lambda(lambda s, x: torch.cat([s.lin(x), 2 * x, torch.relu(x)], 1), 14), (4,), dict(lin=nn.Linear(4, 6))
    if name == "reshape":
        return Lambda(lambda s, x: s.lin(x.view(x.size(0), -1)), 3), (2, 2), dict(lin=nn.Linear(4, 3))
    if name == "flatten":
        return Lambda(lambda s, x: torch.flatten(x, 1), 50), img, {}
    if name == "unflatten":  # module and method spellings
        return (Lambda(lambda s, x: s.u(s.lin(x)).unflatten(2, (2, 2)).flatten(1), 12), (4,),
                dict(lin=nn.Linear(4, 12), u=nn.Unflatten(1, (3, 4))))
    if name == "max_pool2d":
        return Lambda(lambda s, x: F.max_pool2d(x, 3, stride=2, padding=1) + torch.max_pool2d(-x, 3, 2, 1, 1), 18), img, {}
    if name == "avg_pool2d":
        return Lambda(lambda s, x: F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False), 72), img, {}
    if name == "adaptive_avg_pool2d":
        return Lambda(lambda s, x: F.adaptive_avg_pool2d(x, (2, 3)), 12), img, {}
    if name == "adaptive_max_pool2d":  # 5 -> 2 and 5 -> 3: overlapping windows
        return (Lambda(lambda s, x: F.adaptive_max_pool2d(x, (2, 3)) - s.p(x), 12), img,
                dict(p=nn.AdaptiveMaxPool2d((2, 3))))
    pools = _pool_case(name)
    if pools is not None:
        return pools
    layout = _layout_case(name)
    if layout is not None:
        return layout
    return None


def _pool_case(name):
    """1-D and 3-D pools: the functional and the module spelling summed (same output shape)."""
    line, vol = (2, 7), (2, 3, 4, 3)
    cases = {
        "max_pool1d": (lambda s, x: F.max_pool1d(x, 3, stride=2, padding=1) + s.p(x) + torch.max_pool1d(-x, 3, 2, 1),
                       8, line,
                       dict(p=nn.MaxPool1d(3, 2, 1))),
        "avg_pool1d": (lambda s, x: F.avg_pool1d(x, 2, 1, 1, count_include_pad=False) + s.p(x), 16, line,
                       dict(p=nn.AvgPool1d(2, 1, 1))),
        "adaptive_avg_pool1d": (lambda s, x: F.adaptive_avg_pool1d(x, 3) - s.p(x), 6, line,
                                dict(p=nn.AdaptiveAvgPool1d(3))),
        "adaptive_max_pool1d": (lambda s, x: F.adaptive_max_pool1d(x, 3) + s.p(x), 6, line,  # 7 -> 3: overlaps
                                dict(p=nn.AdaptiveMaxPool1d(3))),
        "max_pool3d": (lambda s, x: F.max_pool3d(x, 2, stride=1) + s.p(x) + torch.max_pool3d(-x, 2, 1), 24, vol,
                       dict(p=nn.MaxPool3d(2, 1))),
        "avg_pool3d": (lambda s, x: F.avg_pool3d(x, 2, stride=1, padding=1, divisor_override=3) + s.p(x), 160, vol,
                       dict(p=nn.AvgPool3d(2, 1, 1))),
        "adaptive_avg_pool3d": (lambda s, x: F.adaptive_avg_pool3d(x, (2, 3, 2)) + s.p(x), 24, vol,
                                dict(p=nn.AdaptiveAvgPool3d((2, 3, 2)))),
        "adaptive_max_pool3d": (lambda s, x: F.adaptive_max_pool3d(x, (2, None, 2)) - s.p(x), 32, vol,
                                dict(p=nn.AdaptiveMaxPool3d((2, None, 2)))),
    }
    if name not in cases:
        return None
    fn, head_in, shape, parts = cases[name]
    return Lambda(fn, head_in), shape, parts


def _layout_case(name):
    """Cases of the activation, layout, sorting and reduction families (issue 14): each after a
    linear layer (wide input range, so the activations' curved parts and minima are exercised)."""
    lin = dict(lin=nn.Linear(4, 8))
    grid = dict(lin=nn.Linear(4, 12))  # reshaped to 3x4 or 3x2x2 below
    act = {"gelu": lambda h: F.gelu(3 * h) + F.gelu(-3 * h, approximate="tanh"),
           "silu": lambda h: F.silu(3 * h), "mish": lambda h: F.mish(3 * h), "hardswish": lambda h: F.hardswish(4 * h),
           "hardsigmoid": lambda h: F.hardsigmoid(4 * h), "clamp": lambda h: h.clamp(-0.3, 0.4) + F.relu6(6 * h)}
    if name in act:
        fn = act[name]
        return Lambda(lambda s, x: fn(s.lin(x)), 8), (4,), lin
    three = lambda s, x: s.lin(x).view(-1, 3, 4)  # noqa: E731
    wide = dict(lin=nn.Linear(4, 16))
    sq = lambda s, x: s.lin(x).view(-1, 4, 2, 2)  # noqa: E731
    cases = {
        "permute": (lambda s, x: three(s, x).permute(0, 2, 1), 12, grid),
        "transpose": (lambda s, x: three(s, x).transpose(1, 2), 12, grid),
        "movedim": (lambda s, x: s.lin(x).view(-1, 3, 2, 2).movedim(1, 3), 12, grid),
        "unsqueeze": (lambda s, x: s.lin(x).unsqueeze(1), 8, lin),
        "squeeze": (lambda s, x: s.lin(x).view(-1, 8, 1).squeeze(), 8, lin),
        "flip": (lambda s, x: three(s, x).flip(2) + three(s, x), 12, grid),
        "roll": (lambda s, x: torch.roll(three(s, x), 1, 2) - three(s, x), 12, grid),
        "narrow": (lambda s, x: s.lin(x).narrow(1, 2, 5), 5, lin),
        "select": (lambda s, x: three(s, x).select(2, 1), 3, grid),
        "getitem": (lambda s, x: three(s, x)[:, 1:, ::2] , 4, grid),
        "expand": (lambda s, x: s.lin(x).view(-1, 8, 1).expand(-1, 8, 3), 24, lin),
        "repeat": (lambda s, x: s.lin(x).repeat(1, 2), 16, lin),
        "stack": (lambda s, x: torch.stack([s.lin(x), torch.relu(s.lin(x)), torch.ones_like(s.lin(x))], 2), 24, lin),
        "pad": (lambda s, x: F.pad(three(s, x), (2, 1), mode="reflect") + F.pad(three(s, x), (0, 3), value=0.5), 21,
                grid),
        "interpolate": (lambda s, x: F.interpolate(s.lin(x).view(-1, 3, 2, 2), scale_factor=1.5)
                        + F.interpolate(s.lin(x).view(-1, 3, 2, 2), size=(3, 3), mode="bilinear"), 27, grid),
        "cast": (lambda s, x: s.lin(x).float().double(), 8, lin),
        "group_sort": (lambda s, x: torch.cat([s.gs(s.lin(x)), s.mm(s.lin(x))], 1), 16,
                       dict(lin=nn.Linear(4, 8), gs=bcpc.nn.GroupSort(4), mm=bcpc.nn.MaxMin())),
        "maximum": (lambda s, x: torch.maximum(s.lin(x), torch.relu(-s.lin(x))) + torch.max(s.lin(x), s.k), 8,
                    dict(lin=nn.Linear(4, 8), k=torch.randn(8))),
        "minimum": (lambda s, x: torch.minimum(s.lin(x), torch.tanh(s.lin(x))), 8, lin),
        "where": (lambda s, x: torch.where(s.m, s.lin(x), torch.tanh(s.lin(x))) + s.lin(x).masked_fill(s.m, 0.3), 8,
                  dict(lin=nn.Linear(4, 8), m=torch.arange(8) % 3 == 0)),
        "prelu": (lambda s, x: s.pr(s.lin(x)) + F.prelu(s.lin(x), s.a), 8,  # slopes 0.25 and -0.7
                  dict(lin=nn.Linear(4, 8), pr=nn.PReLU(8), a=nn.Parameter(torch.tensor([-0.7])))),
        "detach": (lambda s, x: s.lin(x).detach() * 2 + torch.relu(s.lin(x).data) + s.lin(x), 8, lin),
        "pixel_shuffle": (lambda s, x: F.pixel_shuffle(sq(s, x), 2) + s.ps(sq(s, x)), 16,
                          wide | dict(ps=nn.PixelShuffle(2))),
        "pixel_unshuffle": (lambda s, x: s.pu(s.lin(x).view(-1, 1, 4, 4)) - F.pixel_unshuffle(sq(s, x).view(-1, 1, 4, 4), 2),
                            16, wide | dict(pu=nn.PixelUnshuffle(2))),
        "channel_shuffle": (lambda s, x: F.channel_shuffle(sq(s, x), 2) + s.cs(sq(s, x)), 16,
                            wide | dict(cs=nn.ChannelShuffle(2))),
        "softsign": (lambda s, x: F.softsign(3 * s.lin(x)) + s.a(s.lin(x)), 8, lin | dict(a=nn.Softsign())),
        "logsigmoid": (lambda s, x: F.logsigmoid(3 * s.lin(x)) + s.a(s.lin(x)), 8, lin | dict(a=nn.LogSigmoid())),
        "tanhshrink": (lambda s, x: F.tanhshrink(3 * s.lin(x)) + s.a(s.lin(x)), 8, lin | dict(a=nn.Tanhshrink())),
        "celu": (lambda s, x: F.celu(3 * s.lin(x), alpha=0.5) + s.a(s.lin(x)) + torch.celu(-s.lin(x), 1.5), 8,
                 lin | dict(a=nn.CELU(2.0))),
        "selu": (lambda s, x: F.selu(3 * s.lin(x)) + s.a(s.lin(x)) + torch.selu_(2 * s.lin(x)), 8,
                 lin | dict(a=nn.SELU())),
        "sum": (lambda s, x: three(s, x).sum(2), 3, grid),
        "mean": (lambda s, x: three(s, x).mean(dim=1, keepdim=True), 4, grid),
        "amax": (lambda s, x: three(s, x).amax(2), 3, grid),
        "amin": (lambda s, x: three(s, x).min(dim=1)[0], 4, grid),
    }
    if name not in cases:
        return None
    fn, head_in, parts = cases[name]
    return Lambda(fn, head_in), (4,), parts


RULES = sorted(r.name for r in registry.rules())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("norm", [2.0, math.inf])
def test_rule_is_sound(rule, norm):
    built = case(rule)
    assert built is not None, f"rule {rule!r} has no soundness case: add one to case() in tests/test_rules.py"
    model, shape, parts = built
    torch.manual_seed(hash(rule) % 1000)
    for k, v in parts.items():
        if isinstance(v, nn.Parameter):
            model.register_parameter(k, v)
        elif isinstance(v, torch.Tensor):
            model.register_buffer(k, v)
        else:
            model.add_module(k, v)
    model = model.double().eval()
    x = torch.rand((3,) + shape, dtype=torch.float64)
    cert = bcpc.compile(model, norm, example_input=x, input_domain=(0.0, 1.0))
    assert rule in cert.rules.values(), f"case for {rule!r} does not use it"
    y = model(x).argmax(1)
    eps = 0.25
    pts = torch.cat([sample_perturbations(x, eps, norm, n=200, domain=(0.0, 1.0)),
                     pgd_margin(model, x, y, eps, norm, steps=30, domain=(0.0, 1.0))[None]])
    rep = check_soundness(cert, model, x, y, eps, pts)
    assert rep.nodes_checked >= 2


class _ConvT(nn.Module):
    """ConvTranspose2d(1, 2, 3) on a 1x4x4 input (output ``out`` x ``out``), then a linear head."""

    def __init__(self, call=lambda c, x: c(x), out=9, **conv):
        super().__init__()
        self.c, self.call = nn.ConvTranspose2d(1, 2, 3, **conv), call
        self.head = nn.Linear(2 * out * out, 3)

    def forward(self, x):
        return self.head(self.call(self.c, x).flatten(1))


def test_conv_transpose_refusals_name_the_node_and_the_fix():
    with pytest.raises(bcpc.errors.UnsupportedOpError, match=r"node 'c'.*output_size=\[9, 9\].*output_padding"):
        bcpc.compile(_ConvT(lambda c, x: c(x, output_size=[9, 9]), stride=2), example_input=torch.rand(1, 1, 4, 4))
    model = _ConvT(stride=2)
    model.c.padding_mode = "reflect"  # torch's constructor refuses it; an edit after construction is caught here
    with pytest.raises(bcpc.errors.UnsupportedOpError, match=r"node 'c'.*padding_mode='reflect'.*padding_mode='zeros'"):
        bcpc.compile(model, example_input=torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("conv", [dict(stride=2, padding=1, output_padding=1, out=8),
                                  dict(stride=1, padding=1, output_padding=1, dilation=2, out=7)])  # op >= stride
def test_conv_transpose_certified_sigma_is_the_true_norm(conv):
    """The compiled model's sound Lipschitz value of a ConvTranspose2d is the guaranteed bound on the
    layer's own operator (>= its explicit norm, within 1e-5), the training value an estimate below it."""
    torch.manual_seed(0)
    model = _ConvT(**conv).double().eval()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    cert = bcpc.compile(model, example_input=x, input_domain=(0.0, 1.0))
    (row,) = [r for r in cert.lipschitz_table(converge_iters=200) if r["kind"] == "conv_transpose2d"]
    c = model.c
    fn = lambda v: F.conv_transpose2d(v, c.weight, None, c.stride, c.padding, c.output_padding, c.groups,  # noqa: E731
                                      c.dilation)
    true = torch.linalg.matrix_norm(bcpc.lipschitz.explicit_matrix(fn, (1, 4, 4)), ord=2).item()
    assert row["in_shape"] == (1, 4, 4)
    assert true <= row["upper"] <= true * (1 + 1e-5)
    assert row["converged"] <= true * (1 + 1e-12)
    assert cert.certify(x, model(x).argmax(1), eps=1e-3).all()


class _CastsAndConstants(nn.Module):
    """float32 spellings that are a no-op or a rounding in the model itself and used to meet the
    float64 certification copy's weights as float32 tensors (found by a new-user review): the
    input cast to float32 first thing, a half-precision round trip before a layer, a weight kept
    as a plain tensor attribute."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(1, 3, 3)
        self.w = torch.randn(10, 3 * 6 * 6) * 0.2  # a plain attribute: not a parameter, not a buffer
        self.half_ref = torch.zeros(1, dtype=torch.float16)

    def forward(self, x):
        if self.spelling == "x.float()":
            x = x.float()
        h = self.conv(x).relu().flatten(1)
        if self.spelling == "h.half().float()":
            h = h.half().float()
        if self.spelling == "h.double().float()":
            h = h.double().float()
        # dtypes and devices read at run time (passes/dtypes.py)
        if self.spelling == "h.to(self.conv.weight.dtype)":
            h = h.to(self.conv.weight.dtype)
        if self.spelling == "h.type_as(x), w.to(x.device)":
            return F.linear(h.type_as(x), self.w.to(x.device))
        if self.spelling == "h.to(self.half_ref.dtype).to(x)":
            h = h.to(self.half_ref.dtype).to(x)
        return F.linear(h, self.w)


_CAST_INSIDE = ("x.float()", "h.half().float()", "h.double().float()", "h.to(self.half_ref.dtype).to(x)")


@pytest.mark.parametrize("spelling", ["x.float()", "h.half().float()", "h.double().float()", "plain tensor weight",
                                      "h.to(self.conv.weight.dtype)", "h.type_as(x), w.to(x.device)",
                                      "h.to(self.half_ref.dtype).to(x)"])
def test_float32_casts_and_plain_tensor_constants_certify_soundly(spelling):
    torch.manual_seed(3)
    model = _CastsAndConstants(spelling).eval()
    x = torch.rand(4, 1, 8, 8)
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0))
    y = model(x).argmax(1)
    eps = 0.3
    m = cert.margins(x, y, eps)  # the float64 copy runs (its clean logits are checked against model(x))
    assert m.dtype == torch.float64
    assert cert.certified_radius(x, y).max() > 0  # not refused, not vacuous
    # the model as the user runs it, in float32, at sampled and attacked points of the ball:
    # every margin at or above its certified lower bound (up to float32 rounding of the model)
    pts = torch.cat([sample_perturbations(x, eps, 2.0, n=300, domain=(0.0, 1.0)),
                     pgd_margin(model, x, y, eps, 2.0, steps=30, domain=(0.0, 1.0))[None]])
    with torch.no_grad():
        z = model(pts.flatten(0, 1)).double().unflatten(0, pts.shape[:2])
    reached = z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1)) - z  # (n, B, C): z_y - z_j
    other = m != math.inf  # j != y
    assert torch.isfinite(m[other]).all()
    assert (reached[:, other] >= m[other] - 1e-5 * (1 + z.abs().amax())).all()
    # bcpc's own checks run the model in float64, or in its own dtype where a cast inside forbids it
    small = cert.certified_radius(x, y).max().item() * 0.9
    rep = bcpc.testing.audit(cert, x, y, small, pgd_steps=10, restarts=1, sphere_samples=16)
    assert rep.certified >= 1 and rep.violations == 0
    cert.guard = "strict"
    if spelling in _CAST_INSIDE:  # a cast to float32 or float16 inside: the model cannot run in float64
        with pytest.raises(ConfigError, match="guard='strict'.*guard=True"):
            cert.margins(x, y, eps)
    else:
        cert.margins(x, y, eps)


class _TieRoundTrip(nn.Module):
    """``h = x + b1 + b2`` in float32, rounded to a half dtype next to a tie between two of its
    values (constants found by a new-user review): float32 and the float64 copy land on
    different sides of the tie, one half-precision step apart."""

    def __init__(self, half, b1, b2, tie):
        super().__init__()
        self.half = half
        self.b1, self.b2 = torch.tensor([b1, 0.0]), torch.tensor([b2, 0.0])
        self.w, self.bias = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([-tie, 0.0])

    def forward(self, x):
        h = x + self.b1
        h = h + self.b2
        return F.linear(h.to(self.half).float(), self.w, self.bias)


@pytest.mark.parametrize("half,v,b1,b2,lo,hi", [
    (torch.float16, 0.5285548567771912, 0.5597227811813354, 0.493265300989151, 1.5810546875, 1.58203125),
    (torch.bfloat16, 0.5108126401901245, 0.35113075375556946, 0.5638379454612732, 1.421875, 1.4296875)])
def test_a_half_round_trip_at_a_tie_is_not_certified_past_the_tie(half, v, b1, b2, lo, hi):
    model = _TieRoundTrip(half, b1, b2, (lo + hi) / 2).eval()
    x = torch.tensor([[v + 0.01, 0.5]])
    y = model(x).argmax(1)
    xp = torch.tensor([[v, 0.5]])  # a point of the ball below: the float32 model rounds it past the tie
    assert y.item() == 0 and model(xp).argmax(1).item() == 1
    eps = float((x.double() - xp.double()).norm()) + 1e-12
    cert = bcpc.compile(model, "l2", example_input=x, input_domain=(0.0, 1.0))
    zp = model(xp).double()
    assert cert.margins(x, y, eps)[0, 1] <= zp[0, 0] - zp[0, 1]
    assert not cert.certify(x, y, eps).item()
    assert cert.certified_radius(x, y).item() < eps - 1e-9


class _NarrowArithmetic(nn.Module):
    """A step gated so that neither the clean point nor the compile-time probes see it: 1 at
    x0 = 0, 0 from x0 = 0.05 on; then arithmetic in a half dtype, where one step is 1 (found by
    a new-user review: certified, and the model flips a whole float16 step inside the ball)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def forward(self, x):
        t = torch.relu(0.05 - x[:, :1]) * 20.0
        if self.spelling == "(t.half() + 1024) - 1024":
            h = ((t.half() + 1024.0) - 1024.0).float()
        elif self.spelling == "t.to(torch.bfloat16) * 2 + 256":
            h = (t.to(torch.bfloat16) * 2.0 + 256.0).float() - 256.0
        else:  # a float64 model computing in float32
            h = ((t.float() + 2.0 ** 23) - 2.0 ** 23).double()
        return torch.cat([-h, torch.full_like(h, -0.2)], 1)


@pytest.mark.parametrize("spelling", ["(t.half() + 1024) - 1024", "t.to(torch.bfloat16) * 2 + 256",
                                      "float64 model, (t.float() + 2**23) - 2**23"])
def test_arithmetic_in_a_less_precise_dtype_is_refused(spelling):
    dtype = torch.float64 if spelling.startswith("float64") else torch.float32
    with pytest.raises(UnsupportedOpError, match=r"runs on a value the model holds in (float16|bfloat16|float32).*"
                                                 r"Cast back to the model's dtype"):
        bcpc.compile(_NarrowArithmetic(spelling), "l2", example_input=torch.zeros(1, 8, dtype=dtype),
                     input_domain=(0.0, 1.0))
    # moving and selecting values rounds nothing: allowed between the casts
    model = Lambda(lambda s, x: torch.cat([s.lin(x).half().relu().flatten(1), s.lin(x)], 1).float(), 12)
    model.add_module("lin", nn.Linear(8, 6))
    bcpc.compile(model.eval(), "l2", example_input=torch.rand(1, 8), input_domain=(0.0, 1.0))


def test_a_narrowing_cast_that_can_overflow_certifies_nothing():
    """float16 rounds values above 65504 to inf, which no finite ball holds: the cast's ball
    radius becomes infinite where the set can reach the limit (found by a new-user review: a
    .half().float() round trip certified an input whose neighbour's logit was -inf)."""

    class HalfRoundTrip(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(4, 1)

        def forward(self, x):
            h = self.l1(x).half().float()
            return torch.cat([70000.0 - h, -h.clamp(max=0.0)], 1)

    model = HalfRoundTrip().eval()
    with torch.no_grad():
        model.l1.weight.fill_(1000.0)
        model.l1.bias.fill_(61600.0)
    x = torch.tensor([[1.0, 1.0, 1.0, 0.9], [0.0, 0.0, 0.0, 0.0]])  # h = 65500 (fp16 65504), h = 61600
    y = model(x).argmax(1)
    assert y.tolist() == [0, 0]
    neighbour = x[:1].clone()
    neighbour[0, 3] += 0.05  # h = 65550: inf in float16, inside the ball and the domain
    assert model(neighbour).argmax(1).item() == 1 and torch.isinf(model(neighbour)).any()
    for method in ("bcp", "lipschitz", "ibp"):
        cert = bcpc.compile(model, norm="l2", example_input=x[:1], input_domain=(0.0, 1.0), method=method)
        ok = cert.certify(x, y, 0.05)
        assert not ok[0], method  # the overflowing input: never certified
        assert ok[1], method  # far from the limit: the cast rule still certifies
        assert cert.certified_radius(x[:1], y[:1]).item() < 0.05 * 0.5, method  # only 0.02 of headroom to 65520


class _Pool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x).flatten(1)


@pytest.mark.parametrize("pool", [lambda x: F.avg_pool2d(x, 2, divisor_override=-4),
                                  nn.AvgPool2d(2, divisor_override=-4),
                                  lambda x: F.avg_pool3d(x.unsqueeze(1), 2, divisor_override=-1)])
def test_a_negative_avg_pool_divisor_is_refused(pool):
    # a negative divisor makes every pooling weight negative: the nonnegative-weights rule (Schur
    # bound, [pool(lower), pool(upper)] box) would give false certificates (a new-user review found it)
    with pytest.raises(UnsupportedOpError, match=r"divisor_override=-\d.*must be positive"):
        bcpc.compile(_Pool(pool), example_input=torch.rand(1, 2, 4, 4))


@pytest.mark.parametrize("pool", [lambda x: F.adaptive_avg_pool2d(x, (0, 2)), nn.Sequential(nn.Flatten(2), nn.AdaptiveMaxPool1d(0)),
                                  lambda x: F.adaptive_max_pool2d(x, 0)])
def test_an_empty_adaptive_pool_output_is_refused(pool):
    with pytest.raises(UnsupportedOpError, match=r"output_size=.*at least 1"):
        bcpc.compile(_Pool(pool), example_input=torch.rand(1, 2, 4, 4))

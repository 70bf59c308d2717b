"""One soundness test generated over the whole rule table: every registered rule must have a case
here (a tiny model that exercises it), or the test for that rule fails and says so."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
from bcpc import registry
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
    if name == "batch_norm":
        return Lambda(lambda s, x: s.bn(x), 50), img, dict(bn=_bn(2))
    if name == "mul":
        return Lambda(lambda s, x: x * s.k, 50), img, dict(k=nn.Parameter(torch.randn(1, 2, 1, 1)))
    if name == "div":
        return Lambda(lambda s, x: x / -0.7, 50), img, {}
    if name in ("relu", "tanh", "sigmoid"):
        fn = getattr(torch, name)
        return Lambda(lambda s, x: fn(s.lin(x)), 6), (4,), dict(lin=nn.Linear(4, 6))
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
    if name == "max_pool2d":
        return Lambda(lambda s, x: F.max_pool2d(x, 3, stride=2, padding=1), 18), img, {}
    if name == "avg_pool2d":
        return Lambda(lambda s, x: F.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False), 72), img, {}
    if name == "adaptive_avg_pool2d":
        return Lambda(lambda s, x: F.adaptive_avg_pool2d(x, (2, 3)), 12), img, {}
    return None


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

"""Tightness pins: small hand-computed cases with exact expected bounds."""
import math

import pytest
import torch
from torch import nn

import bcpc
from bcpc.lipschitz import SAFETY

D = torch.float64


def linear(w, b):
    lin = nn.Linear(len(w[0]), len(w)).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w, dtype=D))
        lin.bias.copy_(torch.tensor(b, dtype=D))
    return lin


def test_linear_box_uses_row_norms_and_ball_uses_spectral_norm():
    # y = W x + b, W = [[1, 2], [3, -4]], l2 eps = 1: IA half-widths |W| 1 = (3, 7),
    # row norms (sqrt 5, 5): the row-norm box is tighter on both rows.
    model = nn.Sequential(linear([[1, 2], [3, -4]], [0.5, -1]), nn.ReLU(), linear([[1, 0], [0, 1]], [0, 0]))
    x = torch.tensor([[0.2, 0.3]], dtype=D)
    nb = bcpc.compile(model, "l2", example_input=x).node_bounds(x, 1.0)
    b = nb["_0"]
    center = torch.tensor([1.3, -1.6], dtype=D)
    torch.testing.assert_close(b.center[0], center)
    torch.testing.assert_close(b.lower[0], center - torch.tensor([math.sqrt(5), 5.0], dtype=D))
    torch.testing.assert_close(b.upper[0], center + torch.tensor([math.sqrt(5), 5.0], dtype=D))
    sigma = math.sqrt((30 + math.sqrt(500)) / 2)  # largest singular value of W
    assert b.radius.item() == pytest.approx(sigma * (1 + SAFETY), rel=1e-12)
    assert b.radius.item() >= sigma
    r = nb["_1"]  # relu: [relu(l), relu(u)]
    torch.testing.assert_close(r.lower[0], torch.zeros(2, dtype=D))
    torch.testing.assert_close(r.upper[0], torch.tensor([1.3 + math.sqrt(5), 3.4], dtype=D))


@pytest.mark.parametrize("method,expected", [
    ("bcp", -(0.2 + math.sqrt(0.24))),  # ball ∩ box: p0 stops at the box face 0, p1 takes the rest of the ball
    ("ibp", -0.7),  # box only: p0 = 0, p1 = 0.7
    ("lipschitz", -0.1 - 0.5 * math.sqrt(2)),  # ball only: c.x - ||c|| eps
])
def test_last_layer_margin_exact_values(method, expected):
    # logits = p (identity last layer), x = (0.1, 0.2), l2 eps = 0.5, domain [0, 1]; margin z_0 - z_1.
    model = nn.Sequential(linear([[1, 0], [0, 1]], [0, 0]))
    x = torch.tensor([[0.1, 0.2]], dtype=D)
    cert = bcpc.compile(model, "l2", example_input=x, input_domain=(0, 1), method=method)
    m = cert.margins(x, torch.tensor([0]), 0.5)
    assert m[0, 1].item() == pytest.approx(expected, abs=1e-12)
    assert m[0, 0].item() == math.inf


def test_linf_input_ball_circumscribes_the_cube():
    model = nn.Sequential(nn.Flatten(), linear([[1, 1, 1, 1], [1, -1, 1, -1]], [0, 0]))
    x = torch.zeros(1, 2, 2, dtype=D) + 0.5
    nb = bcpc.compile(model, "linf", example_input=x).node_bounds(x, 0.1)
    assert nb["input_1"].radius.item() == pytest.approx(0.2)  # sqrt(4) * 0.1
    # IA is exact for linf on the first layer: |W| 1 eps = 0.4 on both rows
    torch.testing.assert_close(nb["_1"].upper[0] - nb["_1"].center[0], torch.tensor([0.4, 0.4], dtype=D))


def test_lp_input_radius_factor():
    model = nn.Sequential(linear([[1.0] * 4, [-1.0] * 4], [0, 0]))
    x = torch.zeros(1, 4, dtype=D)
    for p, factor in (("l1", 1.0), ("l3", 4 ** (0.5 - 1 / 3)), ("l2", 1.0)):
        nb = bcpc.compile(model, p, example_input=x).node_bounds(x, 0.5)
        assert nb["input_1"].radius.item() == pytest.approx(0.5 * factor)


def test_max_pool_radius_factor_is_ceil_k_over_s():
    model = nn.Sequential(nn.MaxPool2d(2, stride=1), nn.Flatten(), linear([[1.0] * 4, [0.0] * 4], [0, 0]))
    x = torch.rand(1, 1, 3, 3, dtype=D)
    nb = bcpc.compile(model, example_input=x).node_bounds(x, 0.3)
    assert nb["_0"].radius.item() == pytest.approx(0.6)  # ceil(2/1) * 0.3


def test_avg_pool_radius_factor_is_its_norm():
    model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), linear([[1.0] * 4, [0.0] * 4], [0, 0]))
    x = torch.rand(1, 1, 4, 4, dtype=D)
    nb = bcpc.compile(model, example_input=x).node_bounds(x, 0.3)
    assert nb["_0"].radius.item() == pytest.approx(0.15 * (1 + SAFETY), rel=1e-12)  # ||2x2 mean|| = 1/2


def test_cat_radius_adds_in_quadrature():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = linear([[1.0] * 4, [0.0] * 4], [0, 0])

        def forward(self, x):
            return self.fc(torch.cat([x, 2 * x], dim=1))

    x = torch.rand(1, 2, dtype=D)
    nb = bcpc.compile(Cat(), example_input=x).node_bounds(x, 0.3)
    assert nb["cat"].radius.item() == pytest.approx(0.3 * math.sqrt(5))


def test_input_domain_clips_the_box():
    model = nn.Sequential(linear([[1, 0], [0, 1]], [0, 0]))
    x = torch.tensor([[0.0, 0.95]], dtype=D)
    nb = bcpc.compile(model, example_input=x, input_domain=(0, 1)).node_bounds(x, 0.1)
    torch.testing.assert_close(nb["input_1"].lower[0], torch.tensor([0.0, 0.85], dtype=D))
    torch.testing.assert_close(nb["input_1"].upper[0], torch.tensor([0.1, 1.0], dtype=D))

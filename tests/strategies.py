"""Hypothesis strategies: random architectures covering every supported op family."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": lambda: nn.Softplus(beta=2.0),
    "elu": lambda: nn.ELU(0.5),
}


class Functional(nn.Module):
    """Wraps a functional activation spelling (F.relu, torch.tanh, x.sigmoid(), ...)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        if self.name == "relu":
            return F.relu(x)
        if self.name == "leaky_relu":
            return F.leaky_relu(x, negative_slope=0.2)
        if self.name == "tanh":
            return torch.tanh(x)
        if self.name == "sigmoid":
            return x.sigmoid()
        if self.name == "softplus":
            return F.softplus(x)
        return F.elu(x)


def activation(name: str, functional: bool) -> nn.Module:
    return Functional(name) if functional else ACTIVATIONS[name]()


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm nontrivial running statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)


class Residual(nn.Module):
    def __init__(self, c: int, act: nn.Module, bn: bool, subtract: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.act = act
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.subtract = subtract

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        out = x - out if self.subtract else out + x
        return self.act(out)


class TwoBranch(nn.Module):
    """Two conv branches concatenated on channels, with input normalisation and constant scaling."""

    def __init__(self, cin: int, side: int, act: nn.Module, classes: int):
        super().__init__()
        self.register_buffer("mean", torch.full((1, cin, 1, 1), 0.4))
        self.register_buffer("std", torch.full((1, cin, 1, 1), 0.7))
        self.a = nn.Conv2d(cin, 3, 3, 1, 1)
        self.b = nn.Conv2d(cin, 2, 1)
        self.act = act
        self.fc = nn.Linear(5 * (side // 2) * (side // 2), classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        h = torch.cat([self.act(self.a(x)), 0.5 * self.b(x)], dim=1)
        h = F.avg_pool2d(h, 2)
        return self.fc(h.view(h.size(0), -1))


@st.composite
def architectures(draw):
    """(model, input_shape) for a random small architecture; parameters seeded from the draw."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kind = draw(st.sampled_from(["mlp", "conv", "residual", "branch"]))
    act_name = draw(st.sampled_from(sorted(ACTIVATIONS)))
    functional = draw(st.booleans())
    classes = draw(st.integers(2, 5))
    cin = draw(st.integers(1, 2))
    side = draw(st.sampled_from([4, 6, 8]))
    bn = draw(st.booleans())
    if kind == "mlp":
        depth = draw(st.integers(1, 3))
        layers, width = [nn.Flatten()], cin * side * side
        for _ in range(depth):
            h = draw(st.integers(2, 12))
            layers += [nn.Linear(width, h)]
            if bn:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation(act_name, functional))
            if draw(st.booleans()):
                layers.append(nn.Dropout(0.3))
            width = h
        layers.append(nn.Linear(width, classes, bias=draw(st.booleans())))
        model = nn.Sequential(*layers)
    elif kind == "conv":
        depth = draw(st.integers(1, 2))
        layers, c, s = [], cin, side
        for _ in range(depth):
            k = draw(st.integers(1, 3))
            stride = draw(st.integers(1, 2))
            pad = draw(st.integers(0, 1))
            cout = draw(st.integers(1, 4))
            if (s + 2 * pad - k) // stride + 1 < 2:
                stride, pad = 1, 1
            layers.append(nn.Conv2d(c, cout, k, stride, pad))
            s = (s + 2 * pad - k) // stride + 1
            c = cout
            if bn:
                layers.append(nn.BatchNorm2d(c))
            layers.append(activation(act_name, functional))
        pool = draw(st.sampled_from(["none", "max", "avg", "adaptive"]))
        if pool == "max" and s >= 2:
            layers.append(nn.MaxPool2d(2, stride=draw(st.integers(1, 2))))
            s = (s - 2) // layers[-1].stride + 1
        elif pool == "avg" and s >= 2:
            layers.append(nn.AvgPool2d(2))
            s = s // 2
        elif pool == "adaptive":
            layers.append(nn.AdaptiveAvgPool2d(2))
            s = 2
        layers += [nn.Flatten(), nn.Linear(c * s * s, draw(st.integers(2, 8))), activation(act_name, functional)]
        layers.append(nn.Linear(layers[-2].out_features, classes))
        model = nn.Sequential(*layers)
    elif kind == "residual":
        c = draw(st.integers(1, 3))
        model = nn.Sequential(
            nn.Conv2d(cin, c, 3, 1, 1), activation(act_name, functional),
            Residual(c, activation(act_name, functional), bn, draw(st.booleans())),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes),
        )
    else:
        side = side if side % 2 == 0 else side + 1
        model = TwoBranch(cin, side, activation(act_name, functional), classes)
    randomize_batchnorm(model, gen)
    model = model.double().eval()
    return model, (cin, side, side)

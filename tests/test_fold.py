"""A convolution read only by a BatchNorm gets one box, through the folded map
(bcpc.rules.affine.conv_batch_norm_box): the same box as a box after each, sound, and without the
convolution's box kept for backward."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
import bcpc.passes.analysis as analysis
from bcpc import models
from bcpc.testing import check_soundness, pgd_margin, sample_perturbations

CONVS = {1: (nn.Conv1d, nn.BatchNorm1d, (2, 9)), 2: (nn.Conv2d, nn.BatchNorm2d, (2, 6, 6)),
         3: (nn.Conv3d, nn.BatchNorm3d, (2, 5, 5, 5))}


def _randomise(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        if bn.affine:
            bn.weight.uniform_(-2, 2)  # negative scales swap the box ends
            bn.bias.uniform_(-0.5, 0.5)
    return bn


class ConvBnNet(nn.Module):
    """conv -> BatchNorm -> ReLU, twice, then a linear head; the BatchNorm spelled as a module or
    through F.batch_norm on the module's own state."""

    def __init__(self, nd, bias=True, affine=True, functional=False):
        super().__init__()
        conv, bn, shape = CONVS[nd]
        self.shape, self.functional = shape, functional
        self.c1, self.b1 = conv(2, 4, 3, padding=1, bias=bias), _randomise(bn(4, affine=affine))
        self.c2, self.b2 = conv(4, 3, 3, stride=2, bias=bias), _randomise(bn(3, affine=affine))
        self.head = nn.LazyLinear(3)
        self.eval()
        self.head(torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(torch.zeros((1,) + shape))))))).flatten(1))
        self.train()

    def norm(self, bn, h):
        if self.functional:
            return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, 0.1, bn.eps)
        return bn(h)

    def forward(self, x):
        h = torch.relu(self.norm(self.b1, self.c1(x)))
        h = torch.relu(self.norm(self.b2, self.c2(h)))
        return self.head(h.flatten(1))


class Shared(nn.Module):
    """The first convolution's output is also read by a residual sum: it is not folded."""

    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv2d(2, 2, 3, padding=1), _randomise(nn.BatchNorm2d(2))
        self.head = nn.Linear(2 * 36, 3)

    def forward(self, x):
        h = self.c(x)
        return self.head((torch.relu(self.b(h)) + h).flatten(1))


def _unfolded(monkeypatch, model, x, **kw):
    with monkeypatch.context() as m:
        m.setattr(analysis, "_folds_into", lambda node: False)
        return bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), **kw)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("variant", [dict(), dict(bias=False, affine=False), dict(functional=True)])
def test_folded_box_is_sound_and_equals_the_unfolded_box(monkeypatch, nd, variant):
    torch.manual_seed(nd)
    model = ConvBnNet(nd, **variant).double().eval()
    x = torch.rand((3,) + model.shape, dtype=torch.float64)
    y = model(x).argmax(1)
    eps = 0.3
    for method in ("bcp", "ibp"):
        cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), method=method)
        assert cert.code.count("conv_batch_norm_box") == 2, cert.code
        pts = torch.cat([sample_perturbations(x, eps, 2.0, n=100, domain=(0.0, 1.0)),
                         pgd_margin(model, x, y, eps, 2.0, steps=30, domain=(0.0, 1.0))[None]])
        rep = check_soundness(cert, model, x, y, eps, pts)
        assert rep.nodes_checked >= 6
        folded = cert.node_bounds(x, eps)
        plain = _unfolded(monkeypatch, model, x, method=method)
        assert "conv_batch_norm_box" not in plain.code
        unfolded = plain.node_bounds(x, eps)
        assert folded.keys() == unfolded.keys()
        for name, b in unfolded.items():  # every node, the folded convolutions' own boxes included
            a = folded[name]
            scale = 1 + b.center.abs().max()
            torch.testing.assert_close(a.lower, b.lower, rtol=0, atol=1e-12 * scale)
            torch.testing.assert_close(a.upper, b.upper, rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(cert.margins(x, y, eps), plain.margins(x, y, eps), rtol=0, atol=1e-10)


def test_training_mode_loss_and_gradients_equal_the_unfolded_ones(monkeypatch):
    torch.manual_seed(0)
    model = ConvBnNet(2).double().train()
    x, y = torch.rand(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    grads = []
    for fold in (True, False):
        m = copy.deepcopy(model)
        cert = (bcpc.compile(m, "l2", example_input=x[:1], input_domain=(0.0, 1.0)) if fold
                else _unfolded(monkeypatch, m, x))
        assert ("conv_batch_norm_box" in cert.code) == fold
        torch.manual_seed(1)
        loss = cert.loss(x, y, 0.3, 1.0)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, list(m.parameters()))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_convolution_with_another_reader_is_not_folded():
    model = Shared().double().eval()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0))
    assert "conv_batch_norm_box" not in cert.code
    y = model(x).argmax(1)
    check_soundness(cert, model, x, y, 0.3, sample_perturbations(x, 0.3, 2.0, n=50, domain=(0.0, 1.0)))


def test_resnet_certified_step_keeps_under_three_times_the_plain_activations():
    """Issue 16's memory target on the model with BatchNorm: what a certified training step keeps for
    backward, against a plain step (counted exactly, storage by storage)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench import saved_for_backward_mib

    torch.manual_seed(0)
    model = models.resnet_small(3, 10).train()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))  # 2.4x here; 3.5x without the fold
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0))
    cert.loss(x, y, 0.1, 1.0)
    cert.propagation.lip.eval()  # the power-iteration step (torch.func) runs outside saved-tensor hooks
    plain = saved_for_backward_mib(lambda: F.cross_entropy(model(x), y), model.parameters())
    certified = saved_for_backward_mib(lambda: cert.loss(x, y, 0.1, 1.0), model.parameters())
    assert certified <= 3.0 * plain, (certified, plain)

"""Real architectures (tests/architectures.py) compile, certify, and pass the attack-based
soundness check in float64: every intermediate box and ball, and the margins, against sampled
points of the l2 ball and a PGD attack on the margin."""
import pytest
import torch
from torch import nn

import bcpc
from bcpc.testing import check_soundness, pgd_margin, sample_perturbations

from architectures import ARCHITECTURES

D = torch.float64


def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen, dtype=D) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=D) + 0.5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_compiles_certifies_and_is_sound(name):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    make, shape = ARCHITECTURES[name]
    model = make().double()
    _randomize_batchnorm(model, gen)
    model.eval()
    x = torch.rand((3,) + shape, generator=gen, dtype=D)
    cert = bcpc.compile(model, "l2", example_input=x, input_domain=(0.0, 1.0))
    torch.testing.assert_close(cert(x, 0.0).logits, model(x), rtol=1e-9, atol=1e-9)
    y = model(x).argmax(1)
    eps = 0.05
    margins = cert.margins(x, y, eps)
    assert torch.isfinite(margins[torch.arange(3), (y + 1) % margins.shape[1]]).all()
    points = torch.cat([sample_perturbations(x, eps, 2.0, n=24, domain=(0.0, 1.0)),
                        pgd_margin(model, x, y, eps, 2.0, steps=20, domain=(0.0, 1.0))[None]])
    report = check_soundness(cert, model, x, y, eps, points)
    assert report.nodes_checked >= 5 and not report.violations, report.violations[:3]

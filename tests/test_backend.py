"""``bcpc.compile(..., backend=...)``: the torch.compile'd training path gives the same bounds and
gradients as the eager one, with the torch path of the fused kernels in the compiled graph
(``BCPC_FUSED_COMPILE=0``) or their custom ops (``1``); the certification path is untouched; a
bad backend name is a clear error."""
import pytest
import torch
from torch import nn

import bcpc
from bcpc.errors import ConfigError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU(),
                         nn.Linear(16, 5))


@pytest.mark.parametrize("setting", ["0", "1"])
def test_inductor_training_path_matches_eager(setting, monkeypatch):
    monkeypatch.setenv("BCPC_FUSED_COMPILE", setting)
    torch.compiler.reset()  # the setting is read when a graph is traced
    model = _model()
    x = torch.rand(6, 1, 9, 9)
    y = torch.arange(6) % 5
    eager = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0))
    fast = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), backend="inductor")
    for cert in (eager, fast):  # the same frozen Lipschitz estimates in both (no power-iteration step)
        cert.propagation.lip.eval()
        with torch.no_grad():  # the cache's first 50 power-iteration steps, eagerly (not compiled)
            cert.propagation(x, 0.3, y, False)
    grads, losses, margins = [], [], []
    for cert in (eager, fast):
        model.zero_grad()
        loss = cert.loss(x, y, 0.3, 0.5)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            margins.append(cert(x, 0.3, y, sound=False).margins)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finite = torch.isfinite(margins[0])
    assert torch.equal(finite, torch.isfinite(margins[1]))
    torch.testing.assert_close(margins[0][finite], margins[1][finite], rtol=1e-5, atol=1e-6)
    assert fast._compiled is not None  # the training path really went through torch.compile
    # certification never goes through the compiled module: identical certificates and margins
    model.eval()
    assert torch.equal(eager.certify(x, y, 0.3), fast.certify(x, y, 0.3))
    assert torch.equal(eager.margins(x, y, 0.3), fast.margins(x, y, 0.3))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown torch.compile backend 'inductr'"):
        bcpc.compile(_model(), "l2", input_shape=(1, 9, 9), backend="inductr")

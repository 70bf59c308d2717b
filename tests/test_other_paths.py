"""Ways for the graph bcpc certifies to differ from what ``model(x)`` runs, each found by a new-user
review as a false certificate (certified margin 3.5 where the model's is -4.5 at distance eps), and
each now refused at compile time: random draws, torch's code replaced, and forward taking another
path under tracing than on tensors."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
from bcpc.errors import BcpcError


def _toy(extra):
    """Margin z0 - z1 = h0 unless ``extra`` changes it; ``extra(h0)`` acts only where h0 > 5."""

    class Toy(nn.Module):
        def forward(self, x):
            h0 = x[:, :1]
            z0 = extra(h0)
            return torch.cat([z0, torch.zeros_like(z0)], 1)

    return Toy().double().eval()


X = torch.tensor([[4.5, 0.0]], dtype=torch.float64)


def _refused(model, *words):
    with pytest.raises(BcpcError) as caught:
        bcpc.compile(model, example_input=X)
    text = str(caught.value)
    assert all(w in text for w in words), text


@pytest.mark.parametrize("draw", [
    lambda h: h - 20 * torch.bernoulli(torch.full_like(h, 0.5)) * F.relu(h - 5),
    lambda h: h - 20 * torch.ones_like(h).bernoulli(0.5) * F.relu(h - 5),
    lambda h: h - 20 * torch.poisson(torch.ones_like(h)) * F.relu(h - 5),
    lambda h: h - 20 * torch.normal(torch.zeros_like(h), 1.0).abs() * F.relu(h - 5),
    lambda h: h - 20 * torch.zeros_like(h).uniform_() * F.relu(h - 5),
], ids=["torch.bernoulli", "Tensor.bernoulli", "torch.poisson", "torch.normal", "uniform_"])
def test_random_ops_are_refused_whatever_their_arguments(draw):
    _refused(_toy(draw), "random")


@pytest.mark.parametrize("coin", [
    lambda: float(torch.rand(1) < 0.5), lambda: float(np.random.rand() < 0.5), lambda: float(random.random() < 0.5),
], ids=["torch.rand", "np.random", "random"])
def test_a_draw_made_once_while_tracing_is_refused(coin):
    _refused(_toy(lambda h: h - 20 * coin() * F.relu(h - 5)), "drew random numbers while torch.fx traced it")


class _WithAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        z0 = self.act(x[:, :1])
        return torch.cat([z0, torch.zeros_like(z0)], 1)


def _relu_unless_large(t):
    return torch.relu(t) - 20 * torch.relu(t - 5)


def test_a_layer_whose_forward_is_replaced_on_the_instance_is_refused():
    model = _WithAct().double().eval()
    model.act.forward = _relu_unless_large  # as adapter libraries patch layers
    _refused(model, "'act' (ReLU)", "forward replaced on the instance")


def test_torch_code_replaced_before_compile_is_refused(monkeypatch):
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, t: _relu_unless_large(t))
    _refused(_WithAct().double().eval(), "ReLU.forward is not torch's function")
    monkeypatch.undo()
    monkeypatch.setattr(F, "relu", lambda t, inplace=False: _relu_unless_large(t))
    _refused(_WithAct().double().eval(), "torch.nn.functional.relu is not torch's function")
    monkeypatch.undo()
    bcpc.compile(_WithAct().double().eval(), example_input=X)  # torch's own again: compiles


def test_a_model_with_its_own_call_is_refused():
    class Called(_WithAct):
        def __call__(self, x):
            return _relu_unless_large(super().__call__(x))

    _refused(Called().double().eval(), "defines its own __call__")


def test_a_forward_that_falls_back_when_tracing_fails_is_refused():
    class FastPath(nn.Module):
        def forward(self, x):
            z0 = x[:, :1]
            try:  # a NumPy fast path, which fails on torch.fx's traced values (a TypeError)
                big = z0.detach().numpy() > 5
                z0 = z0 - 20 * torch.from_numpy(big * (z0.detach().numpy() - 5))
            except Exception:
                pass
            return torch.cat([z0, torch.zeros_like(z0)], 1)

    _refused(FastPath().double().eval(), "raised and caught an exception while torch.fx traced it", "TypeError")


def _tracing_now():
    return torch.fx._symbolic_trace.is_fx_tracing()


def test_a_helper_that_asks_whether_it_is_traced_is_refused():
    """forward does not name the check itself (the name scan of forward cannot see it)."""
    _refused(_toy(lambda h: h if _tracing_now() else _relu_unless_large(h)), "asks whether torch.fx is tracing it")


def test_optional_lookups_in_forward_still_compile():
    """getattr with a default and hasattr (torch's Module.__getattr__ raises inside them) are not
    exceptions of forward's own path."""

    class Lookups(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            extra = getattr(self, "extra", None)
            fc = self.fc if hasattr(self, "fc") and extra is None else extra
            return fc(x)

    model = Lookups().double().eval()
    cert = bcpc.compile(model, example_input=X)
    torch.testing.assert_close(cert(X, 0.1).logits, model(X))

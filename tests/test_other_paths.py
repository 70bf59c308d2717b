"""Ways for the graph bcpc certifies to differ from what ``model(x)`` runs, each found by a new-user
review as a false certificate (certified margin 3.5 where the model's is -4.5 at distance eps), and
each now refused at compile time: random draws, torch's code replaced, and forward taking another
path under tracing than on tensors."""
import functools
import importlib
import random
import types

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
    lambda h: h - 20 * torch.ops.aten.bernoulli.p(torch.ones_like(h), 0.5) * F.relu(h - 5),
    lambda h: h - 20 * F.dropout2d(torch.ones_like(h)[..., None], 0.5)[..., 0] * F.relu(h - 5),
    lambda h: h - 20 * F.gumbel_softmax(torch.zeros_like(h), hard=True) * F.relu(h - 5),
    lambda h: h - 20 * torch.ones_like(h).bernoulli(0.5) * F.relu(h - 5),
    lambda h: h - 20 * torch.poisson(torch.ones_like(h)) * F.relu(h - 5),
    lambda h: h - 20 * torch.normal(torch.zeros_like(h), 1.0).abs() * F.relu(h - 5),
    lambda h: h - 20 * torch.zeros_like(h).uniform_() * F.relu(h - 5),
], ids=["torch.bernoulli", "aten.bernoulli.p", "F.dropout2d", "F.gumbel_softmax", "Tensor.bernoulli",
        "torch.poisson", "torch.normal", "uniform_"])
def test_random_ops_are_refused_whatever_their_arguments(draw):
    _refused(_toy(draw), "random")


@pytest.mark.parametrize("coin", [
    lambda: float(torch.rand(1) < 0.5), lambda: float(np.random.rand() < 0.5), lambda: float(random.random() < 0.5),
    lambda: float(np.random.default_rng().random() < 0.5), lambda: float(random.Random().random() < 0.5),
    lambda: float(torch.rand(1, generator=torch.Generator().manual_seed(torch.Generator().seed())) < 0.5),
], ids=["torch.rand", "np.random", "random", "np.default_rng", "random.Random", "torch.Generator"])
def test_a_draw_made_once_while_tracing_is_refused(coin):
    """A draw from the global generators, or from a generator made in forward (whose draws leave
    the global states as they were)."""
    _refused(_toy(lambda h: h - 20 * coin() * F.relu(h - 5)), "random numbers")


def test_dropout_functions_in_eval_mode_are_the_identity():
    class Drops(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            h = F.dropout1d(self.fc(x)[:, None], 0.5, self.training)[:, 0]
            return F.alpha_dropout(h, 0.2, training=self.training)

    model = Drops().double().eval()
    cert = bcpc.compile(model, example_input=X)
    assert set(cert.rules.values()) <= {"input", "linear", "getitem"}, cert.rules


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
    # as monkeypatching libraries write it: functools.wraps copies torch's name and module
    monkeypatch.setattr(nn.ReLU, "forward", functools.wraps(nn.ReLU.forward)(lambda self, t: _relu_unless_large(t)))
    _refused(_WithAct().double().eval(), "ReLU.forward is not torch's function")
    monkeypatch.undo()
    monkeypatch.setattr(nn.ReLU, "forward", staticmethod(_relu_unless_large))
    _refused(_WithAct().double().eval(), "ReLU.forward is not torch's function")
    monkeypatch.undo()
    # the C function F.relu calls, and the name nn.ReLU's module reads F under
    monkeypatch.setattr(torch._C._nn, "hardtanh", lambda t, lo=-1.0, hi=1.0: _relu_unless_large(t))
    _refused(_WithAct().double().eval(), "torch._C._nn.hardtanh is not torch's function")
    monkeypatch.undo()
    monkeypatch.setattr(nn.modules.activation, "F", types.SimpleNamespace(relu=_relu_unless_large))
    _refused(_WithAct().double().eval(), "torch.nn.modules.activation.F")
    monkeypatch.undo()
    bcpc.compile(_WithAct().double().eval(), example_input=X)  # torch's own again: compiles


def test_a_model_with_its_own_call_is_refused():
    class Called(_WithAct):
        def __call__(self, x):
            return _relu_unless_large(super().__call__(x))

    _refused(Called().double().eval(), "defines its own __call__")

    class Impl(_WithAct):
        def _call_impl(self, *args, **kwargs):
            return _relu_unless_large(super()._call_impl(*args, **kwargs))

    _refused(Impl().double().eval(), "defines its own _call_impl")
    compiled = _WithAct().double().eval()
    compiled._compiled_call_impl = lambda x: _relu_unless_large(compiled.forward(x))  # what model.compile() sets
    _refused(compiled, "was compiled with its .compile() method")


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


class _Countdown:
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == 0:
            raise StopIteration
        self.n -= 1
        return self.n


_MEMO: dict = {}


def _memoised_scale(key):
    try:
        return _MEMO[key]
    except KeyError:
        _MEMO[key] = 2.0
        return _MEMO[key]


def test_lookups_iterations_and_optional_imports_in_forward_still_compile():
    """Exceptions that say nothing of the traced values (a missing key or attribute, the end of an
    iteration, an optional import) are the model's own business, not a fallback path."""

    class Ordinary(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            try:
                scale = self.scale
            except AttributeError:  # checkpoints from before the attribute existed
                scale = 1.0
            try:
                importlib.import_module("a_module_that_is_not_installed")
            except ImportError:
                pass
            h = self.fc(x) * scale * _memoised_scale("k")
            for _ in _Countdown(2):
                h = h + 1.0
            return h

    _MEMO.clear()  # the first lookup misses while fx traces
    model = Ordinary().double().eval()
    cert = bcpc.compile(model, example_input=X)
    torch.testing.assert_close(cert(X, 0.1).logits, model(X))


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


_PRIVATE = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("coin", [
    lambda: float(torch.empty(1).bernoulli_(0.5, generator=_PRIVATE)),
    lambda: float(torch.ops.aten.bernoulli.p(torch.zeros(1), 0.5, generator=_PRIVATE)),
    lambda: float(__import__("secrets").randbelow(2)),
], ids=["Tensor.bernoulli_(generator=)", "aten.bernoulli.p(generator=)", "secrets"])
def test_draws_from_a_private_generator_or_deep_in_a_library_are_refused(coin):
    """A generator of the model's own leaves the global states as they were; the standard
    library's secrets draws several calls below the model's code."""
    _refused(_toy(lambda h: h - 20 * coin() * F.relu(h - 5)), "random numbers")


def test_a_replaced_vf_function_is_refused_before_and_after_compile(monkeypatch):
    """nn.Dropout in eval mode is the identity in the graph and torch._VF.dropout in the model."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).double().eval()
    monkeypatch.setattr(torch._VF, "dropout", lambda t, p, train: _relu_unless_large(t), raising=False)
    _refused(model, "torch._VF.dropout is not torch's function")
    monkeypatch.undo()
    cert = bcpc.compile(model, example_input=X)
    monkeypatch.setattr(torch._VF, "dropout", lambda t, p, train: _relu_unless_large(t), raising=False)
    with pytest.raises(bcpc.errors.GraphMismatchError, match="torch._VF.dropout was added"):
        cert.certify(X, torch.tensor([0]), 0.1)


def test_a_numpy_scalar_attribute_is_its_number():
    """``self.scale = np.sqrt(d)``: torch.fx would write np.float64(...) into code that has no np."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale = nn.Linear(2, 2), np.sqrt(16.0)

        def forward(self, x):
            return self.fc(x) / self.scale

    model = Scaled().double().eval()
    cert = bcpc.compile(model, example_input=X)
    torch.testing.assert_close(cert(X, 0.1).logits, model(X))


def test_a_model_without_parameters_or_buffers_is_certified_in_float64():
    """A model with neither parameters nor buffers has no dtype of its own: the sound path ran it in
    torch's default float32, where (4.1 + 1e8) - 1e8 is 8, and certified class 0 at eps 5 with a
    margin of at least 3 while the float64 model's margin at x0 = -0.9 (distance 5) is -0.9."""
    model = _toy(lambda h0: (h0 + 1e8) - 1e8)
    assert not list(model.parameters()) and not list(model.buffers())
    x = torch.tensor([[4.1, 0.0]], dtype=torch.float64)
    cert = bcpc.compile(model, example_input=x)
    out = cert(x, 5.0)
    assert out.logits.dtype == out.margins.dtype == torch.float64
    torch.testing.assert_close(out.logits, model(x))
    worst = model(x - torch.tensor([[5.0, 0.0]], dtype=torch.float64))
    assert worst[0, 0] - worst[0, 1] < 0
    assert not bool(cert.certify(x, torch.tensor([0]), 5.0)[0])
    assert out.margins[0, 1] <= worst[0, 0] - worst[0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_made_half_precision_after_compile_is_not_certified(dtype):
    """A new-user review: model.half() after compile was accepted (the float64 twin rebuilt from the
    rounded weights), and its certificates ignored the float16 model's own rounding."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 2)
    cert = bcpc.compile(model, example_input=x)
    assert cert.certify(x, model(x).argmax(1), 1e-3).dtype == torch.bool
    model.to(dtype)
    with pytest.raises(bcpc.errors.ModelModeError, match="model.float"):
        cert.certify(x.to(dtype), torch.tensor([0]), 1e-3)
    with pytest.raises(bcpc.errors.ModelModeError):
        cert.certified_radius(x.to(dtype), torch.tensor([0]))
    model.float()
    cert.certify(x, torch.tensor([0]), 1e-3)  # back in float32: certified again (rebuilt twin)

"""Bad input gets a specific error that says what is wrong and what to do."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpc
from bcpc import errors


class Sine(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.sin(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


def small():
    return nn.Sequential(nn.Linear(4, 3))


def test_unsupported_op_names_node_op_line_and_how_to_fix():
    with pytest.raises(errors.UnsupportedOpError) as e:
        bcpc.compile(Sine(), example_input=torch.zeros(1, 4))
    msg = str(e.value)
    assert "'sin'" in msg and "torch.sin" in msg
    assert "test_errors.py" in msg and "torch.sin(x)" in msg  # the user's source line
    assert "Supported ops:" in msg and "torch.nn.Conv2d" in msg
    assert "docs/adding-a-rule.md" in msg


def test_untraceable_control_flow_names_the_module():
    with pytest.raises(errors.TraceError) as e:
        bcpc.compile(Wrapper(), example_input=torch.zeros(1, 4))
    assert "Branchy.forward" in str(e.value) and "control flow" in str(e.value)


class _Untraceable(nn.Module):
    """Spellings torch.fx cannot trace, each written as users write them (``s`` for self)."""

    def __init__(s, spelling):
        super().__init__()
        s.spelling, s.lin = spelling, nn.Linear(4, 4)

    def forward(s, x):
        h = s.lin(x)
        if s.spelling == "int(shape)":
            return h.narrow(1, 0, int(x.shape[1]))
        if s.spelling == "float(value)":
            return h * float(x.sum())
        if s.spelling == "for over chunks":
            out = 0
            for c in h.chunk(2, 1):
                out = out + c
            return out
        h[:, 0] = 0.0  # item assignment
        return h


@pytest.mark.parametrize("spelling,advice", [
    ("int(shape)", "h.view(h.shape[0], -1)"), ("float(value)", "keep it a tensor op"),
    ("for over chunks", "a, b = h.chunk(2, 1)"), ("item assignment", "out of place")])
def test_untraceable_spellings_get_advice_that_fits(spelling, advice):
    with pytest.raises(errors.TraceError) as e:
        bcpc.compile(_Untraceable(spelling), example_input=torch.zeros(1, 4))
    msg = str(e.value)
    assert "_Untraceable.forward (" in msg and "test_errors.py" in msg  # the method, though its self is `s`
    assert advice in msg and "if/for on tensor values" not in msg  # not the generic hint


class Product(nn.Module):
    def forward(self, x):
        return x * x


class Broadcast(nn.Module):
    def forward(self, x):
        # x (B, 4) is broadcast to (3, B, 4): the batch is no longer dim 0 (a (B, 1) operand
        # broadcast to (B, 4) is an explicit expand since the twelfth session: tests/test_passes.py)
        return (x + torch.zeros(3, 1, 4)).sum(0)


class BatchMix(nn.Module):
    def forward(self, x):
        return x.view(-1).unsqueeze(0)


class TwoInputs(nn.Module):
    def forward(self, x, z):
        return x + z


@pytest.mark.parametrize("model,shape,exc,words", [
    (Product(), (1, 4), errors.UnsupportedOpError, "two perturbed"),
    (Broadcast(), (1, 4), errors.UnsupportedOpError, "broadcast"),
    (TwoInputs(), (1, 4), errors.GraphStructureError, "exactly one tensor input"),
    (nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(-0.5)), (1, 4), errors.UnsupportedOpError, "not monotone"),
    (nn.Sequential(nn.Linear(4, 3)), (1, 5), errors.GraphStructureError, "example input"),
])
def test_unsupported_structures(model, shape, exc, words):
    with pytest.raises(exc) as e:
        bcpc.compile(model, example_input=torch.zeros(shape))
    assert words in str(e.value)


def test_batch_mixing_reshape_is_refused():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x.reshape(1, -1))

    with pytest.raises(errors.UnsupportedOpError, match="mixes samples"):
        bcpc.compile(Mix(), example_input=torch.zeros(1, 4))


@pytest.mark.parametrize("norm", ["l0", 0.5, "banana", float("nan"), True])
def test_unsupported_norm(norm):
    with pytest.raises(errors.ConfigError):
        bcpc.compile(small(), norm, example_input=torch.zeros(1, 4))


def test_unknown_method_and_missing_shape():
    with pytest.raises(errors.ConfigError, match="unknown method"):
        bcpc.compile(small(), example_input=torch.zeros(1, 4), method="crown")
    with pytest.raises(errors.InvalidInputError, match="example_input"):
        bcpc.compile(small())


@pytest.mark.parametrize("domain,words", [
    ((torch.tensor([0.0, -0.5]).view(2, 1, 1), 1.0), "several values"),  # per channel: a raw RuntimeError before
    (((0.0, 0.0), (1.0, 1.0)), "several values"),
    ((0.0, "1"), "a number or None"),
    ((float("nan"), 1.0), "a number or None"),
    ((0.0, 1.0, 2.0), "a pair"),
    (1.0, "a pair"),
    ((1.0, 0.0), "empty"),
])
def test_bad_input_domain(domain, words):
    with pytest.raises(errors.InputDomainError, match=words):
        bcpc.compile(small(), example_input=torch.zeros(1, 4), input_domain=domain)


def test_input_domain_ends_of_other_number_types():
    import numpy as np
    cert = bcpc.compile(small(), example_input=torch.zeros(1, 4), input_domain=[torch.tensor(0.0), np.float32(1)])
    assert cert.input_domain == (0.0, 1.0)
    assert bcpc.compile(small(), example_input=torch.zeros(1, 4), input_domain=(None, 2)).input_domain == (None, 2.0)


@pytest.fixture
def cert():
    return bcpc.compile(small(), example_input=torch.zeros(1, 4), input_domain=(0, 1))


@pytest.mark.parametrize("eps", [-0.1, float("nan"), math.inf, "0.1", None, torch.zeros(5)])
def test_bad_eps(cert, eps):
    with pytest.raises(errors.InvalidEpsilonError):
        cert.certify(torch.rand(2, 4), torch.tensor([0, 1]), eps)


def test_numpy_scalar_eps_is_a_number(cert):
    """eps read from a NumPy array (np.float32, np.float64, np.int64) certifies exactly as the same Python float."""
    import numpy as np
    x, y = torch.rand(3, 4), torch.tensor([0, 1, 2])
    for eps in (np.float32(0.25), np.float64(0.25), np.int64(0)):
        ref = cert.margins(x, y, float(eps))
        assert torch.equal(cert.margins(x, y, eps), ref)
        assert torch.equal(cert.certify(x, y, eps), cert.certify(x, y, float(eps)))
    with pytest.raises(errors.InvalidEpsilonError, match="got bool"):
        cert.certify(x, y, np.bool_(True))


@pytest.mark.parametrize("x,y,words", [
    (torch.full((2, 4), float("nan")), torch.tensor([0, 1]), "NaN"),
    (torch.rand(2, 5), torch.tensor([0, 1]), "shape"),
    (torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]), "floating-point"),
    (torch.rand(0, 4), torch.zeros(0, dtype=torch.long), "empty"),
    (torch.rand(2, 4), torch.tensor([0, 3]), "labels must lie"),
    (torch.rand(2, 4), torch.tensor([0.0, 1.0]), "integer"),
    (torch.rand(2, 4) + 1.5, torch.tensor([0, 1]), "input domain"),
])
def test_bad_inputs(cert, x, y, words):
    with pytest.raises(errors.InvalidInputError, match=words):
        cert.certify(x, y, 0.1)


def test_training_mode_batchnorm_refused_at_certification():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    cert = bcpc.compile(model, example_input=torch.zeros(1, 4))
    model.train()
    with pytest.raises(errors.ModelModeError, match=r"model.eval\(\)"):
        cert.certify(torch.rand(2, 4), torch.tensor([0, 1]), 0.1)
    model.eval()
    assert cert.certify(torch.rand(2, 4), torch.tensor([0, 1]), 0.1).shape == (2,)


def test_model_output_must_be_logits():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(errors.GraphStructureError, match="logits"):
        bcpc.compile(Pair(), example_input=torch.zeros(1, 4))


def test_batchnorm_without_running_statistics_is_refused_at_certification():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    cert = bcpc.compile(model, example_input=torch.zeros(1, 4))
    with pytest.raises(errors.ModelModeError, match="track_running_stats=False"):
        cert.certify(torch.rand(2, 4), torch.tensor([0, 1]), 0.1)


class FunctionalBatchNorm(nn.Module):
    """A new user's false certificate (the batch's statistics through F.batch_norm): sample 0 alone is
    classified 1, in a batch with three darker inputs 0, and the module spelling was refused."""

    def __init__(self, spelling):
        super().__init__()
        self.c, self.bn, self.fc, self.spelling = nn.Conv2d(1, 1, 3, bias=False), nn.BatchNorm2d(1), nn.Linear(16, 2), spelling
        with torch.no_grad():
            self.c.weight.fill_(1 / 9)
            self.fc.weight.zero_()
            self.fc.weight[0].fill_(1 / 16)
            self.fc.bias.copy_(torch.tensor([-0.5, 0.0]))

    def forward(self, x):
        h = self.c(x)
        bn = self.bn
        if self.spelling == "no running statistics":
            h = F.batch_norm(h, None, None, bn.weight, bn.bias, True)
        elif self.spelling == "training=True":
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, True)
        else:  # the flag of the module, read when fx traces: a literal True if traced in training mode
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training)
        return self.fc(torch.relu(h).flatten(1))


@pytest.mark.parametrize("spelling", ["no running statistics", "training=True"])
def test_functional_batch_norm_with_batch_statistics_is_refused_at_certification(spelling):
    torch.manual_seed(0)
    model = FunctionalBatchNorm(spelling).double().eval()
    x = torch.cat([0.8 + 0.1 * torch.rand(1, 1, 6, 6), 0.1 + 0.1 * torch.rand(3, 1, 6, 6)]).double()
    cert = bcpc.compile(model, example_input=x[:1], input_domain=(0, 1))
    assert model(x[:1]).argmax(1).item() == 1 and model(x).argmax(1)[0].item() == 0  # the batch decides
    y = torch.tensor([0, 1, 1, 1])
    for call in (lambda: cert.certify(x, y, 0.05), lambda: cert.margins(x, y, 0.05), lambda: cert.node_bounds(x, 0.05)):
        with pytest.raises(errors.ModelModeError, match=r"batch norm calls 'batch_norm' \(at .*test_errors.py.*F.batch_norm"):
            call()
    cert.loss(x, y, 0.05)  # training with the batch's statistics is what the model does


def test_functional_batch_norm_traced_in_training_mode_is_refused_at_compile():
    """``training=self.training`` is a literal when fx traces: traced in training mode, the graph would
    always use the batch's statistics, and the eval-mode check at compile time sees it."""
    model = FunctionalBatchNorm("self.training").double().train()
    x = torch.cat([0.8 + 0.1 * torch.rand(1, 1, 6, 6), 0.1 + 0.1 * torch.rand(3, 1, 6, 6)]).double()
    with pytest.raises(errors.GraphMismatchError, match="differ from model"):
        bcpc.compile(model, example_input=x, input_domain=(0, 1))


def test_functional_batch_norm_with_running_statistics_certifies():
    model = FunctionalBatchNorm("self.training").double().eval()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    cert = bcpc.compile(model, example_input=x[:1], input_domain=(0, 1))
    assert cert.certify(x, model(x).argmax(1), 0.01).shape == (4,)


def test_training_loss_checks_labels_but_not_values():
    cert = bcpc.compile(small(), example_input=torch.zeros(1, 4), input_domain=(0, 1))
    with pytest.raises(errors.InvalidInputError, match="labels must lie"):
        cert.loss(torch.rand(2, 4), torch.tensor([0, 5]), 0.1)
    assert torch.isnan(cert.loss(torch.full((2, 4), float("nan")), torch.tensor([0, 1]), 0.1))


def test_non_finite_logits_are_named_as_such_not_as_a_bcpc_bug():
    """An overflow (inf) that one computation reaches and the other does not (a float16 cast near
    65504 rounds differently from the float64 copy) is a property of the model at that input."""
    from bcpc import guard

    got = torch.tensor([[1.0, 2.0], [65504.0, 3.0]], dtype=torch.float64)
    want = torch.tensor([[1.0, 2.0], [float("inf"), 3.0]])
    with pytest.raises(errors.GraphMismatchError) as e:
        guard.check(got, want, against="model(x)", dtypes=(torch.float64, torch.float32))
    msg = str(e.value)
    assert "sample 1" in msg and "not finite" in msg and "float16" in msg and "bcpc bug" not in msg
    guard.check(got[:1], want[:1], against="model(x)", dtypes=(torch.float64, torch.float32))  # finite: agrees


class _FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("mean", torch.full((6,), 0.3))
        self.register_buffer("var", torch.full((6,), 2.0))

    def forward(self, x):
        return self.b(torch.relu(F.batch_norm(self.a(x), self.mean, self.var, training=self.training)))


def test_a_model_compiled_in_training_mode_that_reads_self_training_is_told_to_call_eval():
    with pytest.raises(errors.GraphMismatchError) as e:
        bcpc.compile(_FunctionalBN().train(), example_input=torch.rand(4, 4))
    assert "training mode when compiled" in str(e.value) and "model.eval()" in str(e.value)
    bcpc.compile(_FunctionalBN().eval(), example_input=torch.rand(4, 4))  # the fix works


class _NarrowBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        return self.l2(h.narrow(1, 0, h.size(1) // 2))


def test_a_size_read_at_run_time_where_a_rule_needs_a_number_says_so():
    """Refused (folding sizes to numbers was tried and reverted: a size read after an op that moves
    the batch dimension, h.T.shape[1], looks batch free and is not; a review got false certificates),
    but the message names the computed argument and says to write the number (it was a raw
    "int() argument must be ... not 'Node'")."""
    with pytest.raises(errors.UnsupportedOpError, match=r"'floordiv' are computed when forward runs.*write the number"):
        bcpc.compile(_NarrowBySize().eval(), example_input=torch.rand(1, 4))

"""Bad input gets a specific error that says what is wrong and what to do."""
import math

import pytest
import torch
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


class Product(nn.Module):
    def forward(self, x):
        return x * x


class Broadcast(nn.Module):
    def forward(self, x):
        return x + torch.zeros(1, 4)  # x is (B, 1): every coordinate is copied 4 times


class BatchMix(nn.Module):
    def forward(self, x):
        return x.view(-1).unsqueeze(0)


class TwoInputs(nn.Module):
    def forward(self, x, z):
        return x + z


@pytest.mark.parametrize("model,shape,exc,words", [
    (Product(), (1, 4), errors.UnsupportedOpError, "two perturbed"),
    (Broadcast(), (1, 1), errors.UnsupportedOpError, "broadcast"),
    (TwoInputs(), (1, 4), errors.GraphStructureError, "exactly one tensor input"),
    (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), nn.Flatten()), (1, 1, 4, 4),
     errors.UnsupportedOpError, "padding_mode='reflect'"),
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


@pytest.fixture
def cert():
    return bcpc.compile(small(), example_input=torch.zeros(1, 4), input_domain=(0, 1))


@pytest.mark.parametrize("eps", [-0.1, float("nan"), math.inf, "0.1", None, torch.zeros(5)])
def test_bad_eps(cert, eps):
    with pytest.raises(errors.InvalidEpsilonError):
        cert.certify(torch.rand(2, 4), torch.tensor([0, 1]), eps)


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


def test_training_loss_checks_labels_but_not_values():
    cert = bcpc.compile(small(), example_input=torch.zeros(1, 4), input_domain=(0, 1))
    with pytest.raises(errors.InvalidInputError, match="labels must lie"):
        cert.loss(torch.rand(2, 4), torch.tensor([0, 5]), 0.1)
    assert torch.isnan(cert.loss(torch.full((2, 4), float("nan")), torch.tensor([0, 1]), 0.1))

"""The differential fuzzer: random models in user spellings (tests/user_models.py), compiled.

For each model, ``bcpc.compile`` either raises a ``bcpc.errors`` exception, or

(a) the certification graph's clean logits equal ``model(x)`` (checked here with the runtime guard
    switched off, so the compiler itself is tested, not the guard), and
(b) sampled and PGD-attacked points, in float64, stay inside every node's box and ball and above
    the certified margins;

and both hold again after the weights are edited behind bcpc's back (``.data``, ``copy_``,
``load_state_dict``, an optimizer step). Each of the five false-certificate findings of the
soundness issue fails this test on the code before the fix (docs/soundness.md).

``BCPC_FUZZ_STATS=<file>`` makes the test write its counts (generated, compiled, refused by
error type, attacked, violations) to that JSON file; ``benchmarks/fuzz.py`` uses it.
"""
import collections
import copy
import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import bcpc
from bcpc.errors import BcpcError
from bcpc.testing import check_soundness, pgd_margin, sample_perturbations
from tests.user_models import WEIGHT_EDITS, edit_weights, user_models

STATS = collections.Counter()
EPS = 0.3


def _write_stats():
    path = os.environ.get("BCPC_FUZZ_STATS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(STATS), f, indent=1, sort_keys=True)


def _attack(model, cert, x, y, gen):
    try:
        return pgd_margin(model, x, y, EPS, 2.0, steps=20, restarts=1, generator=gen)
    except RuntimeError:
        # an in-place op of the user's model breaks autograd (relu_ then mul_ on its output): take
        # gradients from the compiled clean graph instead; the points are checked on the model
        functional = copy.deepcopy(cert.canonical).eval()
        return pgd_margin(functional, x, y, EPS, 2.0, steps=20, restarts=1, generator=gen)


def _check(model, cert, x, gen):
    cert.guard = False  # test the compiler, not the guard
    with torch.no_grad():
        want = model(x)
    got = cert(x, 0.0).logits
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (
        f"compiled clean logits differ from model(x) by {float((got - want).abs().max()):.3g}")
    y = want.argmax(1)
    pts = sample_perturbations(x, EPS, 2.0, n=24, generator=gen)
    pts = torch.cat([pts, _attack(model, cert, x, y, gen)[None]])
    check_soundness(cert, model, x, y, EPS, pts)
    cert.guard = True
    cert.certify(x, y, EPS)  # the guard agrees: no GraphMismatchError on a correct compile
    STATS["attacked"] += 1


# 100 models in make test; the thorough profile's 400; BCPC_FUZZ_EXAMPLES overrides both
_EXAMPLES = 400 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 100


@settings(max_examples=int(os.environ.get("BCPC_FUZZ_EXAMPLES", _EXAMPLES)))
@given(arch=user_models(), edit=st.sampled_from(WEIGHT_EDITS), seed=st.integers(0, 1000))
def test_user_code_compiles_correctly_or_is_refused(arch, edit, seed):
    model, d = arch
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, d, generator=gen, dtype=torch.float64)
    STATS["generated"] += 1
    try:
        cert = bcpc.compile(model, "l2", example_input=x)
    except BcpcError as exc:
        STATS["refused"] += 1
        STATS[f"refused: {type(exc).__name__}"] += 1
        _write_stats()
        return
    STATS["compiled"] += 1
    try:
        _check(model, cert, x, gen)
        edit_weights(model, edit, gen)
        model.eval()
        _check(model, cert, x, gen)
    except AssertionError:
        STATS["violations"] += 1
        _write_stats()
        raise
    _write_stats()


FINDINGS = {
    # 1. a tuple-returning op (MaxMin by chunk) inside a skip connection
    "tuple": [("skip", "h = h + f(maxmin(h))")],
    # 2. in-place ops whose result is not reassigned
    "inplace": [("activation", "h.relu_() unassigned"), ("scale", "h.mul_(3) unassigned"),
                ("activation", "torch.relu_(h) unassigned"), ("scale", "h.add_(1) unassigned")],
    # 4. softplus with a finite threshold (not monotone)
    "softplus": [("linear", "Linear"), ("activation", "nn.Softplus(threshold=1)"), ("linear", "Linear")],
    # 5. a comparison mask
    "mask": [("skip", "h = h + f(h)"), ("mask", "h * (h > 0).float()")],
}


@pytest.mark.parametrize("finding", sorted(FINDINGS))
def test_findings_of_the_soundness_issue(finding):
    """The findings as fixed programs: each compiles correctly (a, b) or is refused (the mask only:
    MaxMin by chunk is a GroupSort since the ops issue)."""
    from tests.user_models import Program

    gen = torch.Generator().manual_seed(1)
    model = Program(4, 8, 3, FINDINGS[finding], seed=3).double().eval()
    with torch.no_grad():  # spread the activations over the softplus switch point and the ReLU kinks
        model.inp.weight.mul_(4)
    x = torch.rand(8, 4, generator=gen, dtype=torch.float64)
    try:
        cert = bcpc.compile(model, "l2", example_input=x)
    except BcpcError:
        assert finding == "mask", f"{finding}: refused, but it is supported"
        return
    _check(model, cert, x, gen)


def test_data_edit_rebuilds_the_certificate():
    """3. weights edited through .data (no version bump): the certificate follows the new weights."""
    from tests.user_models import Program

    gen = torch.Generator().manual_seed(0)
    model = Program(4, 6, 3, [("activation", "nn.ReLU")], seed=0).double().eval()
    x = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    cert = bcpc.compile(model, "l2", example_input=x)
    before = cert.margins(x, model(x).argmax(1), EPS)
    (_, lip_upper_before), = [(r["node"], r["upper"]) for r in cert.lipschitz_table() if r["node"] == "out"]
    for p in model.parameters():
        p.data.mul_(2.5)
    y = model(x).argmax(1)
    after = cert.margins(x, y, EPS)
    assert not torch.allclose(before, after)
    (lip_upper_after,) = [r["upper"] for r in cert.lipschitz_table() if r["node"] == "out"]
    assert lip_upper_after == pytest.approx(2.5 * lip_upper_before, rel=1e-6)
    _check(model, cert, x, gen)


class _Gated(torch.nn.Module):
    """A branch that is exactly zero at the clean inputs, scaled by a Python attribute: changing the
    attribute after compile leaves model(x) unchanged but not the function around x."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.c = torch.nn.Linear(8, 12), torch.nn.Linear(12, 3)
        self.g, self.g2 = torch.nn.Linear(8, 1), torch.nn.Linear(1, 3, bias=False)
        self.k = 1.0
        with torch.no_grad():
            self.g.weight.fill_(1.0)
            self.g.bias.fill_(-6.0)
            self.g2.weight[:, 0] = torch.tensor([1.0, -1.0, 0.0])
            self.c.bias[2] = 5.0

    def forward(self, x):
        return self.c(torch.relu(self.a(x))) + self.k * self.g2(torch.relu(self.g(x)))


@pytest.mark.parametrize("change", ["attribute", "submodule"])
def test_a_change_invisible_in_the_clean_logits_is_still_caught(change):
    """Found by a new-user attack: the runtime guard compares clean logits only, so the compiled
    structure and attributes are checked too."""
    from bcpc.errors import GraphMismatchError

    model = _Gated().double().eval()
    x = torch.rand(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.2 + 0.6
    cert = bcpc.compile(model, "l2", example_input=x[:1])
    y = model(x).argmax(1)
    cert.certify(x, y, 0.3)
    if change == "attribute":
        model.k = 1000.0
    else:
        model.g2 = torch.nn.Linear(1, 3, bias=False).double()
    with pytest.raises(GraphMismatchError, match="changed after bcpc.compile"):
        cert.certify(x, y, 0.3)

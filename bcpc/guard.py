"""The compiled clean function must be the user's ``model(x)``, checked.

Two checks, both raising :class:`~bcpc.errors.GraphMismatchError` (never a certificate):

* **at compile time** (:func:`verify_compiled`): the canonical graph and a copy of the user's
  model, both in eval mode, on the example input and on a random input, must agree. This catches a
  trace that is not the model (Python side effects: a counter, a value cached on the module at
  the first call) before anyone trains on it.
* **at run time** (``CertifiedModule``, before returning any sound result): the clean logits of
  the certification graph against the live ``model(x)`` in the model's own dtype (this also
  catches a Python attribute or submodule changed after compilation); with ``cert.guard =
  "strict"`` also against the float64 copy of the model the graph was built from, at float64
  tolerance.

Tolerances are relative to the largest logit of each sample: ``atol + rtol * max_j |z_j|``.
float64 against float64 differs only by the order of operations (~1e-15 relative); float32
against float64 by float32 rounding accumulated over the layers (measured: at most 5.5e-7 of the
largest logit on 500 MNIST test images with the shipped 4C3F; docs/soundness.md).
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

from bcpc.errors import GraphMismatchError, UnsupportedOpError
from bcpc.state import changes, copy_module, names_read, structure, user_functions

#: ``dtype -> (atol, rtol)`` of the comparison, by the less precise of the two dtypes.
TOLERANCE = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 2e-2),
             torch.bfloat16: (1e-2, 5e-2)}


def tolerance(*dtypes) -> tuple:
    """``(atol, rtol)`` for comparing values computed in ``dtypes`` (the loosest applies)."""
    tols = [TOLERANCE.get(d, TOLERANCE[torch.float16]) for d in dtypes]
    return max(t[0] for t in tols), max(t[1] for t in tols)


def excess(got: Tensor, want: Tensor, atol: float, rtol: float) -> Tensor:
    """(B,) how far each sample's worst logit difference exceeds its tolerance (> 0: mismatch)."""
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    diff = (got - want).abs().flatten(1).amax(1)
    scale = want.abs().flatten(1).amax(1)
    bad = ~torch.isfinite(got).flatten(1).all(1) | ~torch.isfinite(want).flatten(1).all(1)
    out = diff - (atol + rtol * scale)
    return torch.where(bad & ~(got == want).flatten(1).all(1), torch.full_like(out, float("inf")), out)


_RUNTIME_CAUSES = ("Causes: the model changed after bcpc.compile (compile again); a forward that torch.fx cannot see "
                   "(Python side effects: a counter or a value cached on the module by forward); or a "
                   "bcpc bug (please report it with the model).")
COMPILE_CAUSES = ("Causes: a forward that torch.fx cannot see (Python side effects such as a call counter or a "
                  "value cached on the module by forward, which fx records once as a constant); or a bcpc bug (please "
                  "report it with the model).")


def check(got: Tensor, want: Tensor, *, against: str, dtypes: tuple, causes: str = _RUNTIME_CAUSES) -> None:
    """Raise GraphMismatchError if ``got`` (compiled logits) and ``want`` (the model's) disagree."""
    if tuple(got.shape) != tuple(want.shape):
        raise GraphMismatchError(
            f"the compiled graph does not compute this model: it returns logits of shape {tuple(got.shape)}, "
            f"{against} returns {tuple(want.shape)}. No certificate is given.")
    atol, rtol = tolerance(*dtypes)
    ex = excess(got, want, atol, rtol)
    if bool((ex > 0).any()):
        i = int(ex.argmax())
        d = float((got[i].double() - want[i].double()).abs().max())
        if not (bool(torch.isfinite(got[i]).all()) and bool(torch.isfinite(want[i]).all())):
            raise GraphMismatchError(
                f"on sample {i} of the batch the clean logits are not finite: {got[i].tolist()} from the compiled "
                f"graph against {want[i].tolist()} from {against}. An overflow or a division by zero in the "
                "model (a float16 cast of a value above 65504, say) gives inf or NaN, which one of the two "
                "computations reached and the other did not, or both in different places. No certificate is "
                "given for such an input; keep the model's values finite (cast to float16 only where they are "
                "small, or not at all).")
        raise GraphMismatchError(
            f"the compiled graph does not compute this model: on sample {i} of the batch its clean logits differ "
            f"from {against} by {d:.3g} (tolerance {atol:g} + {rtol:g} * max|logit|). No certificate is given. "
            + causes)


def _probe_inputs(example_input: Tensor, input_domain) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    x0 = example_input[:1]
    lo, hi = input_domain
    shape = (2,) + tuple(x0.shape[1:])
    if lo is not None and hi is not None:
        r = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
    else:
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        if lo is not None:
            r = r.abs() + lo
        elif hi is not None:
            r = hi - r.abs()
    return torch.cat([x0.detach().to(torch.float64), r.to(x0.device)])


def _autocast_users(model: nn.Module) -> list:
    """``Class.method`` of the user's code in ``model`` that names autocast (``torch.autocast``,
    ``torch.cuda.amp.autocast``, ...)."""
    return [f"{owner}.{attr}" for _, m in model.named_modules() for owner, attr, fn in user_functions(m)
            if any("autocast" in n for n in names_read(fn, helpers=True))]


def verify_compiled(canonical: torch.fx.GraphModule, model: nn.Module, example_input: Tensor, input_domain,
                    cached_attributes: frozenset = frozenset()) -> None:
    """Compile-time check: the canonical graph computes ``model`` (both copied, in eval mode), and
    a call of the model leaves its Python state as it was (``cached_attributes``, activations
    forward keeps on a module, aside)."""
    dtype = next((p.dtype for p in model.parameters()), example_input.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    x = _probe_inputs(example_input, input_domain).to(dtype)
    ref_model = copy_module(model).eval()
    graph = copy_module(canonical).eval()
    state = structure(ref_model, skip=cached_attributes)
    with torch.no_grad():
        want = ref_model(x)
        got = graph(x)
        again = ref_model(x)  # the same input again: the output must not depend on the call before
    moved = changes(state, structure(ref_model, skip=cached_attributes))
    if not isinstance(want, Tensor):
        return  # the analysis has already refused a model that does not return one logits tensor
    causes = COMPILE_CAUSES
    if any(m.training for m in model.modules()):
        causes = ("The model was in training mode when compiled, and torch.fx records a Python value such as "
                  "self.training as it is at trace time: F.batch_norm(..., training=self.training) or "
                  "F.dropout(..., training=self.training) were traced in training mode. Call model.eval() before "
                  "bcpc.compile. Other " + COMPILE_CAUSES[0].lower() + COMPILE_CAUSES[1:])
    autocast = _autocast_users(model)
    if autocast:
        causes = (f"{autocast[0]} runs part of forward under torch.autocast, which torch.fx does not record: the "
                  "graph computes that part in the model's own dtype where the model computes it in the autocast "
                  "dtype, so the two differ by that dtype's rounding. Take autocast out of forward (wrap the training "
                  "step in it instead, where it is a speed setting): the model then computes in its own dtype, "
                  "and that is what bcpc certifies. Other "
                  + causes[0].lower() + causes[1:])
    check(got, want, against="model(x) (checked at compile time, in eval mode)", dtypes=(dtype,), causes=causes)
    if isinstance(again, Tensor) and not torch.allclose(again, want, rtol=0.0, atol=0.0, equal_nan=True):
        raise UnsupportedOpError(
            "the model's output for the same input changes from one call to the next: forward reads state that "
            "the call before left on the model (an activation kept on a module and read back, a running value) "
            "or draws random numbers. A certificate for one call would say nothing of the next; keep forward a "
            "function of its input and the weights.")
    if moved is not None:
        raise UnsupportedOpError(
            f"a call of the model changes its own state: {moved} (a counter, or a value forward keeps for the next "
            "call). bcpc checks before every sound result that the model is as it was compiled, so every "
            "certificate after the first would be refused. Keep such state out of forward (count calls outside "
            "the model).")

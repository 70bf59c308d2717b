"""The certifying module returned by :func:`bcpc.compile`.

It wraps the emitted propagation GraphModule (``self.propagation``; its ``.code`` is printed by
``cert.code``) and shares every parameter with the user's model, so ``cert.loss(...).backward()``
trains the model.

Two kinds of call:

* **training** (``loss``, and ``margins``/``worst_logits`` with ``sound=False``): runs in the
  model's own dtype with power-iteration *estimates* of the layer Lipschitz constants (the
  Lipschitz cache). Fast and differentiable, not a guarantee.
* **certification** (``certify``, ``certified_radius``, and ``margins``/``worst_logits``/
  ``node_bounds`` with the default ``sound=True``): runs on a float64 twin of the model (rebuilt
  when the value of any parameter or buffer changes, however it was changed: the twin keeps an
  exact copy of the values it was built from, bcpc.state) with guaranteed Lipschitz upper bounds,
  and ``certify`` only accepts a margin above a safety threshold (:data:`CERTIFY_RTOL`,
  :data:`CERTIFY_ATOL`). Before any sound result is returned, the runtime guard (bcpc.guard)
  checks the twin's clean logits against the user's own model on the same inputs.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from bcpc import guard, losses, ops, rounding
from bcpc import margins as margins_mod
from bcpc.meta import where
from bcpc.state import (Snapshot, changes, copy_in_dtype, library_changes, library_snapshot, names_read,
                        structure, user_functions)
from bcpc.errors import (ConfigError, GraphMismatchError, InputDomainError, InvalidEpsilonError, InvalidInputError,
                         ModelModeError, NonFiniteBoundError)

#: A certified margin must exceed ``CERTIFY_ATOL + CERTIFY_RTOL * max|logit|`` (float64 run).
#: Rounding in a float64 forward pass is many orders of magnitude below this; a certificate that
#: would depend on the last digits is refused instead. Sound runs are float64 only
#: (:func:`sound_dtype`); :data:`CERTIFY_RTOL_FLOAT32` is what :meth:`CertifiedModule.threshold`
#: applies to the margins of another dtype (the training path's, which certify nothing).
CERTIFY_RTOL = 1e-7
CERTIFY_RTOL_FLOAT32 = 1e-4
CERTIFY_ATOL = 1e-9


class CertifiedOutput(NamedTuple):
    logits: Tensor  # (B, C) clean logits
    margins: Tensor  # (B, C) lower bounds on z_ref - z_j over the perturbation set; +inf at j == ref
    labels: Tensor  # (B,) the reference class: the given label, or the prediction
    sound: bool  # True: guaranteed Lipschitz bounds, float64


class _Recorder(fx.Interpreter):
    """Runs the emitted graph and keeps the values of the named nodes."""

    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.values = set(names), {}

    def call_function(self, target, args, kwargs):
        # a Bound the propagation leaves without its box (a convolution folded into its
        # BatchNorm) is recorded whole: its box computed as it would be without the fold
        return super().call_function(getattr(target, "bcpc_full", target), args, kwargs)

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


_UNKNOWN = object()  # a batch-norm argument computed in the graph, not read from the model or written as a literal

#: Modules whose output depends on ``.training``: certifying them in training mode is refused.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)


def _forward_reads_training(m: nn.Module) -> bool:
    """A module of the user's whose forward (a method its class defines, or a function kept on it)
    names ``training`` (``if self.training:``); torch's own modules are covered by the
    mode-dependent list above."""
    if type(m).__module__.startswith(("torch.", "bcpc.")):
        return False
    return any("training" in names_read(fn) for _, _, fn in user_functions(m))


class CertifiedModule(nn.Module):
    """Logits and certified margin lower bounds in one forward pass. Built by :func:`bcpc.compile`.

    Shares every parameter with the user's ``model`` (``cert.model``): training through
    :meth:`loss` trains it, and any change of its weights is seen by the next sound call.

    Example::

        cert = bcpc.compile(model, norm="l2", example_input=x[:1], input_domain=(0.0, 1.0))
        ok = cert.certify(x, y, eps=1.58)          # (B,) bool, sound
        loss = cert.loss(x, y, eps=1.58, lam=1.0)  # certified training loss
    """

    def __init__(self, lowered, *, model: nn.Module, norm: float, method: str, input_domain,
                 input_shape: tuple, num_classes: int, analysis, canonical: fx.GraphModule,
                 backend: Optional[str] = None, cached_attributes: frozenset = frozenset()):
        super().__init__()
        self.propagation = lowered.graph_module
        self.norm, self.method = norm, method
        self.input_domain = input_domain
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.canonical = canonical  # the canonicalized user graph (for inspect); not a submodule
        self._lowered = lowered
        self._analysis = analysis
        self._twin = None
        self._twin_key = None
        self._twin_state = None  # bcpc.state.Snapshot of the user's parameters the twin was built from
        #: the model's module tree and Python attributes at compile time: fx bakes attributes into
        #: the graph, so a later change makes the graph another function (checked before sound results)
        #: (activations forward keeps on a module, self.cache = out, are outputs and change every call)
        self._cached_attributes = frozenset(cached_attributes)
        self._structure = structure(model, skip=self._cached_attributes)
        self._library = library_snapshot(model)
        #: the runtime guard: compare the certification graph's clean logits with the user's model
        #: before returning any sound result (on by default; see bcpc.guard and docs/soundness.md)
        self.guard = True
        #: what a sound result covers: False (default) the model's function computed in float64, as
        #: every published certificate does; True also the float32 model's own rounding, bounded in
        #: the worst case over every summation order (bcpc.rounding; docs/soundness.md gives its cost)
        self.model_rounding = False
        self._guard_done = False  # set while certified_radius re-certifies inputs it has checked
        self.backend = backend
        self._compiled = None  # torch.compile(self.propagation), built on the first training call

    # The canonical graph shares the user's parameters; keep it out of the module tree.
    def __setattr__(self, name, value):
        if name == "canonical":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def model(self) -> nn.Module:
        return self.propagation.model

    @property
    def rules(self) -> dict:
        """User graph node name -> the rule that bounds it (``"input"`` for the input)."""
        return dict(self._lowered.rules)

    @property
    def lipschitz_modules(self) -> dict:
        """Node name -> ``(LipschitzConstant module, weight's name in the model or None)``."""
        return {origin: (self.propagation.lip.get_submodule(lip), weight)
                for origin, (lip, weight) in self._lowered.lipschitz.items()}

    @property
    def analysis(self):
        """The structure analysis: ``output`` node, ``last_affine`` node (or None), residual merges."""
        return self._analysis

    @property
    def code(self) -> str:
        """Python source of the emitted propagation module."""
        return self.propagation.code

    # --- input checks ---------------------------------------------------------------------

    def _check(self, x: Tensor, y: Optional[Tensor] = None, values: bool = True) -> None:
        """Validate inputs. Shapes, dtypes and devices always; with ``values`` also NaN/Inf, the input
        domain and the label range, in one device synchronisation. The training path (``loss``)
        checks only the label range among the values (NaN in x shows up as a NaN loss there)."""
        if not isinstance(x, Tensor):
            raise InvalidInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise InvalidInputError(f"x must be a floating-point tensor, got dtype {x.dtype}; convert with x.float()")
        if tuple(x.shape[1:]) != self.input_shape:
            raise InvalidInputError(
                f"x has shape {tuple(x.shape)}; the model was compiled for inputs of shape (batch, "
                f"{', '.join(map(str, self.input_shape))})")
        p = next(self.model.parameters(), None)
        if p is not None and x.device != p.device:
            raise InvalidInputError(f"x is on device {x.device} but the model is on {p.device}; move one of them "
                                    f"(e.g. x.to('{p.device}'))")
        if x.shape[0] == 0:
            raise InvalidInputError("the batch is empty (x.shape[0] == 0)")
        if y is not None:
            if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise InvalidInputError("y must be an integer tensor of class indices (torch.long)")
            if y.shape != (x.shape[0],):
                raise InvalidInputError(f"y has shape {tuple(y.shape)}; expected ({x.shape[0]},), one label per input")
        if not values:
            # labels out of range would fail deep inside an indexing kernel: check them anyway. On an
            # accelerator with a device-side assertion, so the training step never waits on the device.
            if y is not None and (y.device.type != "cpu" or torch.compiler.is_compiling()):
                torch._assert_async(((y >= 0) & (y < self.num_classes)).all(),
                                    f"labels must lie in [0, {self.num_classes})")
                return
            if y is not None and bool(((y < 0) | (y >= self.num_classes)).any()):
                raise InvalidInputError(f"labels must lie in [0, {self.num_classes}); got min {int(y.min())}, "
                                        f"max {int(y.max())}")
            return
        lo, hi = self.input_domain
        flags = [~torch.isfinite(x).all(),
                 (x < lo).any() if lo is not None else torch.zeros((), dtype=torch.bool, device=x.device),
                 (x > hi).any() if hi is not None else torch.zeros((), dtype=torch.bool, device=x.device)]
        if y is not None:
            flags.append(((y < 0) | (y >= self.num_classes)).any())
        nonfinite, below, above, *bad_label = torch.stack(flags).tolist()  # the one synchronisation
        if nonfinite:
            raise InvalidInputError("x contains NaN or Inf values")
        if below or above:
            raise InputDomainError(
                f"x has values outside the declared input domain [{lo}, {hi}] (min {x.min().item():.4g}, "
                f"max {x.max().item():.4g}); fix the preprocessing or compile with a domain that contains the data")
        if bad_label and bad_label[0]:
            raise InvalidInputError(f"labels must lie in [0, {self.num_classes}); got min {int(y.min())}, "
                                    f"max {int(y.max())}")

    @staticmethod
    def _check_eps(eps, batch: int):
        """``eps`` checked, and returned as a Python float when it is a number (a NumPy scalar included)."""
        if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (numbers.Real, Tensor)):
            raise InvalidEpsilonError(f"eps must be a number or a tensor, got {type(eps).__name__}")
        if not isinstance(eps, Tensor):  # a number: checked without a tensor (no device work, traceable)
            eps = float(eps)
            if not math.isfinite(eps):
                raise InvalidEpsilonError(f"eps must be finite, got {eps}")
            if eps < 0:
                raise InvalidEpsilonError(f"eps must be >= 0, got {eps}")
            return eps
        t = eps
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
            raise InvalidEpsilonError(f"eps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if torch.compiler.is_compiling():  # no host synchronisation inside a compiled graph
            torch._assert_async((torch.isfinite(t) & (t >= 0)).all(), "eps must be finite and >= 0")
            return eps
        if not bool(torch.isfinite(t).all()):
            raise InvalidEpsilonError(f"eps must be finite, got {eps}")
        if bool((t < 0).any()):
            raise InvalidEpsilonError(f"eps must be >= 0, got {eps}")
        return eps

    def _rounding_unit(self, x_user: Tensor) -> float:
        """The unit roundoff of the live model's own arithmetic, which a sound run adds to every
        Bound with ``model_rounding`` (bcpc.rounding): 2^-24 for a float32 model, 0 for a float64
        one, and 0 without ``model_rounding``."""
        if not self.model_rounding:
            return 0.0
        dtype = gm_dtype(self.propagation, x_user.dtype)
        if dtype == torch.float32:
            reduced = rounding.reduced_precision(x_user.device.type)
            if reduced:
                raise ConfigError(
                    f"model_rounding bounds float32 arithmetic, but torch is set to compute float32 {reduced}, "
                    "whose rounding is thousands of times float32's (a review certified inputs that the model then "
                    "misclassified under set_float32_matmul_precision('medium')). Set torch's float32 precision to "
                    "IEEE for the certification and the deployment (torch.set_float32_matmul_precision('highest'); "
                    "on CUDA also torch.backends.cudnn.conv.fp32_precision = 'ieee' and "
                    "torch.backends.cuda.matmul.fp32_precision = 'ieee'; on CPU ONEDNN_DEFAULT_FPMATH_MODE unset or "
                    "STRICT in the environment of the process, and torch.set_flush_denormal(False)), or certify "
                    "without model_rounding.")
            if self._lowered.weight_rounding:
                raise ConfigError(
                    "model_rounding bounds the rounding of the float32 model's operations on the input, but the model "
                    "also computes values in forward without the input (from its weights alone, or from tensors it "
                    "makes there), which the float64 certification copy computes in float64 and whose float32 "
                    "rounding is not bounded: "
                    + self._lowered.weight_rounding[0]
                    + (f" (and {len(self._lowered.weight_rounding) - 1} more)" if len(self._lowered.weight_rounding) > 1 else "")
                    + ". Compute such weights once, outside forward (assign them to a plain layer's parameter, or "
                    "torch.nn.utils.parametrize.remove_parametrizations), or certify without model_rounding (the "
                    "certificate is then for the model's function computed in float64).")
        return rounding.unit(dtype)

    def _check_model_dtype(self, x: Tensor) -> None:
        """Refuse to certify a model that computes in float16 or bfloat16: the certificate is computed
        for the model's function in float64 with a threshold for float32-sized rounding of the
        logits, and such a model rounds every hidden value by up to 2^-11 (float16) or 2^-8
        (bfloat16) relative. A new-user review certified inputs the float16 and bfloat16 models
        misclassify inside the ball (a random 2-4-2 MLP at its certified radius)."""
        narrow = {t.dtype for t in list(self.model.parameters()) + list(self.model.buffers())
                  if t.dtype in _NARROW_FLOATS}
        owned = [t for t in list(self.model.parameters()) + list(self.model.buffers()) if t.is_floating_point()]
        if not owned and x.dtype in _NARROW_FLOATS:  # no tensors of its own: it computes in x's dtype
            narrow.add(x.dtype)
        if narrow:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in narrow))
            raise ModelModeError(
                f"the model computes in {names}: bcpc certifies the model's function as computed in float64 (and "
                "accepts float32 models, whose own rounding of about 1e-7 relative to the hidden values is a known "
                f"limit, docs/soundness.md), but {names} rounds every hidden value by up to {_unit_text(narrow)} relative, which no "
                "certificate here bounds: inputs certified this way were misclassified by the model itself inside "
                "the ball. Certify and deploy the model in float32 or float64 (model.float() or model.double(); "
                "for mixed-precision training keep the weights in float32 and autocast only the training step).")

    def _check_eval_mode(self) -> None:
        training = [f"{name or type(self.model).__name__} ({type(m).__name__})"
                    for name, m in self.model.named_modules()
                    if isinstance(m, _MODE_DEPENDENT) and not isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and m.training]
        if training:
            raise ModelModeError(
                f"modules {training} are in training mode: they compute another (random) function than in eval "
                "mode, and the certificate is for eval mode. Call model.eval() (or cert.eval()) before certifying.")
        reads = [f"{name or type(self.model).__name__} ({type(m).__name__})" for name, m in self.model.named_modules()
                 if m.training and _forward_reads_training(m)]
        if reads:
            raise ModelModeError(
                f"modules {reads} are in training mode and their forward reads self.training: the graph was traced "
                "in eval mode, so in training mode the model may compute another function (a branch the trace did "
                "not take) wherever the inputs of the ball reach it. Call model.eval() (or cert.eval()) before "
                "certifying.")
        bad = [name for name, m in self.model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        batch_stats = [name for name, m in self.model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
        if batch_stats:
            raise ModelModeError(
                f"BatchNorm layers {batch_stats} have track_running_stats=False: they always normalise with the "
                "statistics of the batch, so no certificate holds for a single input. Use running statistics.")
        if bad:
            raise ModelModeError(
                f"BatchNorm layers {bad} are in training mode: their output depends on the batch, so a "
                "certificate computed now would not hold for single inputs. Call model.eval() (or cert.eval()) "
                "before certifying.")
        batch_norms = self._batch_statistics_calls()
        if batch_norms:
            raise ModelModeError(
                f"batch norm calls {', '.join(batch_norms)} normalise with the statistics of the batch (training=True, or no "
                "running statistics): their output for one input depends on the rest of the batch, so no certificate "
                "holds for single inputs. Pass the running statistics and training=False (e.g. "
                "F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=self.training)) "
                "and certify in eval mode.")

    def _batch_statistics_calls(self) -> list:
        """The batch-norm calls of the compiled graph that use the batch's own statistics with the
        model as it is now: ``training`` (a literal, or the live flag of a module) true, or no
        running mean. Covers the functional spellings, whose flag is a literal fixed at tracing."""
        def live(arg):
            if isinstance(arg, fx.Node):
                if arg.op != "get_attr":
                    return _UNKNOWN
                value = self.model
                for part in arg.target.split("."):
                    value = getattr(value, part)
                return value
            return arg

        found = []
        for node in self.canonical.graph.nodes:
            if node.op == "call_function" and node.target is ops.batch_norm:
                mean, training = live(node.args[3]), live(node.args[6])
                if mean is None or training is _UNKNOWN or bool(training):
                    found.append(f"'{node.name}' (at {where(node)})")
        return found

    def _check_unchanged(self) -> None:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        modes = [type(m).__qualname__ for m in _get_current_function_mode_stack() + _get_current_dispatch_mode_stack()]
        if modes:
            raise GraphMismatchError(
                f"a torch function or dispatch mode is active ({', '.join(modes)}): it can change what every torch op "
                "computes, in the model and in bcpc's own bound computation alike, and a new-user review got a false "
                "certificate from one. Certify outside the `with` block that enters it.")
        what = library_changes(self._library) or changes(self._structure, structure(self.model,
                                                                                  skip=self._cached_attributes))
        if what is not None:
            raise GraphMismatchError(
                f"the model changed after bcpc.compile: {what}. The compiled graph was traced from the model as it "
                "was (torch.fx records Python attributes and submodules as they are at compile time), so it no longer "
                "computes this model and no certificate is given. Compile again after changing the model.")

    # --- running --------------------------------------------------------------------------

    def _sound_graph(self, dtype: torch.dtype) -> fx.GraphModule:
        """A copy of the propagation module in ``dtype`` (float64 by default), cached for the exact
        values of the parameters and buffers it was copied from (bcpc.state)."""
        if (self._twin is None or self._twin_key != dtype
                or not self._twin_state.matches_module(self.propagation)):
            object.__setattr__(self, "_twin", None)  # free the old twin before copying
            state = Snapshot.of_module(self.propagation)
            twin = copy_in_dtype(self.propagation, dtype)
            twin.eval()
            object.__setattr__(self, "_twin", twin)
            object.__setattr__(self, "_twin_state", state)
            self._twin_key = dtype
        return self._twin

    def _guard(self, gm: fx.GraphModule, x: Tensor, x_user: Tensor, logits: Tensor) -> None:
        """Runtime guard: the sound graph's clean logits are the user's model's (bcpc.guard).

        ``guard=True`` (default): against the live ``model(x)`` in the model's own dtype (tolerance
        of that dtype); ``"strict"``: also against the float64 copy of the model the certification
        graph was built from, at float64 tolerance; ``False``: off."""
        if not self.guard or self._guard_done:
            return
        with torch.no_grad():
            # a copy: a model that writes into its input (h = x.view(...); h += 1) must not change the user's x
            live = self.model(x_user.to(gm_dtype(self.propagation, x_user.dtype), copy=True))
            guard.check(logits, live, against=f"model(x) (the live model, {live.dtype})",
                        dtypes=(logits.dtype, live.dtype))
            if self.guard == "strict":
                narrowing = [n for n in self.canonical.graph.nodes if n.op == "call_function" and n.target is ops.cast
                             and isinstance(n.args[1], torch.dtype) and n.args[1].is_floating_point
                             and ops.less_precise(n.args[1], x.dtype)]
                if narrowing:
                    n = narrowing[0]
                    raise ConfigError(
                        f"guard='strict' compares against the model's own forward in {x.dtype}, and this model rounds "
                        f"to {str(n.args[1]).replace('torch.', '')} inside (node '{n.name}' at {where(n)}), which its "
                        f"{x.dtype} copy would not. Use the default guard=True, which checks against the live model "
                        "in its own dtype.")
                try:
                    own = gm.model(x)
                except RuntimeError as exc:
                    raise ConfigError(
                        f"guard='strict' runs the model's own forward in {x.dtype}, which this model cannot do "
                        f"({type(exc).__name__}: {exc}): its forward casts to another dtype (x.float(), say). "
                        "Use the default guard=True, which checks against the live model in its own dtype.") from exc
                guard.check(logits, own, against=f"the model's own forward in {x.dtype} (its certified copy)",
                            dtypes=(logits.dtype,))

    def _prepare(self, x, eps, y, sound: bool, dtype):
        self._check(x, y, values=sound)
        eps = self._check_eps(eps, x.shape[0])
        if sound:
            self._check_eval_mode()
            self._check_unchanged()
            self._check_model_dtype(x)
            dtype = sound_dtype(dtype)
            gm = self._sound_graph(dtype)
            x = x.to(dtype)  # not gm_dtype(gm): a model without parameters or buffers has none to tell
            if isinstance(eps, Tensor):
                eps = eps.to(x.dtype)
            return gm, x, eps
        model_dtype = gm_dtype(self.propagation, x.dtype)
        if x.dtype != model_dtype:
            raise InvalidInputError(f"x has dtype {x.dtype} but the model's parameters are {model_dtype}; "
                                    f"convert with x.to({model_dtype}) (the sound path converts by itself)")
        return self._training_graph(), x, eps

    def _training_graph(self):
        """The propagation module for the training path: itself, or its torch.compile'd wrapper."""
        if self.backend is None:
            return self.propagation
        if self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.propagation, backend=self.backend))
        return self._compiled

    def forward(self, x: Tensor, eps, y: Optional[Tensor] = None, sound: bool = True,
                dtype: Optional[torch.dtype] = None) -> CertifiedOutput:
        """Logits and (B, C) certified margin lower bounds w.r.t. ``y`` (or the prediction).

        Args:
            x: inputs ``(B, *input_shape)``, floating point, on the model's device.
            eps: the radius of the perturbation ball: a number, or a ``(B,)`` tensor (one per input).
            y: labels ``(B,)``; None takes the predictions as reference classes.
            sound: True (default): the certification path (float64 copy, guaranteed Lipschitz
                bounds, runtime guard); False: the training path (model dtype, estimates).
            dtype: the dtype of the sound path (default float64).

        Returns:
            :class:`CertifiedOutput` ``(logits, margins, labels, sound)``: ``margins[b, j]`` is a
            lower bound on ``z_ref - z_j`` over the perturbation set (``+inf`` at ``j == ref``).

        Raises:
            InvalidInputError: wrong shape, dtype or device, NaN/Inf, labels out of range.
            InputDomainError: inputs outside the compiled input domain.
            InvalidEpsilonError: eps negative, NaN, infinite or of the wrong shape.
            ModelModeError: (sound) Dropout or BatchNorm in training mode.
            GraphMismatchError: (sound) the model changed since compile, or its logits differ from
                the certification graph's.

        Example::

            out = cert(x, eps=1.58, y=y)
            out.margins.min(1).values > 0    # roughly cert.certify(x, y, 1.58), without the safety threshold
        """
        x_user = x
        gm, x, eps = self._prepare(x, eps, y, sound, dtype)
        y = None if y is None else y.long()  # int32 / int16 / uint8 labels index like int64 ones
        if sound:
            unit = self._rounding_unit(x_user)
            with torch.no_grad():
                logits, m = gm(x, eps, y, True, unit)
            self._guard(gm, x, x_user, logits)
            if unit:
                # an infinite Bound is the model's float32 overflow (bcpc.rounding), and where it meets a
                # zero weight the model itself computes 0 * inf = NaN: nothing is certified there
                m = m.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            if torch.isnan(m).any():
                raise NonFiniteBoundError("a certified margin came out NaN; refusing to read it as a bound")
        else:
            logits, m = gm(x, eps, y, False)
        ref = logits.argmax(1) if y is None else y
        return CertifiedOutput(logits, m, ref, sound)

    def margins(self, x: Tensor, y: Tensor, eps, sound: bool = True) -> Tensor:
        """(B, C) lower bounds on ``z_y - z_j`` for all x' in the perturbation set (+inf at j == y).

        Returns:
            a ``(B, C)`` tensor (float64 on the sound path). Raises as :meth:`forward`.

        Example::

            m = cert.margins(x, y, eps=1.58)   # m[b, j] <= z_y(x') - z_j(x') for every x' in the ball
        """
        return self.forward(x, eps, y, sound=sound).margins

    def worst_logits(self, x: Tensor, y: Tensor, eps, sound: bool = True) -> Tensor:
        """Worst-translated logits (paper eq. 2): ``z_y`` kept, every other logit raised by the
        largest amount the perturbation set allows relative to ``z_y``.

        Returns:
            a ``(B, C)`` tensor; ``cross_entropy(zw, y)`` is the robust part of the paper's loss.
            Raises as :meth:`forward`.

        Example::

            zw = cert.worst_logits(x, y, eps=1.58)
        """
        out = self.forward(x, eps, y, sound=sound)
        return margins_mod.worst_logits(out.logits, out.margins, out.labels)

    def loss(self, x: Tensor, y: Tensor, eps, lam: float = 1.0, kind: str = "bcp", hinge_margin: float = 1.0,
             slack: float = 0.1, temperature: float = 1.0) -> Tensor:
        """Certified training loss; ``kind="bcp"`` is the paper's eq. 13,
        ``(1 - lam) CE(z, y) + lam CE(zw, y)``; the others (``"trades"``, ``"gloro"``, ``"emma"``,
        ``"hinge"`` with ``hinge_margin``, ``"cll"`` with ``slack``) and ``temperature`` are in
        :mod:`bcpc.losses`.

        Uses the Lipschitz-cache estimates (not a guarantee); differentiable w.r.t. the model.

        Example::

            loss = cert.loss(x, y, eps=1.58, lam=1.0)   # or kind="trades", lam=1.5
            loss.backward()
        """
        ref = None if kind in losses.PREDICTION_REFERENCED else y  # "gloro": margins against the prediction
        out = self.forward(x, eps, ref, sound=False)
        return losses.certified_loss(kind, out.logits, out.margins, y.long(), lam, hinge_margin, slack,
                                     temperature)

    @staticmethod
    def threshold(logits: Tensor) -> Tensor:
        """(B,) the margin a certificate needs in this dtype (see CERTIFY_RTOL)."""
        rtol = CERTIFY_RTOL if logits.dtype == torch.float64 else CERTIFY_RTOL_FLOAT32
        return CERTIFY_ATOL + rtol * logits.abs().amax(dim=1)

    def certify(self, x: Tensor, y: Tensor, eps, dtype: Optional[torch.dtype] = None) -> Tensor:
        """(B,) bool: True where every x' in the perturbation set is classified as y. SOUND.

        By the model's function computed in float64; with ``cert.model_rounding = True`` also by a
        float32 model's own arithmetic (docs/soundness.md). float16 and bfloat16 models are refused.

        The certified margins (float64, guaranteed Lipschitz bounds) must exceed a safety
        threshold (:data:`CERTIFY_ATOL`, :data:`CERTIFY_RTOL`). The first call on a model computes
        the guaranteed layer norms (seconds per layer for large convolutions; :meth:`prepare` does
        it ahead, with a progress bar); later calls reuse them until a weight changes.

        Args:
            x: inputs ``(B, *input_shape)``; y: labels ``(B,)``; eps: a radius or ``(B,)`` radii.
            dtype: the dtype of the certification run: torch.float64, the default (any other raises
                InvalidInputError: rounding inside a narrower dtype is not covered by the threshold).

        Returns:
            a ``(B,)`` bool tensor.

        Raises:
            InvalidInputError, InputDomainError, InvalidEpsilonError, ModelModeError,
            GraphMismatchError: as :meth:`forward`.

        Example::

            verified_accuracy = cert.certify(x, y, eps=1.58).float().mean()
        """
        out = self.forward(x, eps, y, sound=True, dtype=dtype)
        others = out.margins.masked_fill(F.one_hot(out.labels, self.num_classes).bool(), float("inf"))
        return others.amin(dim=1) > self.threshold(out.logits)

    def certified_radius(self, x: Tensor, y: Tensor, eps_max: float = 64.0, steps: int = 30) -> Tensor:
        """(B,) largest eps (to a bisection tolerance, rounded down) at which ``certify`` accepts.

        0 where even eps = 0 is not certified (misclassified); ``eps_max`` where eps_max is.
        Margins only shrink as eps grows (every enclosure is monotone in eps), so bisection is valid,
        and the returned value is one at which ``certify`` itself returned True.

        Returns:
            a ``(B,)`` float64 tensor of radii. Raises as :meth:`certify`.

        Example::

            r = cert.certified_radius(x, y)    # cert.certify(x, y, r) is all True
        """
        self._check(x, y)
        b = x.shape[0]
        dev, dt = x.device, torch.float64
        lo = torch.zeros(b, dtype=dt, device=dev)
        hi = torch.full((b,), float(eps_max), dtype=dt, device=dev)
        ok0 = self.certify(x, y, lo)  # runs the guard on x once; the bisection re-certifies the same x
        object.__setattr__(self, "_guard_done", True)
        try:
            ok_max = self.certify(x, y, hi)
            for _ in range(steps):
                mid = (lo + hi) / 2
                ok = self.certify(x, y, mid)
                lo = torch.where(ok, mid, lo)
                hi = torch.where(ok, hi, mid)
        finally:
            object.__setattr__(self, "_guard_done", False)
        radius = torch.where(ok_max, hi, lo)
        return torch.where(ok0, radius, torch.zeros_like(radius))

    def node_bounds(self, x: Tensor, eps, sound: bool = True, dtype: Optional[torch.dtype] = None) -> dict:
        """Per graph node of the user's model: its Bound (center, radius, lower, upper).

        Returns:
            a dict from node name (as in ``bcpc.inspect``) to :class:`bcpc.Bound`: ``center``
            (the node's value at ``x``), ``radius`` (an l2 ball around it, or None) and
            ``lower``/``upper`` (a box, or None), each enclosing the node's values over the
            perturbation set. Raises as :meth:`forward`.

        Example::

            b = cert.node_bounds(x, eps=1.58)["_0"]
            (b.upper - b.lower).mean()          # the mean box width after the first layer
        """
        x_user = x
        gm, x, eps = self._prepare(x, eps, None, sound, dtype)
        names = self._lowered.bound_nodes
        rec = _Recorder(gm, names.values())
        with torch.set_grad_enabled(not sound and torch.is_grad_enabled()):
            logits, _ = rec.run(x, eps, None, sound, self._rounding_unit(x_user) if sound else 0.0)
        if sound:
            self._guard(gm, x, x_user, logits)
        return {origin: rec.values[name] for origin, name in names.items()}

    def prepare(self, progress: bool = False, dtype: Optional[torch.dtype] = None) -> float:
        """Do the one-off work of the first sound call now: build the float64 certification copy
        and compute every layer's guaranteed Lipschitz bound (an exact norm for convolutions up to
        ``bcpc.lipschitz.EXACT_MAX_DIM`` coordinates: seconds per layer), with a progress bar per
        layer when ``progress``. Later sound calls reuse the results until a weight changes;
        calling it again then is free.

        Returns:
            the seconds it took (the set-up part of a certification run's time).

        Raises:
            ModelModeError, GraphMismatchError: as :meth:`certify` would.

        Example::

            setup_s = cert.prepare(progress=True)   # then cert.certify(...) runs at its steady rate
        """
        import time

        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        self._check_eval_mode()
        self._check_unchanged()
        gm = self._sound_graph(sound_dtype(dtype))
        layers = [(origin, gm.lip.get_submodule(lip), gm.model.get_parameter(weight))
                  for origin, (lip, weight) in self._lowered.lipschitz.items() if weight]
        layers = [(origin, lip, w) for origin, lip, w in layers if not lip.has_upper(w)]  # the ones left to compute
        with tqdm(layers, disable=not progress or not layers, desc="guaranteed layer norms", unit="layer", leave=False,
                  dynamic_ncols=True) as bar:
            for origin, lip, weight in bar:
                bar.set_postfix_str(f"{origin}: {lip.kind} {'x'.join(map(str, lip.in_shape))}", refresh=True)
                lip.upper(weight)
        return time.perf_counter() - t0

    def lipschitz_table(self, converge_iters: int = 0) -> list:
        """Per affine node with a Lipschitz cache: the training estimate and the guaranteed bound.

        ``estimate`` is the current power-iteration value (what training uses); with
        ``converge_iters > 0`` also ``converged``: power iteration run that many more steps on a
        copy of the cached vector (the cache itself is left alone).

        Returns:
            a list of dicts ``{"node", "kind", "in_shape", "estimate", "upper"[, "converged"]}``.

        Example::

            for row in cert.lipschitz_table():
                print(row["node"], row["estimate"], row["upper"])   # estimate <= upper
        """
        rows = []
        with torch.no_grad():
            for origin, (lip, weight_name) in self.lipschitz_modules.items():
                weight = self.model.get_parameter(weight_name) if weight_name else None
                if weight is None:
                    continue
                est = float(lip.estimate(weight, n_iter=0) if lip._warm else lip.estimate(weight))
                upper = float(lip.upper(weight))
                row = {"node": origin, "kind": lip.kind, "in_shape": lip.in_shape, "estimate": est, "upper": upper}
                if converge_iters:
                    probe = copy.deepcopy(lip)
                    row["converged"] = float(probe.estimate(weight.double(), n_iter=converge_iters))
                rows.append(row)
        return rows


def sound_dtype(dtype) -> torch.dtype:
    """The dtype of a sound run: float64 (``None``, the default); anything else refused."""
    if dtype is None or dtype == torch.float64:
        return torch.float64
    raise InvalidInputError(
        f"dtype={dtype!r}: a sound run computes its bounds in torch.float64 only (the default; leave dtype out). "
        "In a narrower dtype, rounding inside the network (not only of the logits) can exceed any threshold on the "
        "final margins: new-user reviews certified misclassified inputs in bfloat16 and float16, and in float32 "
        "with an intermediate value near 1e8.")


_NARROW_FLOATS = (torch.float16, torch.bfloat16)


def _unit_text(dtypes) -> str:
    """The largest relative rounding error (unit roundoff) of the least precise of ``dtypes``."""
    return "2^-8" if torch.bfloat16 in dtypes else "2^-11"


def gm_dtype(gm: nn.Module, default: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype of ``gm``'s first parameter or floating buffer; ``default`` (torch's default dtype
    if None) for a module with neither, which computes in whatever dtype its input has."""
    for p in gm.parameters():
        return p.dtype
    for b in gm.buffers():
        if b.dtype.is_floating_point:
            return b.dtype
    return default if default is not None else torch.get_default_dtype()

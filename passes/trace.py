"""Trace: the user's nn.Module -> torch.fx GraphModule, with source lines recorded.

Built-in ``torch.nn`` modules stay leaves (``call_module``); user Module classes and
``nn.Sequential`` are traced through. A model torch.fx cannot trace (data-dependent control flow,
unsupported Python) raises :class:`~bcpc.errors.TraceError` naming the module whose ``forward``
failed, not a raw fx traceback.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import operator
import os
import pickle
import random
import sys
import sysconfig
import types
import warnings
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bcpc.errors import TraceError, UnsupportedOpError
from bcpc.meta import where
from bcpc.state import describe_hook, names_read, user_functions


_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
#: what a subclass may define and still compute its torch.nn base's function
_BUILD_ONLY = frozenset(["__init__", "extra_repr", "reset_parameters"])


def _builtin_with_new_constructor(cls: type) -> bool:
    """A user subclass of a built-in torch.nn layer that changes only how it is built
    (``class MyBN(nn.BatchNorm2d): pass``, a conv with its own ``__init__``): it runs the
    built-in's forward, so it is a leaf like the built-in (whose forward fx may not trace:
    BatchNorm checks ``input.dim()``). A subclass that defines any other method or property is
    traced through, and the verify step checks the graph against the model either way."""
    for c in cls.__mro__:
        if c.__module__.startswith(("torch.nn.", "torch.ao.nn.")):
            return c not in _CONTAINERS
        if _defines_behaviour(c):
            return False
    return False


def _defines_behaviour(cls: type) -> bool:
    """``cls`` itself defines a method, property or other descriptor besides its constructor."""
    return any(callable(v) or hasattr(v, "__get__") for name, v in vars(cls).items()
               if name not in _BUILD_ONLY and name not in ("__dict__", "__weakref__"))


#: Python's augmented assignments, by dunder name. torch.fx's Proxy defines none of them, so
#: Python falls back to the plain operator and ``h += f(h)`` is recorded as ``h = h + f(h)``:
#: another name bound to the same tensor (``skip = h`` before it) keeps the old value in the
#: graph but sees the new one in eager PyTorch. Recording the in-place operator instead lets
#: functionalize redirect those aliases (or refuse what it cannot rewrite).
_AUGMENTED = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
    "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}


def _augmented(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


class _Proxy(fx.Proxy):
    """A Proxy that records ``h += v`` (and the other augmented assignments) as the in-place
    operator the user wrote."""


for _name, _op in _AUGMENTED.items():
    setattr(_Proxy, _name, _augmented(_op))


class _StateProxy(_Proxy):
    """A parameter or buffer read in forward: its values are traced (the graph reads them at every
    call), its metadata are the tensor's own (``range(self.pe.shape[0])``, ``len(self.pe)``,
    ``self.mean.dim()``, ``for row in self.table``), as Python code needs them at trace time. A later
    change of a shape is a change of the model (``bcpc.state.structure``)."""

    #: its dtype and device stay graph values: the dtypes pass resolves a cast to them against the model
    #: (``h.to(self.conv.weight.dtype)`` casts to the model's own dtype, not to float32)
    _METADATA = frozenset(["shape", "ndim", "size", "dim", "ndimension", "numel", "nelement"])

    def __init__(self, node: fx.Node, tracer, value: torch.Tensor):
        super().__init__(node, tracer)
        self._value = value

    def __getattr__(self, k):
        if k in _StateProxy._METADATA:
            return getattr(self._value, k)
        return super().__getattr__(k)

    def __len__(self):
        return len(self._value)

    def __iter__(self):
        return (self[i] for i in range(len(self._value)))


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True
        # buffers read in forward become graph nodes (get_attr), as parameters do: otherwise fx computes
        # what forward makes of them (torch.sqrt(self.var + 1e-5), self.flag.item()) once, at trace time,
        # and the graph keeps that value after the buffer changes (load_state_dict): found by a new-user
        # review (a false certificate)
        self.proxy_buffer_attributes = True
        #: id -> (tensor, its version counter) of every real tensor the graph holds as a constant,
        #: at the moment the graph first used it
        self.captured: dict = {}
        #: where forward used a tensor computed from a parameter or buffer outside the graph
        self.from_parameters: list = []
        self.state_taint: Optional["_StateTaint"] = None
        self._state: Optional[dict] = None  # qualified name -> parameter or buffer of the root being traced

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "get_attr":
            if self._state is None:  # one tracer traces one model
                self._state = {**dict(self.root.named_parameters()), **dict(self.root.named_buffers())}
            value = self._state.get(node.target)
            if value is not None:
                return _StateProxy(node, self, value)
        return _Proxy(node, self)

    def create_arg(self, a):
        np = sys.modules.get("numpy")
        if np is not None and isinstance(a, np.generic) and isinstance(a.item(), (bool, int, float)):
            # a NumPy scalar (self.scale = np.sqrt(d)) as the Python number it holds: fx would write
            # it into the graph's code as np.float64(...), a name that code does not import
            return self.create_arg(a.item())
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and (
                a.grad_fn is not None or (self.state_taint is not None and self.state_taint.holds(a))):
            # computed for real from a parameter or buffer that fx did not follow (next(self.parameters()).abs(),
            # self._buffers["cap"] * 1, state_dict()["w"].detach(), under no_grad or not): the graph would
            # keep the value of compile time while training or load_state_dict changes the state (two
            # new-user reviews' false certificates)
            self.from_parameters.append(_user_line())
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and id(a) not in self.captured:
            # the values too: a write through .data (c.data.mul_(2)) does not move c's version counter
            self.captured[id(a)] = (a, a._version, a.detach().clone())
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.padding_mode != "zeros":
            # traced through: torch's own forward is F.pad(x, ..., mode=padding_mode) then the
            # convolution without padding, two ops with rules
            return False
        return super().is_leaf_module(m, module_qualified_name) or _builtin_with_new_constructor(type(m))


class _StateTaint(torch.overrides.TorchFunctionMode):
    """While fx traces: the real tensors forward computes from the model's parameters and buffers
    where fx does not see them as such (a parameter or buffer read as an attribute is a Proxy; one
    reached through ``self.parameters()``, ``self._buffers[...]``, ``state_dict()`` is the tensor
    itself). A tensor holds state when it shares storage with a parameter or buffer (``.data``,
    ``.detach()``, ``state_dict()``'s entries) or a torch function computed it from one that does.
    Where forward reads such a tensor's values out as Python goes to ``read``."""

    #: what reads a tensor's values out as Python (a number, a list, an array, a string): fx keeps the
    #: value read at compile time in the graph
    _READS = frozenset(["item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__",
                        "__format__", "__repr__", "__str__", "__array__", "__reduce_ex__", "__getstate__"])

    def __init__(self, model: nn.Module, read: list):
        super().__init__()
        self._storages = {_storage(t) for t in list(model.parameters()) + list(model.buffers())} - {None}
        self._held: dict = {}  # id -> tensor (kept alive, so that the id is not reused)
        self.read = read

    def holds(self, t: torch.Tensor) -> bool:
        return id(t) in self._held or _storage(t) in self._storages

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = []
        fx.node.map_aggregate((args, kwargs), lambda a: inputs.append(a) or a)
        held = any(isinstance(a, torch.Tensor) and self.holds(a) for a in inputs)
        if held and getattr(func, "__name__", None) in self._READS:
            self.read.append(_user_line())
        out = func(*args, **kwargs)
        if held:
            fx.node.map_aggregate(out, lambda o: self._held.setdefault(id(o), o) if isinstance(o, torch.Tensor) else o)
        return out


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # a tensor without storage
        return None


def _user_line() -> str:
    """``file:line`` of the innermost frame outside torch and bcpc (the model's code being traced)."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_LIBRARY_DIRS) or path.startswith(_STDLIB_DIR) or frame.filename.startswith("<")):
            return f"{frame.filename}:{frame.lineno}"
    return "<source unknown>"


def _failing_module(exc: BaseException) -> str:
    """Class and method of the innermost nn.Module frame in the traceback (the module is the
    method's first argument, whatever its name)."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        first = code.co_varnames[0] if code.co_argcount else None
        owner = tb.tb_frame.f_locals.get(first) if first else None
        if isinstance(owner, nn.Module) and not isinstance(owner, fx.GraphModule):
            code = tb.tb_frame.f_code
            found = f"{type(owner).__name__}.{code.co_name} ({code.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return found or "the model's forward"


#: (words in torch.fx's message, what to write instead) for the untraceable spellings users write.
_ADVICE = (
    (("int() argument", "float() argument", "bool() argument", "'Proxy' object cannot be interpreted as an integer"),
     "torch.fx traces the input symbolically, so int() / float() / bool() of a tensor or of its shape "
     "(int(x.shape[1]), float(x.sum())) has no value at trace time. Sizes: use numbers the module "
     "knows (set in __init__), or pass the shape on without int() (h.flatten(1), h.view(h.shape[0], -1)); "
     "a Python number computed from the input's values (float(x.sum()), x.item()) cannot be certified: "
     "keep it a tensor op. Buffers are traced too (a later change of a buffer changes the model, so the graph "
     "reads it at every call): a number kept in a buffer for int() / float() / .item() belongs in a plain "
     "attribute set in __init__ (self.k = 3), or keep the computation a tensor op."),
    (("cannot be used as inputs to control flow",),
     "An if / while on a tensor value branches on the input, which one graph cannot hold. Write the "
     "choice as tensor ops: torch.where(cond, a, b), h.clamp(...), torch.maximum(a, b). torch.fx also traces "
     "the input's sizes (if x.shape[0] > 1, if x.size(1) == 3) and every extra argument of forward without a "
     "default symbolically, and so are buffers (if self.flag: with a bool buffer; the graph reads buffers at "
     "every call, so that a later change is seen): branch on a number the module knows (a plain attribute set "
     "in __init__) instead, or wrap the model "
     "so that forward takes only x and passes the others as constants (arguments with a default are traced at "
     "their default, as model(x) runs them)."),
    (("cannot be iterated",),
     "A for loop over a tensor (for c in h.chunk(2, 1), for row in h) needs its length at trace time. "
     "Unpack into names (a, b = h.chunk(2, 1)) or index with a fixed range (parts = h.chunk(2, 1); "
     "sum(parts[i] for i in range(2)))."),
    (("takes 1 positional argument but",),
     "A tensor constructor given a size read from the input's shape (torch.zeros(x.shape[0], n), "
     "torch.ones(B, n)) cannot take a traced size. Build it from a tensor of the graph instead: "
     "h.new_zeros(h.shape[0], n), h.new_ones(...), h.new_full(...), or torch.zeros_like(h)."),
    (("is not installed as a submodule",),
     "A module built inside forward (nn.AvgPool2d(4)(h), nn.ReLU()(h)) is not part of the model, and "
     "torch.fx cannot record it. Build it once in __init__ (self.pool = nn.AvgPool2d(4)) or call the "
     "function instead (F.avg_pool2d(h, 4), torch.relu(h))."),
    (("__cuda_array_interface__", "__array__", "__len__"),
     "torch.tensor(...) / torch.as_tensor(...) (or np.array(...)) of a value computed from the input copies "
     "it out of the graph, which torch.fx cannot record. Use the tensor itself (h, h.clone(), h.to(dtype)), "
     "and build a tensor out of several with torch.stack([a, b], 1) or torch.cat."),
    (("does not support item assignment",),
     "Writing into a tensor (h[:, 0] = v) is not traced. Build the result out of place: "
     "torch.cat([v, h[:, 1:]], 1), or torch.where(mask, v, h) with a constant mask."),
)


def _advice(exc: BaseException) -> str:
    text = str(exc)
    for needles, advice in _ADVICE:
        if any(n in text for n in needles):
            return advice
    return ("bcpc needs a model whose forward is a fixed graph of tensor ops: replace data-dependent Python "
            "control flow (if/for on tensor values) by tensor ops, or compile the traceable part of the model.")


def _refuse_forward_hooks(model: nn.Module) -> None:
    """torch.fx calls ``forward`` without the module's forward hooks and pre-hooks, so a hook that
    changes an input or an output would be missing from the graph, and the clean-logits check
    at sample points cannot see a hook that acts only elsewhere (a clamp above some value, say).
    Refused, whatever the hook does."""
    import torch.nn.modules.module as module_mod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for name, m in model.named_modules():
        for kind, hooks in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks)):
            for hook in hooks.values():
                if isinstance(hook, (SpectralNorm, WeightNorm)):
                    which = "spectral_norm" if isinstance(hook, SpectralNorm) else "weight_norm"
                    raise TraceError(
                        f"module {name or '<root>'!r} ({type(m).__name__}) uses the hook-based torch.nn.utils.{which}, "
                        "whose weight is recomputed by a forward pre-hook that torch.fx does not run. Use "
                        f"torch.nn.utils.parametrizations.{which} (a parametrization, which bcpc traces) instead.")
                found.append(f"{kind} {describe_hook(hook)} on {name or '<root>'!r} ({type(m).__name__})")
    for kind, hooks in (("global forward pre-hook", module_mod._global_forward_pre_hooks),
                        ("global forward hook", module_mod._global_forward_hooks)):
        found += [f"{kind} {describe_hook(hook)} (torch.nn.modules.module.register_module_{kind.split()[1]}_"
                  f"{'pre_hook' if 'pre' in kind else 'hook'})" for hook in hooks.values()]
    if found:
        raise TraceError(
            f"the model has {', '.join(found)}. torch.fx traces forward() without hooks, so the compiled graph "
            "would not compute what model(x) computes wherever a hook changes a value, and no certificate would "
            "hold. Remove the hooks before bcpc.compile (keep the handle register_forward_hook returns and call "
            "handle.remove()), or move what they compute into the module's forward.")


def _attributes(model: nn.Module) -> dict:
    """Each module's ``__dict__`` entries, by module name (a shallow copy), and under the key
    ``(name, "contents")`` a copy of each list and dict attribute's items (``self.history.append(h)``
    changes a list in place)."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out[name] = dict(vars(m))
        out[(name, "contents")] = {k: (list(v) if isinstance(v, list) else dict(v))
                                   for k, v in vars(m).items() if type(v) in (list, dict)}
    return out


def _undo_assignments(model: nn.Module, before: dict) -> dict:
    """Put back the attributes forward assigned a traced value while fx traced it (``self.cache =
    out`` would otherwise leave a tracing Proxy on the user's module, and in the graph where forward
    reads it) and return them: ``{(module name, attribute): the value forward assigned}``. Other
    assignments (a call counter) stay, as a call of forward in eager PyTorch leaves them."""
    written = {}
    for name, m in model.named_modules(remove_duplicate=False):
        old = before.get(name)
        if old is None:
            continue
        d = vars(m)
        contents = before[(name, "contents")]
        for key in list(d):
            if not _holds_proxy(d[key]):
                continue
            if key in old and d[key] is old[key] and key in contents:  # a list or dict changed in place
                written[(name, key)] = type(d[key])(d[key])
                if isinstance(d[key], list):
                    d[key][:] = contents[key]
                else:
                    d[key].clear()
                    d[key].update(contents[key])
                continue
            if key not in old:
                written[(name, key)] = d.pop(key)
            elif d[key] is not old[key]:
                written[(name, key)] = d[key]
                d[key] = old[key]
    return written


def _holds_proxy(value, depth: int = 0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth < 4 and isinstance(value, (tuple, list)):
        return any(_holds_proxy(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return any(_holds_proxy(v, depth + 1) for v in value.values())
    return False


def _same(t: torch.Tensor, values: torch.Tensor) -> bool:
    return t.shape == values.shape and torch.allclose(t.detach(), values, rtol=0.0, atol=0.0, equal_nan=True)


def _refuse_changed_buffers(model: nn.Module, before: dict) -> None:
    """A forward that reassigns a buffer or writes into it (``self.prev = -self.prev``,
    ``self.prev.data.mul_(-1)``, which fx runs for real while tracing) changes the model at every
    call, and a certificate for its state at one call says nothing of the next (found by a new-user review: certified, then the next
    ``model(x)`` misclassified the certified input). Refused."""
    now = dict(model.named_buffers(remove_duplicate=False))
    for name, (t, values) in before.items():
        cur = now.get(name)
        if cur is t and _same(cur, values):
            continue
        raise UnsupportedOpError(
            f"forward changes the buffer {name!r} (assigns it, or writes into it in place or through .data): state "
            "carried from one call to the next, so the model computes another function at every call and no "
            "certificate for one call holds for the next. Keep buffers constant in forward (nn.BatchNorm updates "
            "its running statistics in training mode only, which bcpc handles).")


def _refuse_mutated_constants(tracer: _Tracer, graph: fx.Graph) -> None:
    """A tensor that does not depend on the input (``lim = self.cap.clone()``, ``torch.zeros(3)``)
    is computed by fx while tracing and recorded in the graph as the tensor object itself. An
    in-place change of it later in forward (``lim -= 97``) then changes what the graph reads at its
    earlier uses too, where eager PyTorch read the old value (found by a new-user review: a clamp
    at 3 instead of 100, invisible at the clean input, gave a false certificate). Refused."""
    for t, version, values in tracer.captured.values():
        if t._version == version and _same(t, values):
            continue
        name = tracer.tensor_attrs.get(t)
        uses = [u for n in graph.nodes if n.op == "get_attr" and n.target == name for u in n.users]
        at = f" by node '{uses[0].name}' at {where(uses[0])}" if uses else ""
        raise UnsupportedOpError(
            f"a tensor of shape {tuple(t.shape)} that does not depend on the input (a constant of the graph, "
            f"used{at}) is changed in place later in forward (an in-place op or h += ... on it). torch.fx records "
            "such a tensor once, as it is at the end of tracing, so the graph would read the changed value where "
            "the model read the old one. Write the change out of place (c = c - 1 rather than c -= 1 or c.sub_(1)).")


#: names that tell a forward whether torch.fx is tracing it (transformers' is_torch_fx_proxy, ...)
_FX_CHECKS = frozenset(["Proxy", "is_fx_tracing", "is_torch_fx_proxy", "_is_fx_tracing_flag", "is_fx_symbolic_tracing"])


def _refuse_tracing_checks(model: nn.Module) -> None:
    """A forward that asks whether it is being traced (``isinstance(h, torch.fx.Proxy)``,
    ``is_fx_tracing()``) runs one branch for the trace and another for the user: the graph bcpc
    certifies is not the model (found by a new-user review: an eager-only clamp, invisible at the
    clean points, absent from the certified graph). Refused, for the user's own classes and the
    functions of theirs that forward calls."""
    for name, m in model.named_modules():
        for owner, attr, fn in user_functions(m):
            hit = sorted(names_read(fn, helpers=True) & _FX_CHECKS)
            if hit:
                raise TraceError(
                    f"{owner}.{attr} (module {name or '<root>'!r}) checks whether torch.fx is tracing it "
                    f"({', '.join(hit)}): the trace takes one branch and the model, run by you, the other, so the "
                    "graph bcpc would certify is not the model. Remove the check, or make both branches compute "
                    "the same.")


def _refuse_torchscript(model: nn.Module) -> None:
    """torch.fx cannot look inside a TorchScript module (``torch.jit.script`` / ``torch.jit.trace``):
    it would record a call of its ``forward`` that no bound rule covers. Refused up front with what
    to do (the new-user review of the seventeenth session got "Tensor.forward has no bound rule")."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise TraceError(
                f"module {name or '<root>'!r} ({type(m).__name__}) is TorchScript (torch.jit.script or "
                "torch.jit.trace), which torch.fx cannot trace into, so bcpc cannot see its ops. Compile the "
                "original nn.Module instead (the one you passed to torch.jit.script), and script the model only "
                "for deployment, after certification.")


def _forward_defaults(model: nn.Module) -> dict:
    """forward's arguments after the input that have a default of a plain Python type
    (``forward(self, x, return_features=False)``, ``scale=1.0``, ``mode=None``): ``model(x)`` runs
    them at their defaults, so they are traced at their defaults (fx's ``concrete_args``) instead of
    as extra inputs the graph cannot have. An argument without a default stays an input, refused
    later (bcpc certifies a forward of one tensor input)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: nothing to bind
        return {}
    defaults = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceError(
                f"{type(model).__name__}.forward takes *{'*' if p.kind is p.VAR_KEYWORD else ''}{p.name}: torch.fx "
                "cannot trace a forward of variable arguments, and bcpc certifies forward(x) of one input. Give "
                "forward the input alone (def forward(self, x)), or wrap the model in a module whose forward(x) "
                "calls it with the other arguments.")
        if p.default is p.empty:
            continue  # an input bcpc refuses later (forward takes one tensor input)
        if p.default is not None and type(p.default) not in (bool, int, float, str):
            raise TraceError(
                f"{type(model).__name__}.forward's argument {p.name!r} has a default of type "
                f"{type(p.default).__name__}: bcpc traces forward's defaulted arguments at their default only for "
                "None, bool, int, float and str. Keep the value on the module instead (a buffer, or an attribute "
                "set in __init__) and read it in forward.")
        defaults[p.name] = p.default
    return defaults


def _drop_specialisation_checks(graph: fx.Graph) -> None:
    """Remove what fx's ``concrete_args`` leaves of each argument traced at its default: a
    placeholder and a check that the call passes that value (``torch._assert(arg == value)``,
    ``_assert_is_none(arg)``). The certifying module is called with the input alone, so the default
    always holds; any other use of such a placeholder keeps it (and the graph is refused as having
    more than one input)."""
    checks = (torch._assert, torch.fx._symbolic_trace._assert_is_none)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        for user in list(node.users):
            if user.op == "call_function" and user.target in checks:
                graph.erase_node(user)
            elif (user.op == "call_function" and user.target is operator.eq and user.users
                  and all(u.op == "call_function" and u.target is torch._assert for u in user.users)):
                for u in list(user.users):
                    graph.erase_node(u)
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)


def _no_dim_check(input) -> None:
    return None


def _skip_dim_checks(model: nn.Module, tracer: "_Tracer") -> list:
    """A BatchNorm subclass with its own forward (``return super().forward(x) * 2``) is traced
    through, and BatchNorm's forward first checks ``input.dim()``: a Python ``if`` on a traced
    value, which fx cannot take. The check only guards against a wrongly shaped input, which the
    example input is not (the model ran on it), so it is switched off on those modules while fx
    traces, and the verify step checks the graph against the model as always. Returns the modules
    to restore."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and not tracer.is_leaf_module(m, name) \
                and "_check_input_dim" not in vars(m):
            m._check_input_dim = _no_dim_check
            out.append(m)
    return out


def _restore_dim_checks(modules: list) -> None:
    for m in modules:
        vars(m).pop("_check_input_dim", None)


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
#: torch's own code, and the decorators it applies (typing_extensions.deprecated wraps a few __new__)
_TORCH_CODE = (_TORCH_DIR,) + tuple(os.path.abspath(m.__file__) for m in (sys.modules.get("typing_extensions"),)
                                    if m is not None and getattr(m, "__file__", None))


def _from_torch(value) -> bool:
    """A callable as torch defines it: a builtin, a descriptor, a function whose code is in
    torch's files (``functools.wraps`` copies a name and a module, not the code), or a wrapper of
    such; typing's aliases count as torch's own imports."""
    if isinstance(value, (staticmethod, classmethod)):
        return _from_torch(value.__func__)
    if isinstance(value, property):
        return all(f is None or _from_torch(f) for f in (value.fget, value.fset, value.fdel))
    if isinstance(value, functools.partialmethod):
        return False
    if isinstance(value, type) or inspect.ismodule(value) or not callable(value):
        return True
    if isinstance(value, (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                          types.ClassMethodDescriptorType, types.MethodWrapperType)):
        return True
    if inspect.isfunction(value):
        if (value.__module__ or "") in ("typing", "typing_extensions"):
            return True
        return os.path.abspath(value.__code__.co_filename).startswith(_TORCH_CODE)
    wrapped = getattr(value, "__wrapped__", None)  # functools.lru_cache and the like
    if wrapped is not None and type(value).__module__ == "functools":
        return _from_torch(wrapped)
    return type(value).__module__.startswith(("torch", "typing"))


#: the names torch.nn's modules import torch's namespaces under (``F.relu`` in nn.ReLU.forward)
_ALIASES = {"F": "torch.nn.functional", "torch": "torch", "init": "torch.nn.init", "_VF": "torch._VF"}


@functools.lru_cache(maxsize=1)
def _aten_names() -> frozenset:
    """torch's public names that are ATen ops (looked up once: ``hasattr(torch.ops.aten, k)``
    resolves an op, which is slow for the names that are not one)."""
    return frozenset(k for k in vars(torch) if not k.startswith("_") and hasattr(torch.ops.aten, k))


def _replaced_torch_callables() -> list:
    """torch.nn.functional's functions, torch's ops, Tensor's methods and the C functions F calls
    (``torch._C._nn``) that are not torch's own (``F.relu = my_relu``), and the namespaces torch.nn's
    modules read replaced (``activation.F = ...``): a built-in layer calls them at run time, while
    its rule is torch's."""
    out = [f"torch.nn.functional.{k}" for k, v in vars(F).items() if not _from_torch(v)]
    out += [f"torch.{k}" for k, v in vars(torch).items() if k in _aten_names() and not _from_torch(v)]
    out += [f"torch.Tensor.{k}" for k, v in vars(torch.Tensor).items() if not _from_torch(v)]
    out += [f"torch._C._nn.{k}" for k, v in vars(torch._C._nn).items() if not _from_torch(v)]
    out += [f"torch._VF.{k}" for k, v in vars(torch._VF).items() if not _from_torch(v)]
    for name, module in list(sys.modules.items()):
        if module is not None and (name.startswith("torch.nn.modules.") or name == "torch.nn.functional"):
            space = vars(module)
            out += [f"{name}.{alias}" for alias, real in _ALIASES.items()
                    if alias in space and space[alias] is not sys.modules.get(real, space[alias])]
    return out


def _refuse_replaced_code(model: nn.Module, tracer: "_Tracer") -> None:
    """torch.fx records a built-in layer as a call of the layer, and bcpc bounds that call by the
    rule of the layer's type; what ``model(x)`` runs is the layer's forward as it is now. A forward
    replaced on the instance (``m.act.forward = f``, as adapter libraries do) or on the class
    (``nn.ReLU.forward = f``), or a torch function the layer calls replaced (``F.relu = f``), makes
    the two differ, only where ``f`` differs, which the check at sample points need not see (found by
    a new-user review: certified 3.5 where the model's margin is -4.5). Refused, as is a model whose
    own ``__call__`` or ``forward`` attribute replaces the one fx traces."""
    if type(model).__call__ is not nn.Module.__call__:
        raise TraceError(
            f"{type(model).__name__} defines its own __call__: torch.fx traces forward(), while model(x) runs "
            "__call__, so the graph bcpc would certify is not what you call. Move what __call__ adds into forward.")
    for name, m in model.named_modules():
        if type(m)._call_impl is not nn.Module._call_impl:
            raise TraceError(
                f"module {name or '<root>'!r} ({type(m).__name__}) defines its own _call_impl: torch.fx traces "
                "forward(), while calling the module runs _call_impl, so the graph bcpc would certify is not what "
                "runs. Move what it adds into forward.")
        if vars(m).get("_compiled_call_impl") is not None:
            raise TraceError(
                f"module {name or '<root>'!r} ({type(m).__name__}) was compiled with its .compile() method: calling "
                "it runs torch.compile's code, not the forward torch.fx traces. Certify the model before "
                "model.compile() (or build a fresh one from its state_dict).")
    for name, m in model.named_modules():
        shadowed = sorted(k for k, v in vars(m).items() if callable(v) and not isinstance(v, nn.Module)
                          and inspect.isroutine(getattr(type(m), k, None)))
        if shadowed and (m is model or tracer.is_leaf_module(m, name)):
            raise TraceError(
                f"module {name or '<root>'!r} ({type(m).__name__}) has its method(s) {', '.join(shadowed)} replaced "
                "on the instance: torch.fx and bcpc's rules read the class's, while model(x) runs the replacement. "
                "Compile the model without the patch (apply it after certification), or subclass the layer and "
                "define the method there (bcpc traces a subclass's own forward).")
    classes = {nn.Module}
    for name, m in model.named_modules():
        if tracer.is_leaf_module(m, name):
            classes.update(c for c in type(m).__mro__ if c.__module__.startswith(("torch.nn.", "torch.ao.nn.")))
    patched = sorted(f"{c.__module__}.{c.__qualname__}.{k}" for c in classes for k, v in vars(c).items()
                     if not _from_torch(v))
    patched += _replaced_torch_callables()
    if patched:
        raise TraceError(
            f"torch's own code is replaced: {', '.join(patched[:5])}{' ...' if len(patched) > 5 else ''} is not "
            "torch's function. bcpc bounds built-in layers and torch ops by their rules, so a replacement that "
            "computes anything else makes the certified graph differ from the model. Compile without the patch "
            "(restore the original before bcpc.compile), or write the changed computation as your own module.")


def _rng_states() -> bytes:
    """torch's, Python's and NumPy's global random states, as one value to compare."""
    states = [torch.random.get_rng_state().numpy().tobytes(), random.getstate()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += [t.numpy().tobytes() for t in torch.cuda.get_rng_state_all()]
    np = sys.modules.get("numpy")
    if np is not None:
        states.append(np.random.get_state())
    return pickle.dumps(states)


#: torch's and bcpc's own code (bcpc's passes and rules included, wherever they are installed)
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                      for f in (torch.__file__, sys.modules["bcpc"].__file__, __file__,
                                importlib.util.find_spec("bcpc.rules").origin))
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
#: torch.fx's "am I being traced" functions (is_fx_tracing, is_fx_symbolic_tracing, ...)
_TRACING_CHECKS = frozenset(f.__code__ for k, f in vars(fx._symbolic_trace).items()
                            if k.startswith("is_fx") and inspect.isfunction(f))


def _state_queries() -> tuple:
    """What forward may ask of the process rather than compute from its input: grad and inference
    mode, autocast, thread counts, determinism, anomaly mode, matmul precision, torch's seed and
    generator state, the environment. Asked while fx traces, the answer is fixed in the graph;
    inference (``torch.no_grad()``, ``inference_mode``) or a later setting gives the model another
    answer, so the graph is not the model (new-user reviews built false certificates from ``if not
    torch.is_grad_enabled(): ...`` and ``if torch.initial_seed() == ...``). ``(ids of C functions,
    Python code objects)``."""
    functions = [getattr(torch, name, None) for name in (
        "is_grad_enabled", "is_inference_mode_enabled", "is_autocast_enabled", "get_autocast_dtype",
        "get_autocast_gpu_dtype", "get_autocast_cpu_dtype", "is_autocast_cpu_enabled", "get_num_threads",
        "get_num_interop_threads", "is_anomaly_enabled", "is_anomaly_check_nan_enabled",
        "get_float32_matmul_precision", "is_warn_always_enabled", "are_deterministic_algorithms_enabled",
        "is_deterministic_algorithms_warn_only_enabled", "initial_seed", "get_rng_state")]
    functions += [getattr(torch._C, name, None) for name in (
        "_get_deterministic_algorithms", "_is_inference_mode_enabled", "is_grad_enabled")]
    # `in os.environ` and .get reach __getitem__, list(os.environ) and .keys() __iter__
    functions += [os.getenv, type(os.environ).__getitem__, type(os.environ).__iter__, type(os.environ).__len__,
                  type(os.environ).__repr__]
    functions = [f for f in functions if f is not None]
    return (frozenset(id(f) for f in functions if not inspect.isfunction(f)),
            frozenset(f.__code__ for f in functions if inspect.isfunction(f)))


_QUERY_IDS, _QUERY_CODES = _state_queries()


#: exceptions a value of the wrong kind raises (a NumPy or Python call given a traced value, fx's
#: refusals): caught in the model's code, they mean a fallback path. Lookups (KeyError, a missing
#: attribute), the end of an iteration and optional imports say nothing about the traced values.
_VALUE_FAILURES = (TypeError, ValueError, RuntimeError, NotImplementedError, AssertionError, fx.proxy.TraceError)

#: torch's functions that draw from a random generator when called with no traced argument
_TORCH_DRAWS = frozenset(id(f) for f in (torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like,
                                         torch.randn_like, torch.randint_like, torch.normal, torch.bernoulli,
                                         torch.multinomial, torch.poisson, os.urandom, getattr(os, "getrandom", None))
                         if f is not None)


#: a generator's methods that read or set its state without drawing (a fixed seed included)
_STATE_ONLY = frozenset(["manual_seed", "get_state", "set_state", "initial_seed", "getstate", "setstate",
                         "graphsafe_get_state", "graphsafe_set_state", "clone_state", "__reduce__",
                         "__getstate__", "__setstate__", "__init__", "__new__"])


def _is_random_source(fn) -> bool:
    """A C function that draws random numbers (or seeds from the system's entropy): torch's, or a
    method of a random generator object (torch.Generator, NumPy's Generator/RandomState/bit
    generators, Python's random.Random)."""
    if id(fn) in _TORCH_DRAWS:
        return True
    name = getattr(fn, "__name__", None)
    if name in _STATE_ONLY:
        return False
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.Tensor) or (isinstance(name, str) and "." in name):
        # a Tensor's random method (t.bernoulli_(p, generator=g)) or an ATen overload (bernoulli.p)
        from bcpc.passes.canonicalize import _draws_random
        return isinstance(name, str) and _draws_random(name.split(".")[0])
    if owner is None or inspect.ismodule(owner):
        module = getattr(fn, "__module__", None) or ""
        return module.startswith("numpy.random")  # default_rng and the module-level functions
    if isinstance(owner, (torch.Generator, random.Random)):
        return True
    return type(owner).__module__.startswith("numpy.random")


_OVERLOAD_CALL = torch._ops.OpOverload.__call__.__code__


class _PathWatch:
    """While fx traces: exceptions of a value of the wrong kind raised and caught in the model's
    code, calls from it of torch.fx's ``is_fx_tracing``, and draws from any random generator. Each
    means the graph may be another function than the model: a fallback taken for the traced values
    only (``try: fast_numpy_path(h) except TypeError: torch_path(h)``), a branch on tracing, or a
    random value fixed once in the graph."""

    def __init__(self, model: nn.Module):
        self.caught, self.asked, self.drawn, self.queried, self._user = [], [], [], [], {}
        # the model's code: every file of the packages (or single modules) its classes come from,
        # wherever they are installed, and any code outside installed packages
        self._model_roots = set()
        for m in model.modules():
            for c in type(m).__mro__:
                if c.__module__.startswith(("torch", "builtins")):
                    continue
                top = sys.modules.get(c.__module__.split(".")[0])
                path = getattr(top, "__file__", None)
                if path:
                    path = os.path.abspath(path)
                    self._model_roots.add(os.path.dirname(path) + os.sep if path.endswith("__init__.py") else path)

    def _is_user(self, filename: str) -> bool:
        hit = self._user.get(filename)
        if hit is None:
            path = os.path.abspath(filename) if not filename.startswith("<") else filename
            installed = os.sep + "site-packages" + os.sep in path or os.sep + "dist-packages" + os.sep in path
            hit = any(path == r or (r.endswith(os.sep) and path.startswith(r)) for r in self._model_roots) or not (
                filename.startswith("<frozen") or installed or path.startswith(_LIBRARY_DIRS)
                or path.startswith(_STDLIB_DIR))
            self._user[filename] = hit
        return hit

    def _call(self, frame, event, arg):
        code = frame.f_code
        if code in _TRACING_CHECKS:
            back = frame.f_back
            if back is not None and self._is_user(back.f_code.co_filename):
                self.asked.append(f"{back.f_code.co_filename}:{back.f_lineno}")
            return None
        if code in _QUERY_CODES:
            caller = self._user_caller(frame.f_back)
            if caller is not None:
                self.queried.append(f"{code.co_name} at {caller}")
            return None
        if event != "call" or not self._is_user(code.co_filename):
            return None
        frame.f_trace_lines = False
        return self._local

    def _local(self, frame, event, arg):
        if event == "exception":
            exc = arg[1]
            if isinstance(exc, _VALUE_FAILURES) or "Proxy" in str(exc):
                self.caught.append(
                    f"{type(exc).__name__} ({str(exc)[:120]}) at {frame.f_code.co_filename}:{frame.f_lineno}")
        return self._local

    def _user_caller(self, frame):
        """``file:line`` of the model's code that made this call, directly or through the standard
        library's own wrappers (``os.environ.get`` reaches ``__getitem__`` through ``Mapping.get``),
        or None for a call from library code (torch's MultiheadAttention asks for grad mode to choose
        its fused path, which computes the same function)."""
        while frame is not None and frame.f_code.co_filename.startswith((_STDLIB_DIR, "<frozen")):
            frame = frame.f_back
        if frame is not None and self._is_user(frame.f_code.co_filename):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        return None

    def _called_by_model(self, frame) -> bool:
        """``frame`` is the model's code, or library code the model's code called
        (``torch.seed()``, ``random.Random().randint``, ``secrets``), not through an import: a
        library's own lazy import that seeds a generator is not the model drawing."""
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith("<frozen importlib"):
                return False
            if self._is_user(filename):
                return True
            frame = frame.f_back
        return False

    def _profile(self, frame, event, arg):
        if event == "call" and frame.f_code is _OVERLOAD_CALL:  # torch.ops.aten.bernoulli.p(...)
            from bcpc.passes.canonicalize import _seeded
            op = frame.f_locals.get("self")
            if _seeded(op) and self._called_by_model(frame.f_back):
                self.drawn.append(f"{op} at {frame.f_back.f_code.co_filename}:{frame.f_back.f_lineno}")
            return
        if event == "c_call" and (id(arg) in _QUERY_IDS or (
                getattr(arg, "__name__", None) == "is_inference" and isinstance(getattr(arg, "__self__", None),
                                                                             torch.Tensor))) \
                and self._is_user(frame.f_code.co_filename):  # a query, or t.is_inference()
            name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", repr(arg))
            self.queried.append(f"torch.{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return
        if event == "c_call" and _is_random_source(arg) and self._called_by_model(frame):
            name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", repr(arg))
            self.drawn.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")

    def __enter__(self):
        self._previous = sys.gettrace(), sys.getprofile()
        sys.settrace(self._call)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous[0])
        sys.setprofile(self._previous[1])
        return False

    def refuse(self) -> None:
        if self.drawn:
            raise TraceError(
                f"forward draws random numbers ({self.drawn[0]}): a draw made while torch.fx traces is kept in the "
                "graph as a constant while the model draws anew at every call, so no certificate would hold (bcpc "
                "cannot tell a generator seeded afresh at every call from one that is not). Make forward "
                "deterministic (in eval mode); for fixed noise, draw it once in __init__ and keep it as a buffer.")
        if self.asked:
            raise TraceError(
                f"code called by forward asks whether torch.fx is tracing it (is_fx_tracing(), called at "
                f"{self.asked[0]}): the trace takes one branch and the model, run by you, the other, so the graph "
                "bcpc would certify is not the model. Remove the check, or make both branches compute the same.")
        if self.queried:
            raise TraceError(
                f"forward asks the process for a setting while torch.fx traces it ({self.queried[0]}): grad or "
                "inference mode, autocast, the thread count, determinism or an environment "
                "variable. The graph keeps the answer given at compile time, while the model answers anew at every "
                "call (certify and inference run under torch.no_grad(), training does not), so the graph bcpc "
                "would certify may not be the model. Decide it in __init__ and keep it as an attribute "
                "(self.fast = ...), or compute the same in every setting.")
        if self.caught:
            raise TraceError(
                f"the model's code raised and caught an exception while torch.fx traced it: {self.caught[0]}. bcpc "
                "refuses every TypeError, ValueError, RuntimeError or NotImplementedError caught in the model's code "
                "while it is traced: it cannot tell a fallback taken only because a call failed on a traced value "
                "(try: a NumPy or fused fast path, except: the torch path), which real tensors would not take, from "
                "your own logic, and with the first the graph bcpc certifies is not the model. Let forward take one "
                "path: decide it in __init__, or call the torch code directly.")


def _refuse_other_paths(rng: bytes, watch: "_PathWatch") -> None:
    """After tracing: refuse a trace that drew random numbers, caught an exception or asked whether
    it was being traced (each a way for the graph to be another function than the model)."""
    if _rng_states() != rng:
        raise TraceError(
            "forward drew random numbers while torch.fx traced it (torch.rand(1), np.random..., random.random() "
            "with no argument computed from the input run once, at trace time): the graph would keep that one draw "
            "while the model draws anew at every call, so no certificate would hold. Make forward deterministic "
            "(in eval mode), or draw outside the model.")
    watch.refuse()


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; the result shares parameters with it. Forward hooks are
    refused (:func:`_refuse_forward_hooks`), and so is an in-place change of a tensor the graph
    holds as a constant (:func:`_refuse_mutated_constants`). Attributes forward assigns are put
    back; those holding values computed from the input (activations kept on the module) are
    listed in ``gm.meta["bcpc_cached_attributes"]`` as ``(module name, attribute)`` pairs."""
    _refuse_torchscript(model)
    _refuse_forward_hooks(model)
    _refuse_tracing_checks(model)
    defaults = _forward_defaults(model)  # its refusals are the user's to read as they are, not fx failures
    tracer = _Tracer()
    _refuse_replaced_code(model, tracer)
    unchecked = _skip_dim_checks(model, tracer)
    before = _attributes(model)
    # (BatchNorm's own counter, which a traced-through BatchNorm subclass bumps in training mode:
    # it only weights the running statistics, which the training step owns)
    buffers = {name: (b, b.detach().clone()) for name, b in model.named_buffers(remove_duplicate=False)
               if not name.endswith("num_batches_tracked")}
    rng = _rng_states()
    try:
        tracer.state_taint = _StateTaint(model, tracer.from_parameters)
        with _PathWatch(model) as watch, tracer.state_taint:
            graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        _restore_dim_checks(unchecked)
        _undo_assignments(model, before)
        failed = _failing_module(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: the failure is in {failed}: "
            f"{type(exc).__name__}: {exc}. {_advice(exc)}"
        ) from exc
    _restore_dim_checks(unchecked)
    try:
        _refuse_other_paths(rng, watch)
    except TraceError:
        _undo_assignments(model, before)
        raise
    _drop_specialisation_checks(graph)
    if unchecked:
        names = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if any(m is u for u in unchecked)]
        mode = "training" if any(m.training for m in unchecked) else "eval"
        warnings.warn(
            f"BatchNorm subclasses with a forward of their own, {', '.join(names)}, are traced through, in {mode} "
            "mode: the graph keeps the branch of BatchNorm's forward that this mode takes (running statistics in "
            "eval mode) whatever the mode later, and a graph traced in eval mode does not update the running "
            "statistics when it trains. To train with batch statistics, use the built-in BatchNorm layer and "
            "put the extra computation in a module after it.", UserWarning, stacklevel=3)
    written = _undo_assignments(model, before)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    for (name, key), value in written.items():
        if key in ("_buffers", "_parameters"):  # forward assigned a buffer a traced value (self.prev = -self.prev)
            changed = sorted(k for k, v in value.items() if _holds_proxy(v))
            _refuse_changed_buffers(model, {f"{name}.{k}" if name else k: (None, None) for k in changed})
    _refuse_changed_buffers(model, buffers)
    if tracer.from_parameters:
        raise UnsupportedOpError(
            f"forward computes a tensor (or reads a number, .item(), .tolist()) from a parameter or buffer that "
            f"torch.fx does not see as one (at {tracer.from_parameters[0]}): one reached through self.parameters(), "
            "named_parameters(), buffers(), _parameters[...], _buffers[...], state_dict(), a view of one kept as a "
            "plain attribute (self.wt = self.fc.weight.T) or a container torch.fx does not follow. fx computes "
            "such a value once, at compile time, and the graph would keep it after the state changes (training, "
            "load_state_dict). Read the parameter or buffer as an attribute (self.aux.weight), which the graph "
            "follows.")
    _refuse_mutated_constants(tracer, graph)
    for (name, key), value in written.items():
        old = before[name].get(key)
        if isinstance(old, torch.Tensor) and id(old) in tracer.captured:
            raise UnsupportedOpError(
                f"forward reads the tensor attribute {key!r} of {name or 'the model'} and assigns it a new value "
                "(state carried from one call to the next): the graph would hold its value at compile time for "
                "ever, and each call of the model changes what it computes. Keep the value out of the model, or "
                "pass it as a constant (a buffer forward does not assign).")
    gm.meta["bcpc_cached_attributes"] = frozenset(written)
    return gm

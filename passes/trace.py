"""Trace: the user's nn.Module -> torch.fx GraphModule, with source lines recorded.

Built-in ``torch.nn`` modules stay leaves (``call_module``); user Module classes and
``nn.Sequential`` are traced through. A model torch.fx cannot trace (data-dependent control flow,
unsupported Python) raises :class:`~bcpc.errors.TraceError` naming the module whose ``forward``
failed, not a raw fx traceback.
"""
from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from bcpc.errors import TraceError


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


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or _builtin_with_new_constructor(type(m))


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
     "keep it a tensor op."),
    (("cannot be used as inputs to control flow",),
     "An if / while on a tensor value branches on the input, which one graph cannot hold. Write the "
     "choice as tensor ops: torch.where(cond, a, b), h.clamp(...), torch.maximum(a, b)."),
    (("cannot be iterated",),
     "A for loop over a tensor (for c in h.chunk(2, 1), for row in h) needs its length at trace time. "
     "Unpack into names (a, b = h.chunk(2, 1)) or index with a fixed range (parts = h.chunk(2, 1); "
     "sum(parts[i] for i in range(2)))."),
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


def _describe_hook(hook) -> str:
    fn = getattr(hook, "__func__", hook)
    code = getattr(fn, "__code__", None)
    name = getattr(fn, "__qualname__", type(hook).__name__)
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code is not None else name


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
                found.append(f"{kind} {_describe_hook(hook)} on {name or '<root>'!r} ({type(m).__name__})")
    for kind, hooks in (("global forward pre-hook", module_mod._global_forward_pre_hooks),
                        ("global forward hook", module_mod._global_forward_hooks)):
        found += [f"{kind} {_describe_hook(hook)} (torch.nn.modules.module.register_module_{kind.split()[1]}_"
                  f"{'pre_hook' if 'pre' in kind else 'hook'})" for hook in hooks.values()]
    if found:
        raise TraceError(
            f"the model has {', '.join(found)}. torch.fx traces forward() without hooks, so the compiled graph "
            "would not compute what model(x) computes wherever a hook changes a value, and no certificate would "
            "hold. Remove the hooks before bcpc.compile (keep the handle register_forward_hook returns and call "
            "handle.remove()), or move what they compute into the module's forward.")


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; the result shares parameters with it. Forward hooks are
    refused (:func:`_refuse_forward_hooks`)."""
    _refuse_forward_hooks(model)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        where = _failing_module(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: the failure is in {where}: "
            f"{type(exc).__name__}: {exc}. {_advice(exc)}"
        ) from exc
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)

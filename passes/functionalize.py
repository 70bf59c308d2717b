"""Functionalize: in-place ops become out-of-place ones, or compilation is refused.

torch.fx records ``h.relu_()`` as a node whose *result* nothing may use: the mutation of ``h``
is invisible to the graph, so later uses of ``h`` would read the unmutated value and dead-code
elimination would delete the op. This pass runs right after tracing and, for every node that
modifies one of its arguments in place,

* rewrites it into its out-of-place form (``Tensor.relu_`` -> ``Tensor.relu``, ``torch.relu_`` ->
  ``torch.relu``, ``F.relu(x, inplace=True)`` -> ``F.relu(x)``; an in-place module such as
  ``nn.ReLU(inplace=True)`` is already out-of-place after canonicalization), and
* redirects every later use of the mutated value to the rewritten node — including values that
  are *the same tensor object* as the mutated one (``g = h.contiguous()``, an earlier
  ``h.relu_()``'s result), found by running the graph once.

Mutation is detected two ways, and either is enough: the op is an in-place spelling (a method or
function whose name ends in ``_``, an ``inplace=True`` argument or module), or running it on the
example batch bumped an argument's version counter. What cannot be rewritten safely is refused
with :class:`~bcpc.errors.UnsupportedOpError`:

* a mutation of the model's input or of a parameter/buffer;
* a mutation of a tensor that shares memory with another value used after it (a view, its base,
  ``.data``, ``.detach()``): the other value would change too;
* ``out=`` arguments, ``copy_``/``fill_``/``zero_``/random fills, and any op that mutated an
  argument without an out-of-place form.

(``x[...] = v`` is refused earlier, by the tracer: fx cannot record item assignment.)
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from bcpc.errors import UnsupportedOpError
from bcpc.state import copy_module
from bcpc.meta import where

#: In-place methods whose out-of-place form is not "the same name without the underscore", or
#: that overwrite values without reading them: refused with the spelling to use instead.
_REFUSED_METHODS = {
    "copy_": "h = other.expand_as(h).to(h.dtype) (or use `other` directly)",
    "fill_": "torch.full_like(h, value)",
    "zero_": "torch.zeros_like(h)",
    "set_": "an out-of-place op",
    "resize_": "h.reshape(...)",
    "resize_as_": "h.reshape_as(other)",
    **{name: "an out-of-place op: a random fill does not depend on the input and makes the model random"
       for name in ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "cauchy_",
                    "log_normal_", "geometric_")},
}

_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.ipow: operator.pow,
    operator.imatmul: operator.matmul, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.imod: operator.mod, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift,
}


def _inplace_param_index(fn):
    """Position of a parameter named ``inplace`` in ``fn``'s signature, or None."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _out_of_place(gm: fx.GraphModule, node: fx.Node):
    """``(kind, rewrite)`` for an in-place spelling, where ``rewrite()`` turns the node into its
    out-of-place form; ``kind`` is None for an op that is not an in-place spelling. Raises for
    in-place spellings that have no safe rewrite."""
    if "out" in node.kwargs:
        if node.kwargs["out"] is not None:
            raise _refuse(node, "writes its result into an existing tensor (out=)", "Drop out= and use the returned value")
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}  # out=None: the default, as written
        # by the user or recorded by a wrapper (F.normalize)
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("__"):
            if name in _REFUSED_METHODS:
                raise _refuse(node, f"Tensor.{name} overwrites a tensor in place", f"Write {_REFUSED_METHODS[name]}")
            base = name[:-1]
            if not callable(getattr(torch.Tensor, base, None)):
                raise _refuse(node, f"Tensor.{name} modifies a tensor in place and has no out-of-place form bcpc knows",
                              "Write the out-of-place op and assign its result")

            def rewrite():
                node.target = base
            return "method", rewrite
        return None, None
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS:
            def rewrite():
                node.target = _INPLACE_OPERATORS[target]
            return "operator", rewrite
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):
            for ns in (torch, F, torch.special):
                if getattr(ns, name, None) is target and callable(getattr(ns, name[:-1], None)):
                    base = getattr(ns, name[:-1])

                    def rewrite(base=base):
                        node.target = base
                    return "function", rewrite
            if name.rstrip("_") in ("fill", "zero", "copy") or name in _REFUSED_METHODS:
                raise _refuse(node, f"{name} overwrites a tensor in place", "Write an out-of-place op")
        if node.kwargs.get("inplace") is True:
            def rewrite():
                node.kwargs = {**node.kwargs, "inplace": False}
            return "function", rewrite
        idx = _inplace_param_index(target)
        if idx is not None and idx < len(node.args) and node.args[idx] is True:
            def rewrite():
                args = list(node.args)
                args[idx] = False
                node.args = tuple(args)
            return "function", rewrite
        return None, None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False) is True:
            # the module's output is the mutated input; canonicalization maps the module to an
            # out-of-place op, so only the later uses of the input need redirecting
            return "module", lambda: None
    return None, None


def _refuse(node: fx.Node, why: str, fix: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"node '{node.name}' ({_describe(node)}) at {where(node)}: {why}. {fix}.")


def _describe(node: fx.Node) -> str:
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        spelling = fx.graph.inplace_methods[node.target.__name__]
        return "the augmented assignment " + spelling.format(*(getattr(a, "name", repr(a)) for a in node.args[:2]))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module {node.target!r}"
    mod = getattr(node.target, "__module__", None) or ""
    return f"{mod}.{getattr(node.target, '__name__', node.target)}".lstrip(".")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _storage(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, ...)
        return None


class _Run(fx.Interpreter):
    """Runs the graph once, keeping every value, and records which arguments each node mutated."""

    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)
        self.mutated: dict = {}  # node -> list of argument nodes whose version counter moved

    def run_node(self, n):
        args = [a for a in n.all_input_nodes if isinstance(self.env.get(a), torch.Tensor)]
        before = [(a, self.env[a]._version) for a in args]
        out = super().run_node(n)
        moved = [a for a, v in before if self.env[a]._version != v]
        if moved:
            self.mutated[n] = moved
        return out


def functionalize(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    """Rewrite every in-place op of ``gm`` out of place (see the module docstring)."""
    graph = gm.graph
    candidates = {}
    for node in graph.nodes:
        kind, rewrite = _out_of_place(gm, node)
        if kind is not None:
            candidates[node] = rewrite
    # One run on a copy (the model may mutate what it should not: refuse that, don't suffer it).
    run = _Run(copy_module(gm))
    example = torch.cat([example_input[:1], example_input[:1]], dim=0).clone()
    with torch.no_grad():
        try:
            run.run(example)
        except Exception:
            # the shapes pass reports a failing example run with its own message; without the
            # run only the static spellings are known, so refuse any in-place op
            if candidates:
                node = next(iter(candidates))
                raise _refuse(node, "modifies a tensor in place and the model could not be run on the example input",
                              "Write the out-of-place op") from None
            return gm
    copied = dict(zip(graph.nodes, run.module.graph.nodes))  # the copy's nodes, same order
    env = {n: run.env[copied[n]] for n in graph.nodes if copied[n] in run.env}
    # state updates of buffers read by get_attr (F.batch_norm's running statistics in training
    # mode) do not change any value of the graph; mutations of graph values do
    mutated = {n: [a for a in graph.nodes if copied[a] in run.mutated.get(copied[n], ()) and a.op != "get_attr"]
               for n in graph.nodes}

    order = {n: i for i, n in enumerate(graph.nodes)}
    protected = {}  # storage -> description of the input / parameter it belongs to
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            for t in _tensors(env.get(n)):
                protected.setdefault(_storage(t), "the model's input" if n.op == "placeholder" else f"'{n.target}'")
    for name, t in list(run.module.named_parameters()) + list(run.module.named_buffers()):
        protected.setdefault(_storage(t), f"'{name}'")

    for node in list(graph.nodes):
        targets = mutated.get(node, [])
        if node not in candidates and not targets:
            continue
        if node not in candidates:
            a = targets[0]
            raise _refuse(node, f"modifies its argument '{a.name}' in place",
                          "Write the out-of-place op and use its result")
        arg = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if arg is None:
            raise _refuse(node, "modifies a tensor in place", "Write the out-of-place op")
        for other in targets:
            if env.get(other) is not env.get(arg):
                raise _refuse(node, f"modifies its argument '{other.name}' in place",
                              "Write the out-of-place op and use its result")
        value = env.get(arg)
        if isinstance(value, torch.Tensor):
            what = protected.get(_storage(value))
            if what is not None:
                raise _refuse(node, f"modifies {what} in place (through '{arg.name}')",
                              "Compute a new tensor instead (h = h.op() on a copy); bcpc needs the input and the "
                              "weights unchanged by the forward pass")
            same = [m for m in graph.nodes if order[m] < order[node] and env.get(m) is value]
            views = [m for m in graph.nodes if order[m] < order[node] and m not in same
                     and any(_storage(t) == _storage(value) for t in _tensors(env.get(m)))]
            for m in views:
                later = [u for u in m.users if order[u] > order[node]]
                if later:
                    raise _refuse(
                        node, f"modifies '{arg.name}' in place, and '{m.name}' shares its memory (a view, its base, "
                        f".data or .detach()) and is used after the change by '{later[0].name}'",
                        "Write the out-of-place op (h = h.relu() rather than h.relu_()) so no other value changes")
        elif isinstance(value, (int, float, complex, bool, str, tuple, torch.Size, type(None))):
            same = []  # ``n += 1`` on an immutable value rebinds the name only: other names keep the old value
        else:
            same = [arg]
        candidates[node]()
        if node.op == "call_function" and node.kwargs.get("inplace") is False:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        for m in same:
            for user in list(m.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(m, node)
    graph.lint()
    gm.recompile()
    return gm

"""Resolve dtypes read at run time: ``x.to(self.weight.dtype)``, ``x.to(h.dtype)``,
``x.to(other)``, ``x.type_as(other)`` become casts to the dtype those expressions have in the
user's model, found by running the graph once on the example batch.

The dtype is fixed at compile time, as a literal ``x.to(torch.float32)`` would be, so the float64
copy that certifies a float32 model rounds exactly where the model itself does
(:func:`bcpc.ops.cast`: to the dtype of a float16 plain tensor attribute, say); reading it at run time in that copy
would give float64 and skip the rounding. Where the model casts a value to its own dtype
(``h.to(x.dtype)`` in a float32 model: nothing changes) the cast is dropped, so that the float64
copy does not round there either. A device read at run time (``x.to(h.device)``, the device half of ``x.to(other)`` and
of ``type_as``) stays read at run time: a device move changes no value, and the compiled module
must follow the model to another device.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from bcpc.errors import UnsupportedOpError
from bcpc.state import copy_module
from bcpc.meta import where

_CASTS = ("to", "type_as", "type")


def _reads_device(graph: fx.Graph, node: fx.Node, tensor: fx.Node) -> fx.Node:
    """A node giving ``tensor.device``, inserted before ``node``."""
    with graph.inserting_before(node):
        return graph.call_function(getattr, (tensor, "device"))


def resolve_dtypes(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    """Replace each dtype a cast reads at run time by its value in the model (module docstring)."""
    graph = gm.graph
    casts = [n for n in graph.nodes if n.op == "call_method" and n.target in _CASTS
             and any(isinstance(a, fx.Node) for a in list(n.args[1:]) + list(n.kwargs.values()))]
    if not casts:
        return gm
    run = fx.Interpreter(copy_module(gm), garbage_collect_values=False)
    example = torch.cat([example_input[:1], example_input[:1]], dim=0).clone()
    try:
        with torch.no_grad():
            run.run(example)
    except Exception:
        return gm  # the shapes pass reports a model that does not run on its example input
    copied = dict(zip(graph.nodes, run.module.graph.nodes))

    def value(a):
        return run.env.get(copied[a]) if isinstance(a, fx.Node) else a

    for node in casts:
        x, *rest = node.args
        own = getattr(value(x), "dtype", None)

        def fixed(dtype):
            """The dtype as a constant; None (no cast) where the model casts to the value's own dtype:
            that cast changes nothing in the model, and the float64 copy must not round there either."""
            return None if dtype == own else dtype

        if node.target == "type":
            if rest and isinstance(value(rest[0]), torch.dtype):
                node.target, node.args = "to", (x, fixed(value(rest[0])))
            continue
        if node.target == "type_as":
            (other,) = rest
            v = value(other)
            if not isinstance(v, torch.Tensor):
                raise UnsupportedOpError(f"node '{node.name}' (Tensor.type_as) at {where(node)}: its argument "
                                         f"'{getattr(other, 'name', other)}' is not a tensor. Give a tensor.")
            device = _reads_device(graph, node, other) if isinstance(other, fx.Node) else None
            node.target, node.args, node.kwargs = "to", (x, device, fixed(v.dtype)), {}
            continue
        args = [x]
        for a in rest:
            v = value(a)
            if isinstance(a, fx.Node) and isinstance(v, torch.Tensor):  # x.to(other): its device and dtype
                args += [_reads_device(graph, node, a), fixed(v.dtype)]
            elif isinstance(a, fx.Node) and isinstance(v, torch.dtype):
                args.append(fixed(v))
            else:
                args.append(a)
        kwargs = {k: (fixed(value(v)) if isinstance(value(v), torch.dtype) else v) for k, v in node.kwargs.items()}
        node.args, node.kwargs = tuple(args), kwargs
    # the dtype reads nothing uses any more (h.dtype, self.weight.dtype)
    for n in reversed(list(graph.nodes)):
        if (n.op == "call_function" and n.target in (getattr, operator.attrgetter) and not n.users
                and len(n.args) == 2 and n.args[1] == "dtype"):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return gm

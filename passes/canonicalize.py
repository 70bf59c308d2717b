"""Canonicalize: every spelling of an op becomes one canonical call (STYLE.md idiom 2).

``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()`` all become ``torch.relu(x)``;
``nn.Conv2d`` becomes ``F.conv2d(x, <get_attr weight>, <get_attr bias>, stride, padding, ...)``
with every static argument normalised; Dropout/Identity disappear. Module parameters become
``get_attr`` nodes so the compiled module reads the user's live parameters. Nodes no rule spells
(``x.size(0)``, shape arithmetic, ...) are left as they are; the lowering decides later whether
they are allowed (they are if they do not carry a perturbed tensor).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.fx as fx

from bcpc import registry
from bcpc.errors import BcpcError, UnsupportedOpError
from bcpc.meta import info, where


def _lookup(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return registry.spelling_for("module", type(module)), module
    if node.op == "call_function":
        return registry.spelling_for("function", node.target), None
    if node.op == "call_method":
        return registry.spelling_for("method", node.target), None
    return None, None


def _materialize(graph: fx.Graph, node: fx.Node, value):
    """Replace Attr markers by get_attr nodes on the called module."""
    if isinstance(value, registry.Attr):
        with warnings.catch_warnings():
            # flags such as "bn.training" are plain attributes, not parameters or buffers
            warnings.simplefilter("ignore", UserWarning)
            return graph.get_attr(f"{node.target}.{value.name}")
    if isinstance(value, tuple):
        return tuple(_materialize(graph, node, v) for v in value)
    if isinstance(value, list):
        return [_materialize(graph, node, v) for v in value]
    return value


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        info(node)  # every node gets its record, origin = its traced name
        hit, module = _lookup(gm, node)
        if hit is None:
            continue
        target, spelling = hit
        try:
            if spelling.adapter is None:
                args, kwargs = tuple(node.args), dict(node.kwargs)
            else:
                adapted = spelling.adapter(module, tuple(node.args), dict(node.kwargs))
                if adapted is None:  # this call is another op under the same name (x.max(dim)): left as is
                    continue
                args, kwargs = adapted
        except BcpcError as exc:
            info(node).spelling = registry.describe_spelling(spelling)
            raise UnsupportedOpError(f"node '{node.name}' ({info(node).spelling}) at {where(node)}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            info(node).spelling = registry.describe_spelling(spelling)
            computed = [a.name for a in node.all_input_nodes[1:]]
            hint = (f". The argument(s) {', '.join(repr(c) for c in computed)} are computed when forward runs (a "
                    "size read from a tensor's shape, such as h.size(1) // 2, say) where this op's rule needs a "
                    "number: write the number itself (a compiled module takes inputs of one shape)") if computed else ""
            raise UnsupportedOpError(
                f"node '{node.name}' ({info(node).spelling}) at {where(node)}: arguments not supported: {exc}{hint}"
            ) from exc
        info(node).spelling = registry.describe_spelling(spelling)
        if target is registry.IDENTITY:
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
            continue
        with graph.inserting_before(node):
            args = _materialize(graph, node, args)
            kwargs = {k: _materialize(graph, node, v) for k, v in kwargs.items()}
            new = graph.call_function(target, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        new.name = node.name  # keep the user's node names (the old node is gone, so it is free)
    _refuse_random(graph)
    graph.lint()
    gm.recompile()
    return gm


#: torch.nn.functional's random functions written in Python (no ATen op of their name); the
#: dropouts in eval mode (training=False) are gone by now, as the identity
_RANDOM_COMPOSITES = ("dropout", "gumbel_softmax", "rrelu")


@functools.lru_cache(maxsize=None)
def _draws_random(name: str) -> bool:
    """``name`` (a function's or method's, ``bernoulli_`` as ``bernoulli``) is an ATen op that
    torch tags as drawing from the random generator (``nondeterministic_seeded``), or one of F's
    random functions."""
    if any(word in name for word in _RANDOM_COMPOSITES):
        return True
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    packet = getattr(torch.ops.aten, name, None) if name and not name.startswith("__") else None
    return _seeded(packet)


def _seeded(op) -> bool:
    """An ATen overload packet or overload tagged ``nondeterministic_seeded``."""
    if isinstance(op, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in op.tags
    if isinstance(op, torch._ops.OpOverloadPacket):
        return any(torch.Tag.nondeterministic_seeded in getattr(op, o).tags for o in op.overloads())
    return False


def _refuse_random(graph: fx.Graph) -> None:
    """A random op left in the graph (``torch.bernoulli(p)``, ``h.new_ones(...).bernoulli(0.5)``,
    ``torch.normal``) is refused whatever its arguments: even one that does not depend on the input
    draws anew at every call, in the model and in the certifying module alike, so a certificate for
    one draw says nothing of the next (found by a new-user review: certified 3.5 on half the calls,
    where the model's margin at distance eps is -4.5 on half of its own). Dropout in eval mode is
    gone by now (the identity)."""
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name == "scaled_dot_product_attention":  # draws only with a dropout_p > 0
            p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
            if isinstance(p, (int, float)) and p == 0:
                continue  # what it computes is judged at analysis (a product of two inputs' values)
        if _seeded(node.target) or (isinstance(name, str) and _draws_random(name)):
            raise UnsupportedOpError(
                f"node '{node.name}' ({name}) at {where(node)} draws random numbers: the model computes another "
                "function at every call, so no certificate holds. Make forward deterministic in eval mode (dropout "
                "layers are; F.dropout(h, p, self.training) too), or draw outside the model.")

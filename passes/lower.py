"""Lower: the canonical graph -> one fx graph computing centre, ball and box of every node.

An ``fx``-level rewrite (STYLE.md idiom 3). For each perturbed node ``n`` with rule ``R`` the
emitted graph holds up to three readable nodes::

    n         = <canonical op>(<centres>)              # the clean value: the model's own arithmetic
    n_radius  = R.ball(<input bounds>, sigma=...)      # l2 radius (absent for method="ibp")
    n_bound   = R.box(n, n_radius, <input bounds>)     # Bound(centre, radius, lower, upper)

Nodes that do not depend on the input are copied unchanged (they read centres). Weight-dependent
Lipschitz constants come from one ``lip.<n>`` module per affine node (bcpc.lipcache), called with
the live weight and the ``sound`` flag. A convolution read only by a BatchNorm gets its box at the
BatchNorm, through the folded map (``conv_batch_norm_box``; its own Bound keeps the ball). The
graph ends with the margin solve at the last affine layer (bcpc.margins) and returns
``(logits, margins)``.

The emitted module's signature is ``forward(x, eps, y=None, sound=False)``; its ``.code`` is the
documentation of what it computes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from bcpc import domain, margins, registry, rounding
from bcpc.rules import affine
from bcpc.meta import info, where

METHODS = ("bcp", "ibp", "lipschitz")


@dataclass
class Lowered:
    graph_module: fx.GraphModule
    #: origin node name -> emitted node name of its Bound (perturbed nodes only)
    bound_nodes: dict = field(default_factory=dict)
    #: origin node name -> rule name
    rules: dict = field(default_factory=dict)
    #: origin node name -> (lip module name, weight's qualified name in the model or None)
    lipschitz: dict = field(default_factory=dict)
    #: values the model computes in forward without the input by an op that may round (a weight
    #: normalised there, a parametrized weight): the copy computes them in float64, so
    #: ``model_rounding`` refuses the model; "'origin' (op) at <source line>" descriptions
    weight_rounding: list = field(default_factory=list)


def _call(graph: fx.Graph, target, args, kwargs=None, *, name: str) -> fx.Node:
    return graph.create_node("call_function", target, tuple(args), dict(kwargs or {}), name=name)


def _flat_args(node: fx.Node) -> list:
    """Every argument of the node, nested tuples and lists flattened."""
    flat = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: flat.append(a) or a)
    return flat


def _floating(node: fx.Node) -> bool:
    rec = info(node)
    return rec.is_tensor and rec.dtype is not None and getattr(rec.dtype, "is_floating_point", False)


def _float_constants(node: fx.Node) -> bool:
    """Whether the node has constant arguments the model may hold in float32 where the float64 copy
    does not: Python floats (a clamp's bound, a pad value) or values that do not depend on the input
    (a tensor attribute, ``full_like(x, 0.1)``)."""
    flat = _flat_args(node)
    return any(isinstance(a, float) or (isinstance(a, int) and not isinstance(a, bool) and abs(a) > 2 ** 24)
               or (isinstance(a, fx.Node) and not info(a).perturbed) for a in flat)


#: ops that round nothing on values computed without the input: re-layouts, selections, copies and
#: metadata queries, as Tensor methods and torch functions (the rules' exact ops are read from
#: ``rounding.EXACT``)
_EXACT_NAMES = frozenset({
    "t", "contiguous", "clone", "detach", "view_as", "reshape_as", "expand_as", "index_select", "gather", "tile",
    "hstack", "vstack", "dstack", "column_stack", "zeros_like", "ones_like", "empty_like", "new_zeros", "new_ones",
    "new_empty", "size", "dim", "ndimension", "numel", "nelement", "get_device", "sort", "msort", "split",
    "tensor_split", "chunk", "unbind", "cummax", "cummin", "topk", "kthvalue", "aminmax", "max", "min", "median"})


def _rounds_in_forward(node: fx.Node, derived: set) -> bool:
    """Whether a node that does not depend on the input's values computes something from values that
    do not either (parameters, buffers, tensors made in forward: ``derived``) by an op that may give
    another result in the model's float32 than in the float64 certification copy: a weight normalised
    in forward, ``1 / self.std``, ``torch.linalg.eigh(w)[0]`` (a tuple), ``w > 0.1`` (the copy compares
    with 0.1, the model with its float32 rounding). bcpc.rounding does not bound that difference.
    Exact re-layouts, selections and metadata queries (``rounding.EXACT``, :data:`_EXACT_NAMES`, with
    no Python float argument) give the same in both; every module call may not (its parameters are
    applied in the model's dtype). Factories (``full_like(x, 0.1)``) read no such value: their float32
    rounding is counted where they are used."""
    if node.op == "call_module":
        return True
    rec = info(node)
    flat = _flat_args(node)
    if _floating(node) and (node.target in (torch.linspace, torch.logspace)
                     or (node.target is torch.arange and any(isinstance(a, float) for a in flat))):
        return True  # computed in the model's dtype by float arithmetic: not the rounding of the copy's values
    inputs = [n for n in node.all_input_nodes if n in derived]
    if not inputs:
        return False
    if any(isinstance(a, float) for a in flat):
        return True
    if rec.is_tensor and not _floating(node) and any(_floating(n) for n in inputs):
        # a cast to int or bool (or a comparison) of a value the copy holds in float64 and the model in
        # float32: full_like(x, 3 - 1e-9).long() is 2 in the copy, 3 in the model, and no longer a float
        # whose difference bcpc.rounding counts where it is used
        return True
    if node.op == "call_method":
        if node.target in _EXACT_NAMES:
            return False
    elif node.target in (getattr, len) or (getattr(node.target, "__name__", None) in _EXACT_NAMES
                                            and getattr(torch, node.target.__name__, None) is node.target):
        return False
    rule = registry.rule_for(node.target)
    if rule is None:  # a value that does not depend on the input keeps the user's spelling
        spelled = registry.spelling_for("method" if node.op == "call_method" else "function", node.target)
        if spelled is not None and spelled[0] is registry.IDENTITY:
            return False
        rule = registry.rule_for(spelled[0]) if spelled is not None else None
    return rule is None or rule.name not in rounding.EXACT


def _what(node: fx.Node) -> str:
    if info(node).spelling:
        return info(node).spelling
    if node.op == "call_module":
        owner, found, attr = str(node.target).partition(".parametrizations.")
        if found:  # a parametrized weight read in forward
            return f"the torch.nn.utils.parametrize parametrization of '{owner}.{attr}'"
        return f"module {node.target!r}"
    return f"Tensor.{node.target}" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _parametrized(model: nn.Module, target: str) -> bool:
    """Whether the attribute ``target`` of the model is computed by a parametrization
    (``torch.nn.utils.parametrizations.weight_norm``, ``orthogonal``, ...) when it is read."""
    owner, _, attr = target.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    return parametrize.is_parametrized(module, attr)


def _map(arg, env):
    return fx.node.map_arg(arg, lambda n: env[n])


def lower(gm: fx.GraphModule, analysis, *, method: str, norm: float, domain_bounds, model: nn.Module,
          lipschitz_iters: int = 1) -> Lowered:
    with_ball = method in ("bcp", "lipschitz")
    with_box = method in ("bcp", "ibp")
    graph = fx.Graph()
    center: dict = {}  # canonical node -> emitted node giving its plain / centre value
    bnd: dict = {}  # canonical perturbed node -> emitted node giving its Bound
    lip_modules = nn.Module()
    lowered = Lowered(graph_module=None)
    sound = None
    has_ball: dict = {}  # canonical perturbed node -> whether its Bound carries a radius
    folded_convs = set(analysis.folds.values())
    derived = set()  # nodes computed without the input: parameters, buffers and what forward makes of them

    for node in gm.graph.nodes:
        rec = info(node)
        if node.op == "placeholder":
            x = graph.placeholder(node.name)
            eps = graph.placeholder("eps")
            y = graph.placeholder("y", default_value=None)
            sound = graph.placeholder("sound", default_value=False)
            # the model's unit roundoff: its own rounding widens every Bound (bcpc.rounding; 0 = none)
            unit = graph.placeholder("rounding", default_value=0.0)
            center[node] = x
            has_ball[node] = True
            # ibp keeps the input ball too: the first affine layer reads its row norms from it
            # (the dual norm of each row for an l2 input).
            bnd[node] = _call(graph, domain.input_bound,
                              (x, eps, norm, domain_bounds[0], domain_bounds[1], True, with_box),
                              name=f"{node.name}_bound")
            lowered.bound_nodes[rec.origin] = bnd[node].name
            lowered.rules[rec.origin] = "input"
            continue
        if node.op == "output":
            logits = analysis.output

            def spec_bound(n):
                if with_ball or not has_ball.get(n, False):
                    return bnd[n]
                return _call(graph, domain.box_only, (bnd[n],), name=f"{n.name}_box")
            if analysis.last_affine is not None:
                p = analysis.last_affine.args[0]
                w = _map(analysis.last_affine.args[1], center)
                b = _map(analysis.last_affine.args[2], center) if len(analysis.last_affine.args) > 2 else None
                m = _call(graph, margins.last_layer_margins, (spec_bound(p), w, b, center[logits], y),
                          name="margins_exact")
                m = _call(graph, rounding.margins, (m, unit, spec_bound(p), w, b, center[logits], y), name="margins")
            else:
                m = _call(graph, margins.logit_margins, (spec_bound(logits), y), name="margins")
            graph.output((center[logits], m))
            continue
        if node.op == "get_attr":
            center[node] = graph.get_attr(f"model.{node.target}")
            derived.add(node)
            if _parametrized(model, node.target):
                lowered.weight_rounding.append(f"'{node.target}' (computed by its torch.nn.utils.parametrize "
                                               "parametrization at every access)")
            continue
        if not rec.perturbed:
            if _rounds_in_forward(node, derived):
                lowered.weight_rounding.append(f"'{rec.origin}' ({_what(node)}) at {where(node)}")
            if rec.is_tensor or any(n in derived for n in node.all_input_nodes):
                derived.add(node)  # a tensor, or a tuple / scalar computed from one (not x.size(0))
            new = graph.node_copy(node, lambda n: center[n])
            if node.op in ("call_module", "get_attr"):
                new.target = f"model.{node.target}"
            center[node] = new
            continue

        rule = registry.rule_for(node.target)
        c_args, c_kwargs = _map(node.args, center), _map(node.kwargs, center)
        b_env = {n: (bnd[n] if n in bnd else center[n]) for n in node.all_input_nodes}
        b_args, b_kwargs = _map(node.args, b_env), _map(node.kwargs, b_env)
        c = _call(graph, node.target, c_args, c_kwargs, name=node.name)
        center[node] = c
        radius = None
        # ibp drops the ball after its first use, except through pure re-layouts (flatten before
        # the first linear layer), which keep it for free.
        keep_ball = with_ball or (rule.family == "reshape" and all(has_ball.get(n, False) for n in node.all_input_nodes
                                                                   if info(n).perturbed))
        has_ball[node] = keep_ball
        if keep_ball:
            ball_kwargs = dict(b_kwargs)
            if rule.lipschitz is not None:
                module, w_index = rule.lipschitz(node.args, info(node.args[0]).shape[1:])
                module.n_iter = lipschitz_iters
                lip_name = node.name
                lip_modules.add_module(lip_name, module)
                sigma = graph.create_node("call_module", f"lip.{lip_name}", (center[node.args[w_index]], sound),
                                          name=f"{node.name}_sigma")
                ball_kwargs["sigma"] = sigma
                w_node = node.args[w_index]
                lowered.lipschitz[rec.origin] = (lip_name, w_node.target if w_node.op == "get_attr" else None)
            radius = _call(graph, rule.ball, b_args, ball_kwargs, name=f"{node.name}_radius")
        folded_bn = with_box and node in analysis.folds
        # the model's rounding is added after (exact ops too where the model rounds a Python constant)
        widened = not folded_bn and (rule.name not in rounding.EXACT or _float_constants(node))
        name = f"{node.name}_exact" if widened or folded_bn else f"{node.name}_bound"
        if with_box and node in folded_convs:
            # its box is formed at the BatchNorm that reads it, through the folded map
            out = _call(graph, affine.folded_conv_bound, (c, radius) + tuple(b_args), b_kwargs, name=name)
        elif folded_bn:
            conv = analysis.folds[node]
            conv_args = (bnd[conv.args[0]],) + tuple(_map(conv.args[1:], center)) + (center[conv],)
            out = _call(graph, affine.conv_batch_norm_box, (c, radius) + conv_args + tuple(b_args[1:]), b_kwargs,
                        name=name)
            out = _call(graph, rounding.batch_norm_after_conv, (out, unit) + conv_args + tuple(b_args[1:]), b_kwargs,
                        name=f"{node.name}_bound")
        elif with_box:
            out = _call(graph, rule.box, (c, radius) + tuple(b_args), b_kwargs, name=name)
        else:
            out = _call(graph, domain.ball_only, (c, radius), name=name)
        if widened:
            out = _call(graph, rounding.node, (out, unit, rule.name) + tuple(b_args), b_kwargs,
                        name=f"{node.name}_bound")
        bnd[node] = out
        lowered.bound_nodes[rec.origin] = out.name
        lowered.rules[rec.origin] = rule.name

    root = nn.Module()
    root.model = model
    root.lip = lip_modules
    emitted = fx.GraphModule(root, graph, class_name="CertifiedPropagation")
    emitted.model = model  # the live user model (GraphModule copies only what the graph names)
    emitted.graph.lint()
    lowered.graph_module = emitted
    return lowered

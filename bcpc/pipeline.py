"""The compiler pipeline: the one place that says which passes run, in which order.

    trace -> functionalize -> dtypes -> canonicalize -> shapes -> patterns (-> shapes) -> analyze -> verify -> lower

``verify`` (bcpc.guard) checks that the canonical graph computes the user's ``model(x)``.

Each pass is a plain function in ``passes/`` (one per module). With ``debug=True`` the graph
invariants are checked between passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bcpc.guard import verify_compiled
from bcpc.passes.analysis import Analysis, analyze
from bcpc.passes.canonicalize import canonicalize
from bcpc.passes.dtypes import resolve_dtypes
from bcpc.passes.functionalize import functionalize
from bcpc.passes.lower import Lowered, lower
from bcpc.passes.patterns import rewrite_patterns
from bcpc.passes.shapes import propagate_shapes
from bcpc.passes.trace import trace
from bcpc.rules import __all__ as RULE_FAMILIES  # importing the package fills the rule table

__all__ = ["Compiled", "RULE_FAMILIES", "run"]


@dataclass
class Compiled:
    canonical: torch.fx.GraphModule
    analysis: Analysis
    lowered: Lowered
    #: ``(module name, attribute)`` pairs forward assigns values computed from the input to
    #: (activations kept on the module): outputs of forward, not state it reads
    cached_attributes: frozenset = frozenset()


def _check(gm: torch.fx.GraphModule, debug: bool) -> None:
    if debug:
        gm.graph.lint()


def run(model: nn.Module, example_input: torch.Tensor, *, method: str, norm: float, input_domain,
        lipschitz_iters: int = 1, debug: bool = False) -> Compiled:
    gm = trace(model)
    cached = gm.meta["bcpc_cached_attributes"]
    _check(gm, debug)
    gm = functionalize(gm, example_input)
    _check(gm, debug)
    gm = resolve_dtypes(gm, example_input)
    _check(gm, debug)
    gm = canonicalize(gm)
    _check(gm, debug)
    gm = propagate_shapes(gm, example_input)
    _check(gm, debug)
    if rewrite_patterns(gm):  # rewrites that need the shapes; the new nodes need theirs
        gm = propagate_shapes(gm, example_input)
        _check(gm, debug)
    analysis = analyze(gm)
    _check(gm, debug)
    verify_compiled(gm, model, example_input, input_domain, cached)
    lowered = lower(gm, analysis, method=method, norm=norm, domain_bounds=input_domain, model=model,
                    lipschitz_iters=lipschitz_iters)
    _check(lowered.graph_module, debug)
    return Compiled(canonical=gm, analysis=analysis, lowered=lowered, cached_attributes=cached)

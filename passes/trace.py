"""Trace: the user's nn.Module -> torch.fx GraphModule, with source lines recorded.

Built-in ``torch.nn`` modules stay leaves (``call_module``); user Module classes and
``nn.Sequential`` are traced through. A model torch.fx cannot trace (data-dependent control flow,
unsupported Python) raises :class:`~bcpc.errors.TraceError` naming the module whose ``forward``
failed, not a raw fx traceback.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from bcpc.errors import TraceError


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True


def _failing_module(exc: BaseException) -> str:
    """Class and method of the innermost nn.Module frame in the traceback."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and not isinstance(owner, fx.GraphModule):
            code = tb.tb_frame.f_code
            found = f"{type(owner).__name__}.{code.co_name} ({code.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return found or "the model's forward"


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; the result shares parameters with it."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        where = _failing_module(exc)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: the failure is in {where}: "
            f"{type(exc).__name__}: {exc}. bcpc needs a model whose forward is a fixed graph of tensor ops: "
            "replace data-dependent Python control flow (if/for on tensor values) by tensor ops, "
            "or compile the traceable part of the model."
        ) from exc
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)

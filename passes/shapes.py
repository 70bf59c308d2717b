"""Shapes and perturbation: run the canonical graph once on an example batch of two.

Records in ``node.meta["bcpc"]`` each node's output shape and dtype, and whether it is
*perturbed*: it depends on the values of the input. Taint is conservative: every value computed
from a perturbed value is perturbed, whatever its type — tuples (``x.chunk(2, 1)``, ``x.max(1)``)
and their items, booleans (``h > 0``), integer tensors (``h.argmax(1)``) — except the results of
the ops in :data:`SHAPE_ONLY`, which read only the input's shape, dtype or device
(``x.size(0)``, ``x.shape``, ``torch.zeros_like(x)``). Only perturbed nodes need bound rules, and
the analysis refuses a perturbed node without one; everything else (weights, shape arithmetic,
constants) is computed plainly. The example batch has two samples so that an op that mixes the
batch dimension shows up in the shapes.

The run must not change the model: buffers (BatchNorm running statistics in training mode) are
restored afterwards.
"""
from __future__ import annotations

import contextlib
import io
import sys

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from bcpc.errors import GraphStructureError
from bcpc.meta import info, where


#: Ops whose result depends on their tensor argument's shape, dtype or device only, never on its
#: values: ``(op kind, target)``. Their other arguments still taint them (``x.new_full(s, h)``).
SHAPE_ONLY = frozenset(
    [("call_method", m) for m in ("size", "dim", "ndimension", "numel", "nelement", "get_device",
                                   "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "type")]
    + [("call_function", f) for f in (torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like,
                                      torch.full_like, len)]
)
#: ``getattr(x, name)`` on a perturbed tensor that reads metadata only.
SHAPE_ATTRIBUTES = frozenset(["shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"])


def _shape_only(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) >= 2 and node.args[1] in SHAPE_ATTRIBUTES
    if node.op == "call_method" and node.target == "type":
        return len(node.args) == 1 and not node.kwargs  # x.type() names the type; x.type(t) casts
    try:
        if (node.op, node.target) not in SHAPE_ONLY:
            return False
    except TypeError:
        return False
    # the first argument is read for its metadata only; any other perturbed argument taints
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return not _any_perturbed(rest)


def _any_perturbed(args) -> bool:
    found = []
    fx.node.map_arg(args, lambda n: found.append(info(n).perturbed))
    return any(found)


def _tensor_outputs(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    return tm if hasattr(tm, "shape") else None


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        names = ", ".join(n.name for n in placeholders)
        raise GraphStructureError(
            f"the model's forward takes {len(placeholders)} inputs ({names}); bcpc certifies models with exactly "
            "one tensor input. Wrap the model so that forward(x) takes the perturbed input only.")
    # first a batch of three, whose shapes are kept aside: a node whose shape depends on the batch size
    # other than in its first dimension (x.reshape(2, -1), x.new_ones(B, B)) is refused below
    # (a model that fails at three is refused after the analysis's own checks, which say more where
    # they apply: an einsum that indexes a constant by the batch letter)
    try:
        _run(gm, example_input, 3)
        at_three = {node: _tensor_outputs(node) for node in gm.graph.nodes}
        gm.meta.pop("bcpc_batch_of_three", None)
    except GraphStructureError as exc:
        at_three, gm.meta["bcpc_batch_of_three"] = {}, exc
    _run(gm, example_input, 2)
    for node in gm.graph.nodes:
        rec = info(node)
        tm = _tensor_outputs(node)
        rec.is_tensor = tm is not None
        if tm is not None:
            rec.shape, rec.dtype = tuple(tm.shape), tm.dtype
            three = at_three.get(node)
            rec.shape_at_three = tuple(three.shape) if three is not None else None
        if node.op == "placeholder":
            rec.perturbed = True
        elif node.op in ("call_function", "call_method", "call_module"):
            deps = node.all_input_nodes
            rec.perturbed = any(info(d).perturbed for d in deps) and not _shape_only(node)
    return gm


def refuse_batch_dependent_shapes(graph: fx.Graph) -> None:
    """Refuse a perturbed node whose shape is not (batch, ...) with the rest the same at both batch
    sizes: at batch 2 alone ``x.reshape(2, -1).flip(1).reshape(-1, 2)`` looks like a re-layout of each
    sample, at batch 4 it mixes pairs of samples (a new-user review's false certificate). Run by the
    analysis after the rules' own checks, which say more where they apply (``x[0]``)."""
    failed = graph.owning_module.meta.get("bcpc_batch_of_three") if graph.owning_module is not None else None
    if failed is not None:
        raise failed
    for node in graph.nodes:
        rec = info(node)
        if rec.perturbed and rec.is_tensor and not batch_first(node):
            raise GraphStructureError(
                f"node '{node.name}' (at {where(node)}) has shape {rec.shape} for a batch of two inputs and "
                f"{rec.shape_at_three} for a batch of three: its shape depends on the batch size other than in its "
                "first dimension (a reshape or view with a literal batch size, x.reshape(2, -1), or with the batch "
                "size in another place, x.view(-1, x.size(0)), a constant shaped (B, B)), so it mixes the samples "
                "of a batch, and no per-input certificate covers that. Keep the batch first and whole: "
                "x.view(x.size(0), -1), x.flatten(1).")


def batch_first(node: fx.Node) -> bool:
    """Whether the node's shape is (batch, ...) with the rest independent of the batch size, at the
    two batch sizes the shapes were run at."""
    rec = info(node)
    three = rec.shape_at_three
    return (rec.shape is not None and three is not None and len(rec.shape) == len(three) >= 1
            and rec.shape[0] == 2 and three[0] == 3 and rec.shape[1:] == three[1:])


def _run(gm: fx.GraphModule, example_input: torch.Tensor, batch: int) -> None:
    """Run the graph with ShapeProp on ``batch`` copies of the example input's first sample."""
    example = torch.cat([example_input[:1]] * batch, dim=0)
    saved = {k: v.detach().clone() for k, v in gm.named_buffers()}
    try:
        # ShapeProp prints the model's traceback itself before re-raising: keep it for the
        # failure message below, and let a successful run's output (warnings) through
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()) as printed:
            ShapeProp(gm).propagate(example)
        sys.stderr.write(printed.getvalue())
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None:  # ShapeProp wraps the model's own error with node metadata
            cause = cause.__cause__
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise GraphStructureError(
            f"running the model on a batch of {'two' if batch == 2 else 'three'} copies of the example input's "
            "first sample (shape "
            f"{tuple(example_input.shape[1:])} per sample) failed: {type(cause).__name__}: {first}. Pass an "
            "example_input / input_shape the model accepts; a model that runs at one batch size only mixes the "
            "samples of a batch (a reshape or a product across the batch), which no per-input certificate covers."
        ) from exc
    finally:
        with torch.no_grad():
            for k, v in gm.named_buffers():
                # only what the run changed (BatchNorm's running statistics in training mode): a
                # constant that is an expanded view (self.c.expand(8)) cannot be written into
                if k in saved and not torch.equal(v, saved[k]):
                    v.copy_(saved[k])

"""Shapes and perturbation: run the canonical graph once on an example batch of two.

Records in ``node.meta["bcpc"]`` each node's output shape and dtype, and whether it is
*perturbed*: a floating tensor that depends on the input. Only perturbed nodes need bound rules;
everything else (weights, shape arithmetic, constants) is computed plainly. The example batch has
two samples so that an op that mixes the batch dimension shows up in the shapes.

The run must not change the model: buffers (BatchNorm running statistics in training mode) are
restored afterwards.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from bcpc.errors import GraphStructureError
from bcpc.meta import info


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
    example = torch.cat([example_input[:1], example_input[:1]], dim=0)
    saved = {k: v.detach().clone() for k, v in gm.named_buffers()}
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:
        raise GraphStructureError(
            f"running the model on the example input (shape {tuple(example_input.shape[1:])} per sample) failed: "
            f"{type(exc).__name__}: {exc}. Pass an example_input / input_shape the model accepts."
        ) from exc
    finally:
        with torch.no_grad():
            for k, v in gm.named_buffers():
                if k in saved:
                    v.copy_(saved[k])
    for node in gm.graph.nodes:
        rec = info(node)
        tm = _tensor_outputs(node)
        rec.is_tensor = tm is not None
        if tm is not None:
            rec.shape, rec.dtype = tuple(tm.shape), tm.dtype
        if node.op == "placeholder":
            rec.perturbed = True
        elif node.op in ("call_function", "call_method", "call_module"):
            deps = node.all_input_nodes
            rec.perturbed = bool(tm is not None and tm.dtype.is_floating_point and any(info(d).perturbed for d in deps))
    return gm

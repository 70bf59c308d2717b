"""Typed per-node records written by the passes under ``node.meta["bcpc"]``.

torch's own keys (``tensor_meta``, ``stack_trace``) are only read, never written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import os

import torch

import torch.fx as fx


@dataclass
class NodeInfo:
    origin: str  # name of the node in the user's traced graph this one came from
    spelling: str = ""  # how the user wrote the op (e.g. "torch.nn.Conv2d"), "" if unchanged
    perturbed: bool = False  # a floating tensor that depends on the perturbed input
    shape: Optional[tuple] = None  # output shape on the example batch (batch size 2)
    shape_at_three: Optional[tuple] = None  # output shape on a batch of 3 (passes/shapes.py compares the two)
    dtype: Optional[object] = None
    is_tensor: bool = False
    residual_merge: bool = False  # add/sub/cat of two perturbed values
    last_affine: bool = False  # the affine layer whose input the margins are read at
    extra: dict = field(default_factory=dict)


def info(node: fx.Node) -> NodeInfo:
    """The node's record, created on first access."""
    rec = node.meta.get("bcpc")
    if rec is None:
        rec = NodeInfo(origin=node.name)
        node.meta["bcpc"] = rec
    return rec


def where(node: fx.Node) -> str:
    """The user's source line this node came from (from torch.fx's recorded stack trace).

    fx records frames outermost first, ending inside torch itself; the innermost frame outside
    the torch and bcpc packages is the user's line.
    """
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    found = None
    for i, line in enumerate(lines):
        if not line.startswith("File "):
            continue
        path = line.split('"')[1] if '"' in line else ""
        if any(path.startswith(root) for root in _LIBRARY_ROOTS):
            continue
        code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
        found = f"{line}: {code}" if code else line
    return found or _module_path(node) or "<source unknown>"


def _module_path(node: fx.Node) -> str:
    """``module 'features.0.2' (torch.nn.ReLU6)``: the innermost module the node was traced in
    (``nn.Sequential`` and other torch containers leave no source line of the user's)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    cls_name = getattr(cls, "__qualname__", str(cls))
    mod = getattr(cls, "__module__", "") or ""
    described = f"torch.nn.{cls_name}" if mod.startswith("torch.nn") else f"{mod}.{cls_name}"
    return f"module '{path}' ({described})"


# torch's frames and bcpc's own (bcpc.nn.GroupSort's forward): the user's line is the call site
# (``bcpc.passes`` and ``bcpc.rules`` live beside ``bcpc/`` in a source checkout, inside it once installed)
_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_ROOTS = (os.path.dirname(torch.__file__) + os.sep, _HERE + os.sep,
                  *(os.path.join(os.path.dirname(_HERE), sub) + os.sep for sub in ("passes", "rules")))

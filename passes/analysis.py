"""Analysis: graph structure questions answered on a networkx view of the canonical graph.

* drops nodes the output does not depend on (dead code);
* checks every perturbed node has a rule and passes that rule's compile-time check, raising
  :class:`~bcpc.errors.UnsupportedOpError` naming the node, the op, the user's source line, the
  supported ops, and how to add a rule;
* marks residual merges (sums/concatenations of two perturbed values) and the *last affine
  layer*: the ``linear`` node producing the logits, whose input is where the exact ball ∩ box
  margin problem is solved (DESIGN.md §3). Without one the margins are read at the logits;
* pairs every convolution whose only use is a BatchNorm with that BatchNorm (``folds``): the
  lowering computes the pair's box once, through the folded per-channel map (bcpc.rules.affine
  ``conv_batch_norm_box``), instead of a box after each.

networkx is a read-only view here; the fx graph stays the source of truth.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from bcpc import ops, registry
from bcpc.errors import GraphStructureError, UnsupportedOpError
from bcpc.meta import info, where
from bcpc.passes.patterns import einsum_broadcast_letter, einsum_subscripts
from bcpc.passes.shapes import batch_first, refuse_batch_dependent_shapes
from bcpc.rules._util import check_same_shape_as_perturbed, unsupported


@dataclass
class Analysis:
    output: fx.Node  # the logits node
    last_affine: Optional[fx.Node]
    residual_merges: list = field(default_factory=list)
    dag: Optional[nx.DiGraph] = None
    #: BatchNorm node -> the convolution node it normalises (the convolution has no other use)
    folds: dict = field(default_factory=dict)


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """DiGraph with one vertex per fx node name and an edge per data dependency."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    mod = (getattr(node.target, "__module__", None) or "").replace("_operator", "operator")
    return mod + "." + getattr(node.target, "__name__", str(node.target))


_STEP_NAMES = frozenset(["gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal",
                         "sign", "signbit", "heaviside", "argmax", "argmin", "round", "floor", "ceil", "trunc",
                         "bool", "long", "int", "short", "byte", "logical_not", "logical_and", "logical_or",
                         "isnan", "isinf", "isfinite", "nonzero", "where", "masked_fill", "item", "tolist"])
_TUPLE_NAMES = frozenset(["chunk", "split", "tensor_split", "unbind", "max", "min", "sort", "topk", "kthvalue",
                          "median", "mode", "aminmax", "cummax", "cummin", "var_mean", "std_mean", "unique",
                          "getitem"])


_REDUCTION_NAMES = frozenset(["sum", "mean", "max", "min", "amax", "amin", "prod", "norm", "logsumexp", "std", "var"])


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", "")


_NORMALIZERS = frozenset(["layer_norm", "group_norm", "instance_norm", "normalize", "rms_norm", "local_response_norm",
                          "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm",
                          "LocalResponseNorm"])
_SOFTMAX = frozenset(["softmax", "log_softmax", "Softmax", "LogSoftmax", "Softmax2d", "softmin", "Softmin"])
_PRODUCTS = frozenset(["matmul", "bmm", "einsum", "baddbmm", "scaled_dot_product_attention", "MultiheadAttention",
                       "TransformerEncoderLayer", "TransformerDecoderLayer", "Transformer", "TransformerEncoder",
                       "bilinear", "Bilinear", "outer", "mm", "dot", "__matmul__"])


def _known_refusal(name: str) -> str:
    if name in _NORMALIZERS:
        return (" Per-sample normalisation (LayerNorm, GroupNorm, InstanceNorm, F.normalize) divides by a statistic "
                "of the input, which is not Lipschitz: near zero variance a tiny change of the input moves the "
                "output arbitrarily far, so no sound global bound exists. Use BatchNorm (an affine map in eval mode), "
                "or remove the normalisation.")
    if name in _SOFTMAX:
        return (" Return the logits: certification is about the margin between the predicted logit and the others, "
                "and softmax / log_softmax do not change which class is predicted. Drop the final softmax (compile "
                "the model without it) and apply it outside if you need probabilities.")
    if name in _PRODUCTS:
        return (" A product of two values that both depend on the input (attention scores, bilinear forms) has no "
                "rule: its Lipschitz constant grows with the input's size. Certify a model whose products have one "
                "constant factor (weights).")
    return ""


def _has_constant_operand(node: fx.Node) -> bool:
    """A two-operand product one of whose operands does not depend on the input."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(node.args) >= 2 and (len(operands) < 2 or any(not info(a).perturbed for a in operands))


def _einsum_has_constant_operand(node: fx.Node) -> bool:
    """``torch.einsum(eq, a, b)`` or ``torch.einsum(eq, [a, b])``: an operand does not depend on the input."""
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return len(operands) >= 2 and any(not (isinstance(a, fx.Node) and info(a).perturbed) for a in operands)


def _einsum_reason(node: fx.Node) -> str:
    """Which condition of the einsum lowering (passes/patterns.py) this einsum misses, in words."""
    eq = node.args[0] if isinstance(node.args[0], str) else ""
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if "." in eq:
        return "'...' is not lowered: name every dimension with a letter"
    ins, out = einsum_subscripts(eq)
    if len(operands) != 2 or len(ins) != 2:
        return "it has more than two operands: combine the constants first, then one einsum with the input"
    if any(len(set(t)) != len(t) for t in ins + [out]):
        return "a letter repeats in an operand (a diagonal), which has no rule"
    i = next(k for k, a in enumerate(operands) if isinstance(a, fx.Node) and info(a).perturbed)
    hl, cl = ins[i], ins[1 - i]
    if not hl or not out or hl[0] != out[0]:
        return f"the batch letter ({hl[:1] or '?'}) must be the first letter of the perturbed operand and of the output"
    if hl[0] in cl:
        return f"the constant is indexed by the batch letter {hl[0]}"
    shape, c_shape = tuple(info(operands[i]).shape or ()), tuple(info(operands[1 - i]).shape or ())
    ch = einsum_broadcast_letter(hl, shape, cl, c_shape)
    if ch is not None:
        return (f"letter {ch} has size {shape[hl.index(ch)]} in the perturbed operand and {c_shape[cl.index(ch)]} "
                "in the constant: einsum broadcasts it, the lowering does not (expand the operand first)")
    shared = [ch for ch in hl if ch in cl]
    if any(ch in out for ch in shared) and any(ch not in out for ch in shared):
        return ("a letter of both operands is kept in the output while another is summed (a batched, "
                "block-diagonal product), which has no rule")
    if any(ch in out for ch in shared):
        summed = "".join(ch for ch in hl + cl if ch not in out)
        return f"a letter of both operands is kept in the output, and then nothing may be summed (this sums {summed})"
    return ""


def _hint(node: fx.Node, module=None) -> str:
    """Why a perturbed node of this kind cannot be held constant, and what to write instead."""
    name = type(module).__name__ if module is not None else _op_name(node)
    if name == "einsum" and module is None and _einsum_has_constant_operand(node):
        return (" An einsum with one constant operand is a linear map, and bcpc lowers it to F.linear when the "
                "batch letter leads the perturbed operand and the output and does not index the constant, no "
                "letter is in both operands and the output, no letter repeats in an operand, there are two operands "
                "and no '...' (e.g. 'bchw,dc->bdhw'), and to a product h * C when nothing is summed and a letter is "
                "shared ('bi,i->bi', 'bi,ij->bij'), where a dimension of the perturbed operand "
                "has the constant's size (einsum's broadcast of a size-1 dimension is not lowered: expand it "
                "first). Here " + (_einsum_reason(node) or "it is of neither form") + ": write it so, or as "
                "h @ W, F.linear(h, W.t()) or an nn.Linear.")
    if name == "einsum" and module is None and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
        return (" A one-operand einsum (a permutation, a sum, a diagonal) has no rule: write it with permute, "
                "sum or indexing, which have rules (a diagonal is not supported).")
    if name in ("matmul", "__matmul__", "mm", "bmm", "tensordot") and module is None and _has_constant_operand(node):
        return (" A product with a constant factor is an affine map, and bcpc bounds h @ W (and W @ h) with a "
                "constant 2-D W (h of any rank, batch first) with W's guaranteed norm; this form has no rule: "
                "write h @ W, F.linear(h, W.t()) or an nn.Linear.")
    known = _known_refusal(name)
    if known:
        return known
    if name in ("round", "floor", "ceil", "trunc", "int", "long", "short", "byte", "bool", "item", "tolist"):
        return (" It rounds a value that depends on the input or makes an integer of it: a step function, which "
                "changes inside the perturbation set and has no Lipschitz bound. Remove it, or apply it outside "
                "the certified model.")
    if name in ("max", "min", "sort", "argsort", "argmax", "argmin") and not info(node).is_tensor:
        return (" Its indices (item 1, .indices) are integers that change inside the perturbation set; only the "
                "values (item 0, .values) have a rule: h.max(1)[0], h.amax(1), h.sort(1)[0].")
    if name in ("topk", "kthvalue", "median", "mode"):
        return (f" {name} has no rule; the sorted values have one: h.sort(dim, descending=True)[0].narrow(dim, 0, k) "
                "gives the top k.")
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in ("T", "mT", "H", "mH"):
        return " Write the transpose explicitly: h.transpose(-2, -1) (the batch dimension must stay first)."
    if name in _STEP_NAMES:
        return (" It compares or rounds a value that depends on the input (or makes an integer/boolean of it): the "
                "result changes inside the perturbation set, so it cannot be treated as a constant mask. Write the "
                "activation itself (torch.relu(h) rather than h * (h > 0)).")
    if name in _REDUCTION_NAMES and info(node).shape is not None and len(info(node).shape) <= 1:
        return (" It reduces over every element, the batch included, so samples mix; give the dims, e.g. "
                "h.sum(dim=1), h.mean(dim=(2, 3)), h.amax(dim=1).")
    if name in _TUPLE_NAMES or not info(node).is_tensor:
        return (" Its result (a tuple, a number or an item of one) is computed from the perturbed input, so every "
                "value read from it is perturbed too and needs a rule.")
    return ""


def unsupported_node(gm: fx.GraphModule, node: fx.Node) -> UnsupportedOpError:
    what, module = _describe(node), None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        cls = type(module)
        path = f"torch.nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else f"{cls.__module__}.{cls.__qualname__}"
        what = f"{path} (module {node.target!r})"
    ops = ", ".join(registry.supported_ops())
    return UnsupportedOpError(
        f"node '{node.name}' calls {what}, which has no bound rule (at {where(node)}).{_hint(node, module)} "
        f"Supported ops: {ops}. To support it, add a rule with bcpc.registry.register(...) in a module "
        "under rules/ (see docs/adding-a-rule.md), or rewrite this line with supported ops."
    )


def analyze(gm: fx.GraphModule) -> Analysis:
    graph = gm.graph
    graph.eliminate_dead_code()
    gm.recompile()
    (out_node,) = [n for n in graph.nodes if n.op == "output"]
    result = out_node.args[0]
    if not isinstance(result, fx.Node) or not info(result).perturbed:
        raise GraphStructureError(
            "the model must return one tensor of logits that depends on its input; it returns "
            f"{type(result).__name__ if not isinstance(result, fx.Node) else 'a value that does not depend on the input'}. "
            "Wrap it so that forward(x) returns the logits tensor only.")
    if len(info(result).shape) != 2:
        raise GraphStructureError(
            f"the model's output has shape {info(result).shape} on a batch of 2; bcpc expects logits of shape "
            "(batch, classes). Flatten or select the logits in the model.")

    dag = to_networkx(gm)
    if not nx.is_directed_acyclic_graph(dag):  # cannot happen for fx graphs; guard the view
        raise GraphStructureError("traced graph is not acyclic")
    merges = []
    for node in graph.nodes:
        rec = info(node)
        if not rec.perturbed or node.op == "placeholder":
            continue
        rule = registry.rule_for(node.target) if node.op == "call_function" else None
        if rule is None:
            raise unsupported_node(gm, node)
        if rule.check is not None:
            rule.check(node)
        if rule.family in _ONE_TO_ONE:
            check_same_shape_as_perturbed(node)
        if rule.family == "merge" and sum(info(a).perturbed for a in node.all_input_nodes) >= 2:
            rec.residual_merge = True
            merges.append(node)

    refuse_batch_dependent_shapes(graph)
    _refuse_batch_values(graph)
    _refuse_narrow_arithmetic(graph)
    last = None
    folds = {n: n.args[0] for n in graph.nodes if _folds_into(n)}
    if result.target is F.linear and info(result.args[0]).perturbed:
        last = result
        info(last).last_affine = True
    return Analysis(output=result, last_affine=last, residual_merges=merges, dag=dag, folds=folds)


#: Rule families whose ball and box rules map each input coordinate to the output coordinate at the
#: same place (radius unchanged or times a slope): an operand broadcast to a larger shape would copy
#: coordinates and multiply their l2 movement unseen (a clamp with a (4, n) tensor bound on a
#: (B, 1, n) input certified a false margin; found by a new-user review). Checked for every rule of
#: these families, whatever its own check does.
_ONE_TO_ONE = frozenset(["monotone", "activation", "unimodal"])

#: Rules whose result is one of their inputs' values (or a sign change of one), so that running
#: them in a less precise dtype rounds nothing.
_EXACT_IN_ANY_DTYPE = frozenset(["relu", "abs", "neg", "cat", "stack", "flatten", "reshape", "max_pool2d", "amax",
                                 "amin", "group_sort", "maximum", "minimum", "expand", "flip", "getitem",
                                 "movedim", "narrow", "permute", "repeat", "roll", "select", "squeeze",
                                 "transpose", "unsqueeze"])


#: ops whose arguments after the tensor (or all of them, for the factories) are a size: the batch
#: size may go there (``h.view(x.size(0), -1)``, ``h.new_zeros(B, 3)``, ``c.expand(B, -1)``) and
#: shapes a tensor without entering its values. ``new_full`` / ``full``: the size argument only.
_SIZE_AFTER_TENSOR = frozenset(["reshape", "view", "expand", "broadcast_to", "new_zeros", "new_ones", "new_empty"])
_SIZE_ONLY_FACTORIES = frozenset(["zeros", "ones", "empty"])
#: ``repeat`` / ``tile`` / ``repeat_interleave``: a size where they copy one row (a constant of leading size 1)
_REPEATS = frozenset(["repeat", "tile", "repeat_interleave"])
#: tensors shaped like the input, every row the same: ``torch.zeros_like(x)``, ``x.new_zeros(B, 3)``
_LIKE = frozenset(["zeros_like", "ones_like", "empty_like", "full_like"])
#: ops that compute each entry from the entries at the same place (and Python numbers): on tensors
#: whose rows are all the same, rows that are all the same
_ELEMENTWISE = frozenset([
    "add", "sub", "mul", "truediv", "div", "neg", "abs", "clamp", "clip", "where", "maximum", "minimum", "to",
    "type", "float", "double", "half", "bfloat16", "contiguous", "clone", "detach", "pow", "exp", "log", "sqrt",
    "rsqrt", "relu", "sigmoid", "tanh", "sign", "eq", "ne", "lt", "gt", "le", "ge", "logical_and", "logical_or",
    "logical_not", "bool", "long", "int", "masked_fill", "mod", "floordiv", "floor_divide", "reciprocal", "cast"])


#: re-layouts that move no entry across the first dimension when their result is (batch, ...) at both
#: batch sizes the shapes were run at (``passes.shapes.batch_first``): rows stay rows
_ROW_LAYOUT = frozenset(["cat", "stack", "unsqueeze", "squeeze", "view", "reshape", "flatten", "unflatten", "expand",
                         "broadcast_to", "getitem", "transpose", "permute", "movedim", "narrow", "split", "chunk"])


def _size_arguments(node: fx.Node) -> Optional[list]:
    """The arguments of ``node`` that give a size (None: the op takes no size)."""
    name = _op_name(node)
    if name in _SIZE_AFTER_TENSOR:
        return list(node.args[1:]) + [node.kwargs.get("size"), node.kwargs.get("shape")]
    if name in _SIZE_ONLY_FACTORIES and node.op == "call_function":
        return list(node.args) + [node.kwargs.get("size")]
    if name in ("new_full", "full"):
        first = 1 if name == "new_full" else 0
        return list(node.args[first:first + 1]) + [node.kwargs.get("size")]
    if name == "unflatten":
        return list(node.args[2:3]) + [node.kwargs.get("sizes")]
    if name in _REPEATS and node.args and isinstance(node.args[0], fx.Node) and not info(node.args[0]).perturbed:
        shape = info(node.args[0]).shape or ()
        if len(shape) == 0 or shape[0] == 1 or (name != "repeat_interleave" and len(node.args) - 1 > len(shape)):
            return list(node.args[1:]) + [node.kwargs.get("repeats"), node.kwargs.get("dims")]
    return None


def _batch_size_read(node: fx.Node, batch: dict):
    """Whether the node reads the batch size of a tensor that has one (the input and what is computed
    from it, and constants shaped with it: ``torch.zeros_like(x)``): ``"size"`` (``x.size(0)``: the
    batch size itself), ``"scalar"`` (``x.numel()``), a tuple of flags, one per entry, True where it is the batch size (``x.shape``,
    ``x.size()``), or None."""
    tensor = node.args[0] if node.args else None
    if not isinstance(tensor, fx.Node) or not (info(tensor).perturbed or batch.get(tensor) == "rows"):
        return None
    shape = info(tensor).shape
    if not shape or shape[0] != 2:  # shapes are of a batch of 2: a tensor without the batch dim (x[0]) has none
        return None
    rank = len(shape)
    name = _op_name(node)
    if node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",):
        return (True,) + (False,) * (rank - 1)
    if name == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None:
            return (True,) + (False,) * (rank - 1)
        return "size" if isinstance(dim, int) and rank and dim % rank == 0 else None
    if name in ("numel", "nelement") or (node.op == "call_function" and node.target is len):
        return "scalar"
    return None


def _refuse_batch_values(graph: fx.Graph) -> None:
    """Refuse a value computed from the batch size (``h * x.size(0)``, ``h / x.numel()``,
    ``torch.arange(B)``, ``torch.ones_like(x).sum()``) that reaches the model's values: the output
    for one input then depends on how many inputs share its batch, and a certificate computed in one
    batch does not hold for the input alone (two new-user reviews' false certificates, from
    ``cap = 3.3 * x.shape[0]`` to ``x.new_zeros(B, 4).shape[0]``). The batch size may shape tensors
    (the size arguments of view, reshape, expand, new_zeros, ...), whose rows are then all the same
    (``"rows"``): elementwise arithmetic keeps them so, and the input's values may meet them; any
    other op on them (a sum, a scan, a read of their shape) gives a batch value."""
    # node -> "size" (the batch size itself), "scalar" (a value computed from it), "rows" or a tuple of flags
    batch: dict = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        read = _batch_size_read(node, batch)
        if read is not None:
            batch[node] = read
            continue
        name = _op_name(node)
        if name in _LIKE and node.args and isinstance(node.args[0], fx.Node) and info(node.args[0]).perturbed \
                and batch_first(node) and not any(a in batch for a in node.all_input_nodes):
            batch[node] = "rows"
            continue
        found = [a for a in node.all_input_nodes if a in batch]
        if not found:
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in batch \
                and isinstance(batch[node.args[0]], tuple):
            flags, index = batch[node.args[0]], node.args[1]
            if isinstance(index, int) and -len(flags) <= index < len(flags):
                if flags[index]:
                    batch[node] = "size"
                continue
            if isinstance(index, slice) and not any(isinstance(v, fx.Node) for v in (index.start, index.stop, index.step)):
                picked = flags[index]
                if any(picked):
                    batch[node] = picked
                continue
        sizes = _size_arguments(node)
        values = found
        if sizes is not None:
            in_sizes = []
            fx.node.map_arg(sizes, in_sizes.append)
            # the batch size itself, or a shape holding it, may size a tensor; a value computed from it may
            # not: B - 2 * (B // 4) is B at 2 and 3, where the shapes are run, and 2 at 4 (a review's false
            # certificate through reshapes of a tensor with equal rows)
            values = [a for a in found if a not in in_sizes or not (batch[a] == "size" or isinstance(batch[a], tuple))]
            if not values:  # the batch size shapes a tensor, no value
                if not info(node).perturbed and info(node).is_tensor:
                    # (batch, ...) with equal rows; the batch size elsewhere in the shape (x.new_ones(B, B)) is a value
                    batch[node] = "rows" if batch_first(node) else "scalar"
                continue
        if node.op != "output" and values and all(batch[a] == "rows" for a in values):
            if info(node).perturbed:
                continue  # the input's values meet a tensor whose rows are all the same
            if name in _ELEMENTWISE or (name in _ROW_LAYOUT and batch_first(node)):
                batch[node] = "rows"
                continue
        if node.op == "output" or info(node).perturbed:
            source = values[0]
            raise UnsupportedOpError(
                f"node '{node.name}' (at {where(node)}) computes with the batch size (node '{source.name}', from "
                "x.size(0), x.shape[0], x.numel() or a tensor shaped with them): the model's output for an input "
                "then depends on how many inputs share its batch, so a certificate computed in one batch does not "
                "hold for the same input in another. Use the batch size only to shape tensors (h.view(x.size(0), "
                "-1), h.new_zeros(B, n)); for the size of one sample, read x.shape[1:] (x.shape[1:].numel()).")
        batch[node] = "scalar"


def _refuse_narrow_arithmetic(graph: fx.Graph) -> None:
    """Between ``h.half()`` and the cast back, the model computes in float16: every op rounds its
    result to float16, which the certification copy (which keeps its working dtype, bcpc.ops.cast,
    and rounds once at the cast) does not model. Ops that only move or select values round
    nothing and pass; any other op on a value the model holds in a less precise dtype than its
    own is refused (found by a new-user review: ``(h.half() + 1024).float()`` certified a flip of
    a whole float16 step). An op with a perturbed operand of the working dtype runs in that dtype
    (torch promotes) and passes."""
    narrow: dict = {}  # node -> the less precise dtype the model holds its value in
    for node in graph.nodes:
        if node.op != "call_function" or not info(node).perturbed:
            continue
        inputs = [a for a in node.all_input_nodes if info(a).perturbed]
        if node.target is ops.cast:
            src, dst, work = narrow.get(node.args[0]), node.args[1], info(node).dtype
            if dst is None:
                held = src
            elif dst.is_floating_point and work is not None and ops.less_precise(dst, work):
                held = dst if src is None or ops.less_precise(dst, src) else src
            else:
                held = None  # cast to the working precision or above: exact from here on
            if held is not None:
                narrow[node] = held
            continue
        held = [narrow[a] for a in inputs if a in narrow]
        if not held or len(held) < len(inputs):
            continue  # no narrow operand, or one of the working dtype: promoted, computed in the working dtype
        rule = registry.rule_for(node.target)
        name = rule.name if rule is not None else str(node.target)
        dtype = max(held, key=lambda d: torch.finfo(d).eps)
        if name in _EXACT_IN_ANY_DTYPE:
            narrow[node] = dtype
            continue
        raise unsupported(
            node, f"{name} runs on a value the model holds in {str(dtype).replace('torch.', '')} (cast there by "
            f"{_cast_origin(node, narrow)}), so the model rounds its result to that dtype, which bcpc does not model",
            "Cast back to the model's dtype before computing (h.half().float() + c), or drop the cast")


def _cast_origin(node: fx.Node, narrow: dict) -> str:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in narrow and a not in seen:
                if a.target is ops.cast:
                    return f"node '{a.name}' at {where(a)}"
                seen.add(a)
                todo.append(a)
    return "an earlier cast"


_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def _folds_into(node: fx.Node) -> bool:
    """``node`` is a BatchNorm of a perturbed convolution that nothing else reads."""
    if node.op != "call_function" or node.target is not ops.batch_norm or not info(node).perturbed:
        return False
    conv = node.args[0]
    return (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONVS
            and info(conv).perturbed and list(conv.users) == [node]
            and not any(isinstance(a, fx.Node) and info(a).perturbed for a in node.args[1:]))

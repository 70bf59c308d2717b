"""Patterns: rewrites of the canonical graph that need the shapes (runs after shapes, which then
runs again when anything changed).

1. *Tuple ops read item by item.* ``a, b = h.chunk(2, 1)`` (also ``split``, ``tensor_split``,
   ``unbind``) becomes ``a = torch.narrow(h, 1, 0, n)``, ``b = torch.narrow(h, 1, n, n)``
   (``torch.select`` for ``unbind``); ``h.max(dim)[0]`` / ``.values`` becomes ``torch.amax(h,
   (dim,))`` (``min`` likewise) and ``h.sort(dim)[0]`` a :func:`bcpc.ops.group_sort` over the
   whole dim. Items that stay tuples (indices: ``h.max(1)[1]``, ``argsort``) are not rewritten,
   and the analysis refuses them.
2. *MaxMin written by hand.* ``cat([max(a, b), min(a, b)], d)`` is a GroupSort of size 2:
   with ``a``, ``b`` the two halves of one value ``x`` along ``d`` it is ``group_sort(x, 2, d,
   strided=True, descending=True)``, otherwise the same of ``cat([a, b], d)``. The generic rules
   of max, min and cat would give a radius ``sqrt(2)`` (unrelated ``a``, ``b``) or ``2`` (halves)
   times larger; GroupSort keeps it (bcpc.rules.sorting).
3. *GroupSort written by hand.* ``x.view(B, C // k, k).sort(-1)[0].view(B, C)`` (after step 1 a
   reshape, a group_sort over the last dim and a reshape back) becomes ``group_sort(x, k, 1)``
   (and the strided layout ``view(B, k, C // k)`` sorted along dim 1 likewise). This changes
   the readability of the graph, not the bound: a reshape keeps the radius.
4. *SiLU written by hand.* ``h * torch.sigmoid(h)`` becomes ``F.silu(h)`` (a product of two
   perturbed values has no rule; the activation has).
5. *Broadcast perturbed operands.* In ``h - h.mean(1, keepdim=True)`` the perturbed ``(B, 1)``
   operand is broadcast to ``(B, n)``: it becomes an explicit ``expand`` (whose rule counts the
   copies), so the elementwise rules see operands of the output's shape.
6. *Products by a constant matrix.* ``h @ W`` with a constant 2-D ``W`` becomes
   ``F.linear(h, W.t())`` (``W @ h`` likewise, through transposes).
7. *Einsum with one constant operand.* ``torch.einsum("bchw,dc->bdhw", h, W)`` is linear in
   ``h``: ``h``'s letters that pass through to the output untouched (``h``, ``w``) stay leading
   dims, the letters summed away become one ``in`` dim, and the constant's output letters one
   ``out`` dim: ``permute``, ``reshape``, ``F.linear`` with the ``(out, in)`` matrix computed from
   the constant by an einsum, ``reshape``, ``permute``. The batch letter must lead ``h`` and the
   output and not index the constant. When nothing is summed and a letter is shared
   (``"bi,i->bi"``, each entry scaled by one constant, a diagonal map; ``"bi,ij->bij"``, scaled
   copies), it becomes ``h' * C'``: ``h`` permuted to the output's order and expanded over the
   constant's own letters, times the constant in the output's layout. A letter in ``h``, the
   constant and the output with another summed (a batched product), a repeated letter (a
   diagonal) or ``...`` is left as is (refused).

0. *Common subexpressions.* A deterministic op (one with a rule) applied twice to the same
   operands is one node: in ``(3 * h) * torch.sigmoid(3 * h)`` both ``3 * h`` are the same
   value, and after the merge the product is step 4's SiLU. The merged graph computes the same
   function; the bounds see one value used twice, which is what it is.

Every rewrite computes the same values (the verify step checks the whole graph against the
model). Rewritten nodes keep the user's node name and source line.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from bcpc import ops, registry
from bcpc.meta import NodeInfo, info
from bcpc.rules._util import pick

_SPLITS = {"chunk": ("chunks", 0), "split": ("split_size_or_sections", 0), "tensor_split": ("indices_or_sections", 0),
           "unbind": (None, 0)}
_FUNCTION_NAMES = {torch.chunk: "chunk", torch.split: "split", torch.tensor_split: "tensor_split",
                   torch.unbind: "unbind", torch.max: "max", torch.min: "min", torch.sort: "sort"}


def _name(node: fx.Node):
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        try:
            return _FUNCTION_NAMES.get(node.target)
        except TypeError:
            return None
    return None


def _item(user: fx.Node, node: fx.Node):
    """The item a user reads from tuple ``node``: an int, "values", "indices", or None."""
    if user.op != "call_function" or not user.args or user.args[0] is not node:
        return None
    if user.target is operator.getitem and isinstance(user.args[1], int):
        return user.args[1]
    if user.target is getattr and user.args[1] in ("values", "indices"):
        return user.args[1]
    return None


def _constant(v) -> bool:
    found = []
    fx.node.map_arg(v, found.append)
    return not found


def _replace(graph: fx.Graph, old: fx.Node, target, args, kwargs=None) -> fx.Node:
    with graph.inserting_before(old):
        new = graph.call_function(target, tuple(args), dict(kwargs or {}))
    return _adopt(graph, old, new)


def _adopt(graph: fx.Graph, old: fx.Node, new: fx.Node) -> fx.Node:
    """``new`` takes the place of ``old``: its uses, name, source line, shape and taint (the same
    value; shapes runs again anyway)."""
    rec = info(old)
    new.meta = {k: v for k, v in old.meta.items() if k in ("stack_trace", "nn_module_stack")}
    new.meta["bcpc"] = NodeInfo(origin=rec.origin, spelling=rec.spelling, perturbed=rec.perturbed,
                                shape=rec.shape, dtype=rec.dtype, is_tensor=rec.is_tensor)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    new.name = old.name
    return new


def _split_items(graph: fx.Graph, node: fx.Node) -> bool:
    name = _name(node)
    x = node.args[0] if node.args else None
    if name not in _SPLITS or not isinstance(x, fx.Node) or not info(x).is_tensor:
        return False
    rest = list(node.args[1:]), dict(node.kwargs)
    if not _constant(rest):
        return False
    arg_name, default_dim = _SPLITS[name]
    names = ("input", arg_name, "dim") if arg_name else ("input", "dim")
    kwargs = {(arg_name if k in ("split_size", "sections", "indices") else k): v for k, v in node.kwargs.items()}
    try:
        vals = pick(tuple(node.args), kwargs, names, {"dim": default_dim})
        meta = torch.empty(info(x).shape, device="meta")
        parts = getattr(torch, name)(meta, *vals[1:])
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False  # torch would refuse it too; the run already succeeded, so leave it as it is
    dim = int(vals[-1]) % len(info(x).shape)
    users = list(node.users)
    items = [(_item(u, node), u) for u in users if not _joins_whole(u, node)]
    wholes = [u for u in users if _joins_whole(u, node)]
    if not users or any(i is None or isinstance(i, str) for i, _ in items):
        return False
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + (p.shape[dim] if name != "unbind" else 1))

    def part(i, before):
        with graph.inserting_before(before):
            if name == "unbind":
                return graph.call_function(torch.select, (x, dim, i))
            return graph.call_function(torch.narrow, (x, dim, starts[i], parts[i].shape[dim]))

    for i, user in items:
        _adopt(graph, user, part(i % len(parts), user))
    for user in wholes:  # torch.cat(h.chunk(2, 1), 1): the items, spelled out
        join = torch.stack if user.target is torch.stack else torch.cat
        pieces = []
        for i in range(len(parts)):
            piece = part(i, user)
            piece.meta = {k: v for k, v in user.meta.items() if k in ("stack_trace", "nn_module_stack")}
            piece.meta["bcpc"] = NodeInfo(origin=info(user).origin, perturbed=info(x).perturbed,
                                          shape=tuple(parts[i].shape), dtype=info(x).dtype, is_tensor=True)
            pieces.append(piece)
        join_dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else 0)
        _replace(graph, user, join, (tuple(pieces), int(join_dim)))
    graph.erase_node(node)
    return True


def _joins_whole(user: fx.Node, node: fx.Node) -> bool:
    """``torch.cat(t, d)`` / ``torch.stack(t, d)`` of the whole tuple ``t``."""
    return (user.op == "call_function" and user.target in (torch.cat, torch.concat, torch.concatenate, torch.stack)
            and bool(user.args) and user.args[0] is node)


def _value_items(graph: fx.Graph, node: fx.Node) -> bool:
    """``max(dim)`` / ``min(dim)`` / ``sort(dim)`` read for their values only."""
    name = _name(node)
    x = node.args[0] if node.args else None
    if name not in ("max", "min", "sort") or not isinstance(x, fx.Node) or not info(x).is_tensor:
        return False
    if not _constant((list(node.args[1:]), dict(node.kwargs))):
        return False
    try:
        if name == "sort":
            kwargs = {k: v for k, v in node.kwargs.items() if k != "stable"}
            _, dim, descending = pick(tuple(node.args), kwargs, ("input", "dim", "descending"),
                                      {"dim": -1, "descending": False})
        else:
            _, dim, keepdim = pick(tuple(node.args), dict(node.kwargs), ("input", "dim", "keepdim"),
                                   {"keepdim": False})
    except TypeError:
        return False
    if not isinstance(dim, int):
        return False
    values = [u for u in list(node.users) if _item(u, node) in (0, "values")]
    if not values:
        return False
    dims = info(x).shape
    for user in values:
        if name == "sort":
            _replace(graph, user, ops.group_sort, (x, dims[dim], dim % len(dims), False, bool(descending)))
        else:
            _replace(graph, user, torch.amax if name == "max" else torch.amin, (x, (int(dim),), bool(keepdim)))
    if not node.users:
        graph.erase_node(node)
    return True


def _halves(a: fx.Node, b: fx.Node, dim: int):
    """``x`` if ``a``, ``b`` are ``narrow(x, dim, 0, n)`` and ``narrow(x, dim, n, n)`` covering x."""
    if not all(isinstance(t, fx.Node) and t.target is torch.narrow for t in (a, b)):
        return None
    (x, da, sa, la), (x2, db, sb, lb) = a.args, b.args
    if x is not x2 or not isinstance(x, fx.Node):
        return None
    n = len(info(x).shape)
    if da % n != dim or db % n != dim or sa != 0 or sb != la or lb != la or info(x).shape[dim] != 2 * la:
        return None
    return x


def _maxmin(graph: fx.Graph, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat or len(node.args) < 2:
        return False
    tensors, dim = node.args[0], node.args[1]
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not all(isinstance(t, fx.Node) for t in tensors):
        return False  # e.g. torch.cat(h.chunk(2, 1)[::-1], 1): the sequence is itself a node
    first, second = tensors
    kinds = {first.target, second.target}
    if kinds != {torch.maximum, torch.minimum} or len(first.args) != 2 or len(second.args) != 2:
        return False
    if set(first.args) != set(second.args) or first.kwargs or second.kwargs:
        return False
    a, b = first.args
    if not all(isinstance(t, fx.Node) and info(t).is_tensor and info(t).shape == info(first).shape for t in (a, b)):
        return False
    ndim = len(info(node).shape)
    dim = int(dim) % ndim
    descending = first.target is torch.maximum
    x = _halves(a, b, dim)
    if x is not None:
        _replace(graph, node, ops.group_sort, (x, 2, dim, True, descending))
        return True
    with graph.inserting_before(node):
        joined = graph.call_function(torch.cat, ((a, b), dim))
    joined.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
    shape = list(info(a).shape)
    shape[dim] *= 2
    joined.meta["bcpc"] = NodeInfo(origin=info(node).origin, spelling="torch.cat", perturbed=True,
                                   shape=tuple(shape), dtype=info(a).dtype, is_tensor=True)
    _replace(graph, node, ops.group_sort, (joined, 2, dim, True, descending))
    return True


def _is_reshape(node) -> bool:
    return isinstance(node, fx.Node) and node.target in (torch.reshape, torch.flatten)


def _grouped_sort(graph: fx.Graph, node: fx.Node) -> bool:
    """reshape -> group_sort over a whole split dim -> reshape back  ==>  one group_sort."""
    if not _is_reshape(node):
        return False
    g = node.args[0]
    if not (isinstance(g, fx.Node) and g.target is ops.group_sort and _is_reshape(g.args[0])):
        return False
    r = g.args[0]
    x = r.args[0]
    if not isinstance(x, fx.Node):
        return False
    xs, rs, out = tuple(info(x).shape), tuple(info(r).shape), tuple(info(node).shape)
    _, k, d_r, strided, descending = g.args
    if strided or out != xs or len(rs) != len(xs) + 1 or rs[d_r] != k:
        return False
    split = next((i for i in range(len(xs)) if xs[i] != rs[i]), len(xs) - 1)
    if xs[:split] != rs[:split] or xs[split + 1:] != rs[split + 2:] or rs[split] * rs[split + 1] != xs[split]:
        return False
    if d_r == split + 1:
        _replace(graph, node, ops.group_sort, (x, k, split, False, descending))
    elif d_r == split:
        _replace(graph, node, ops.group_sort, (x, k, split, True, descending))
    else:
        return False
    return True


def _squeeze_dims(graph: fx.Graph, node: fx.Node) -> bool:
    """``x.squeeze()`` names its dims: the size-1 dims of the example (the batch is 2 there, so
    never among them; a batch of 1 at run time then keeps its batch dim, and the run-time guard
    would see the shape differ from the model's)."""
    if node.op != "call_function" or node.target is not torch.squeeze or len(node.args) != 1 or node.kwargs:
        return False
    x = node.args[0]
    dims = tuple(i for i, n in enumerate(info(x).shape) if n == 1 and i > 0)
    _replace(graph, node, torch.squeeze, (x, dims))
    return True


def _silu(graph: fx.Graph, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not operator.mul or len(node.args) != 2:
        return False
    a, b = node.args
    for h, s in ((a, b), (b, a)):
        if isinstance(s, fx.Node) and s.target is torch.sigmoid and s.args[0] is h and not s.kwargs:
            _replace(graph, node, F.silu, (h,))
            return True
    return False


#: elementwise ops whose rules take operands of the output's shape (bcpc.rules: add, sub, mul,
#: div, maximum, minimum, where, and clamp, whose tensor bounds can broadcast the input too)
_ELEMENTWISE = (operator.add, operator.sub, operator.mul, operator.truediv, torch.maximum, torch.minimum, torch.where,
                torch.clamp)


def _broadcast_operands(graph: fx.Graph, node: fx.Node) -> bool:
    """``h - h.mean(1, keepdim=True)``: a perturbed operand broadcast to a larger shape is made an
    explicit ``expand``, whose rule accounts for the copies (radius times the square root of the
    most copies of one coordinate); the elementwise rules then see operands of one shape."""
    if node.op != "call_function" or node.target not in _ELEMENTWISE:
        return False
    out = tuple(info(node).shape or ())
    changed = False
    # clamp's bounds must be constants (its check refuses a perturbed one, naming the user's node)
    operands = node.args[:1] if node.target is torch.clamp else node.all_input_nodes
    for a in operands:
        if not isinstance(a, fx.Node):
            continue
        shape = tuple(info(a).shape or ())
        if not info(a).perturbed or shape == out or len(shape) != len(out) or len(out) < 2:
            continue
        if any(s != o and s != 1 for s, o in zip(shape[1:], out[1:])) or shape[0] != out[0]:
            continue  # not a broadcast of this operand: left for the rule's check to refuse
        from bcpc.rules.layout import expand  # the canonical expand (bcpc.rules imports this module's users)
        with graph.inserting_before(node):
            e = graph.call_function(expand, (a, (-1,) + out[1:]))
        e.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
        # part of the user's op: its origin (a name of its own could be another node's in the user's graph)
        e.meta["bcpc"] = NodeInfo(origin=info(node).origin, spelling=info(node).spelling, perturbed=True,
                                  shape=out, dtype=info(a).dtype, is_tensor=True)
        node.replace_input_with(a, e)
        changed = True
    return changed


_MATMULS = (operator.matmul, torch.matmul, torch.mm)


def _matmul_by_constant(graph: fx.Graph, node: fx.Node) -> bool:
    """``h @ W`` (``torch.matmul``, ``torch.mm``, ``h.matmul(W)``, ``h.mm(W)``) with a constant 2-D
    ``W`` is ``F.linear(h, W.t())``, and ``W @ h`` with ``h`` of 3 or more dims is
    ``F.linear(h.transpose(-1, -2), W).transpose(-1, -2)``: the linear rule bounds them with ``W``'s
    guaranteed norm. Products of two perturbed values stay as they are (refused)."""
    is_mm = (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target in ("matmul", "mm"))
    if not is_mm or len(node.args) != 2 or node.kwargs:
        return False
    a, b = node.args
    if not all(isinstance(v, fx.Node) for v in (a, b)):
        return False
    pa, pb = info(a).perturbed, info(b).perturbed
    if pa and not pb and len(info(b).shape or ()) == 2 and len(info(a).shape or ()) >= 2:
        with graph.inserting_before(node):
            wt = graph.call_function(torch.t, (b,))
        _replace(graph, node, F.linear, (a, wt))
        return True
    if pb and not pa and len(info(a).shape or ()) == 2 and len(info(b).shape or ()) >= 3:
        with graph.inserting_before(node):
            bt = graph.call_function(torch.transpose, (b, -1, -2))
            lin = graph.call_function(F.linear, (bt, a))
        _replace(graph, node, torch.transpose, (lin, -1, -2))
        return True
    return False


def einsum_subscripts(equation: str):
    """``(operand subscripts, output subscripts)`` of an einsum equation as written (spaces
    dropped; an implicit output is the letters used once, in alphabetical order)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    if not arrow:
        out = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    return lhs.split(","), out


def einsum_broadcast_letter(hl: str, shape: tuple, cl: str, c_shape: tuple):
    """The letter of ``h`` whose size differs from the constant's, which einsum broadcasts (a
    size-1 dim of ``h``) and the lowering does not, or None."""
    c_dims = dict(zip(cl, c_shape))
    return next((ch for ch, n in zip(hl, shape) if ch in c_dims and n != c_dims[ch] and c_dims[ch] != 1), None)


def _einsum_letters(equation: str, n_operands: int):
    """``(operand letter strings, output letters)`` of an einsum equation, or None for a form the
    rewrite leaves alone (``...``, a repeated letter, not ``n_operands`` operands)."""
    if "." in equation:
        return None
    ins, out = einsum_subscripts(equation)
    if len(ins) != n_operands or any(len(set(t)) != len(t) for t in ins + [out]):
        return None
    if not all(c.isalpha() for c in "".join(ins) + out):
        return None
    return ins, out


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def _einsum_by_constant(graph: fx.Graph, node: fx.Node) -> bool:
    """``torch.einsum(eq, h, C)`` (or ``eq, [h, C]``, either order) with a constant ``C``: a
    linear map of ``h``, lowered to ``F.linear`` between a ``permute``/``reshape`` pair (module
    docstring, item 7)."""
    if node.op != "call_function" or node.target is not torch.functional.einsum or node.kwargs:
        return False
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        equation, operands = node.args[0], tuple(node.args[1])
    else:
        equation, operands = node.args[0], tuple(node.args[1:])
    if not isinstance(equation, str) or len(operands) != 2 or not all(isinstance(v, fx.Node) for v in operands):
        return False
    parsed = _einsum_letters(equation, 2)
    if parsed is None:
        return False
    ins, out = parsed
    perturbed = [info(v).perturbed for v in operands]
    if perturbed.count(True) != 1:
        return False
    i = perturbed.index(True)
    h, c = operands[i], operands[1 - i]
    hl, cl = ins[i], ins[1 - i]
    shape, c_shape = tuple(info(h).shape or ()), tuple(info(c).shape or ())
    if len(shape) != len(hl) or len(c_shape) != len(cl) or not hl or not out or hl[0] != out[0] or hl[0] in cl:
        return False
    if einsum_broadcast_letter(hl, shape, cl, c_shape) is not None:
        return False  # a size-1 dim of h that einsum broadcasts against the constant: left as is
    if any(ch in hl and ch in cl for ch in out):
        return _einsum_elementwise(graph, node, h, c, hl, cl, out, shape, c_shape)
    sizes = dict(zip(hl, shape))
    keep = [ch for ch in hl[1:] if ch in out]  # pass through: leading dims of the linear map
    reduce = [ch for ch in hl[1:] if ch not in out]  # summed away (with the constant, or alone)
    c_out = [ch for ch in out if ch not in hl]  # the constant's output letters
    sizes.update({ch: n for ch, n in zip(cl, c_shape) if ch not in sizes})
    order = [0] + [hl.index(ch) for ch in keep + reduce]
    with graph.inserting_before(node):
        x = h if order == sorted(order) else graph.call_function(torch.permute, (h, tuple(order)))
        if len(reduce) != 1:  # one "in" dim
            x = graph.call_function(torch.reshape, (x, (-1,) + tuple(sizes[ch] for ch in keep) +
                                                    (_prod(sizes[ch] for ch in reduce),)))
        ones = graph.call_method("new_ones", (c, tuple(sizes[ch] for ch in reduce)))
        w = graph.call_function(torch.functional.einsum,
                                (f"{cl},{''.join(reduce)}->{''.join(c_out + reduce)}", c, ones))
        w = graph.call_function(torch.reshape, (w, (_prod(sizes[ch] for ch in c_out),
                                                    _prod(sizes[ch] for ch in reduce))))
        y = graph.call_function(F.linear, (x, w))
        if len(c_out) != 1:  # the "out" dim back to the constant's letters (a final F.linear stays last:
            # the margins of a last affine layer are bounded through its weight differences)
            y = graph.call_function(torch.reshape, (y, (-1,) + tuple(sizes[ch] for ch in keep + c_out)))
    back = tuple(([hl[0]] + keep + c_out).index(ch) for ch in out)
    if back == tuple(sorted(back)):
        _adopt(graph, node, y)
    else:
        _replace(graph, node, torch.permute, (y, back))
    return True


def _einsum_elementwise(graph: fx.Graph, node: fx.Node, h: fx.Node, c: fx.Node, hl: str, cl: str, out: str,
                        shape: tuple, c_shape: tuple) -> bool:
    """An einsum that sums nothing (every letter of both operands is in the output) and shares a
    letter with the constant: each output entry is one entry of ``h`` times one of the constant,
    ``torch.einsum("bi,i->bi", h, v)`` (a diagonal map) or ``"bi,ij->bij"`` (a scaled copy). It
    becomes ``h' * C'``: ``h`` permuted to the output's order, with size-1 dims for the constant's
    own letters and expanded over them (the ``expand`` rule counts the copies), times the constant
    in the output's layout. A letter shared with the constant and summed away (a block-diagonal
    map) is left as is (refused)."""
    if set(out) != set(hl) | set(cl):
        return False
    sizes = dict(zip(hl, shape))
    sizes.update({ch: n for ch, n in zip(cl, c_shape) if ch not in sizes})
    h_order = [ch for ch in out if ch in hl]
    c_order = "".join(ch for ch in out if ch in cl)
    from bcpc.rules.layout import expand  # the canonical expand (bcpc.rules imports this module's users)
    with graph.inserting_before(node):
        perm = tuple(hl.index(ch) for ch in h_order)
        x = h if perm == tuple(sorted(perm)) else graph.call_function(torch.permute, (h, perm))
        if len(h_order) != len(out):  # size-1 dims for the constant's own letters, then the copies
            x = graph.call_function(torch.reshape, (x, (-1,) + tuple(sizes[ch] if ch in hl else 1 for ch in out[1:])))
            x = graph.call_function(expand, (x, (-1,) + tuple(sizes[ch] for ch in out[1:])))
        scale = c if c_order == cl else graph.call_function(torch.functional.einsum, (f"{cl}->{c_order}", c))
        view = tuple(c_shape[cl.index(ch)] if ch in cl else 1 for ch in out)
        scale = graph.call_function(torch.reshape, (scale, view))
        y = graph.call_function(operator.mul, (x, scale))
    _adopt(graph, node, y)
    return True



_ATOMS = (str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _operand_key(value):
    """A hashable key equal for two operands exactly when they are the same operand (a node by
    identity, an attribute read by its name; a number by type and value, -0.0 apart from 0.0); None for an operand this does not
    know how to compare (the node is then left alone)."""
    if isinstance(value, fx.Node):  # a module's weight read twice is one weight
        return ("attr", value.target) if value.op == "get_attr" else ("node", value)
    if isinstance(value, bool) or isinstance(value, int):
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, _ATOMS):
        return (type(value).__name__, value)
    if isinstance(value, slice):
        parts = tuple(_operand_key(v) for v in (value.start, value.stop, value.step))
        return None if None in parts else ("slice",) + parts
    if isinstance(value, (tuple, list, torch.Size)):
        parts = tuple(_operand_key(v) for v in value)
        return None if None in parts else (type(value).__name__,) + parts
    return None


def _merge_common_subexpressions(graph: fx.Graph) -> bool:
    """Step 0: each perturbed call of a ruled (so deterministic) op, or item read, that repeats an
    earlier one with the same operands is replaced by it."""
    seen, changed = {}, False
    for node in list(graph.nodes):
        if node.op != "call_function" or not info(node).perturbed:
            continue
        if node.target is not operator.getitem and registry.rule_for(node.target) is None:
            continue
        args = _operand_key(tuple(node.args))
        kwargs = _operand_key(tuple(sorted(node.kwargs.items())))
        if args is None or kwargs is None:
            continue
        key = (node.target, args, kwargs)
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            changed = True
    return changed


def rewrite_patterns(gm: fx.GraphModule) -> bool:
    """Apply the rewrites until none applies; True if the graph changed (then re-run shapes)."""
    graph = gm.graph
    changed = _merge_common_subexpressions(graph)
    for step in (_split_items, _value_items, _squeeze_dims, _maxmin, _grouped_sort, _silu, _broadcast_operands,
                 _matmul_by_constant, _einsum_by_constant):
        for node in list(graph.nodes):
            if not getattr(node, "_erased", False) and info(node).perturbed:
                changed |= step(graph, node)
    if changed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return changed

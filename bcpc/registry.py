"""The rule table: one record per canonical op (STYLE.md idiom 1).

A rule says how a perturbed value moves through one op. It is registered once, with

* ``target`` – the canonical op; the emitted module computes the clean value (the *center*) by
  calling it on centres, so the model's own arithmetic is what gets bounded;
* ``ball``   – ``ball(*args, **kwargs) -> radius`` with every perturbed argument given as a
  :class:`~bcpc.domain.Bound`; returns the output's l2 radius, or ``None`` if no input has one;
* ``box``    – ``box(center, radius, *args, **kwargs) -> Bound``: the output box, intersected
  with the output ball through :func:`bcpc.domain.bound`;
* ``spellings`` – every way a user may write the op (module classes, functions, tensor-method
  names), each with an adapter to the canonical argument list. ``passes/canonicalize.py``
  rewrites them all to ``target`` before any rule runs.

Both ``ball`` and ``box`` are required, so they cannot drift apart; registering a target or a
spelling twice raises. Rules live in ``rules/`` (one module per op family); importing
``bcpc.rules`` fills the table.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Attr:
    """Placeholder for a module attribute (a parameter, buffer or flag) in a canonical call.

    The canonicalize pass turns it into a ``get_attr`` node on the module that was called, so the
    emitted module reads the live value (parameters stay shared with the user's model).
    """

    name: str


#: ``adapter(module, args, kwargs) -> (args, kwargs)``: maps one spelling's call to the
#: canonical argument list. ``module`` is the called nn.Module for module spellings, else None.
Adapter = Callable[[Any, tuple, dict], "tuple[tuple, dict]"]


@dataclass(frozen=True)
class Spelling:
    """One way of writing an op: a module class, a function, or a tensor-method name."""

    key: Any  # type (module), callable (function) or str (method)
    adapter: Optional[Adapter] = None  # None: pass (args, kwargs) through unchanged

    @property
    def kind(self) -> str:
        if isinstance(self.key, str):
            return "method"
        if isinstance(self.key, type):
            return "module"
        return "function"


@dataclass(frozen=True)
class Rule:
    """The bound rule of one canonical op."""

    target: Callable
    ball: Callable
    box: Callable
    family: str
    name: str
    #: Optional ``lipschitz(node_args, input_shape) -> (module, arg_indices)`` for ops whose ball
    #: needs a weight-dependent Lipschitz constant; the lowering wires the module's output into
    #: ``ball(..., sigma=...)``. See bcpc.lipcache.
    lipschitz: Optional[Callable] = None
    #: Optional ``check(node)``: compile-time validation of one canonical node (raises
    #: UnsupportedOpError naming what is wrong, e.g. a product of two perturbed values).
    check: Optional[Callable] = None
    spellings: tuple = field(default=())


IDENTITY = object()  # canonical target of ops the pipeline removes (Dropout, Identity, ...)

_RULES: dict = {}
_SPELLINGS: dict = {}


def _spelling(s) -> Spelling:
    if isinstance(s, Spelling):
        return s
    if isinstance(s, tuple):
        return Spelling(*s)
    return Spelling(s)


def _add_spellings(target, spellings) -> tuple:
    out = tuple(_spelling(s) for s in spellings)
    for s in out:
        k = (s.kind, s.key)
        if k in _SPELLINGS:
            raise ValueError(f"spelling {s.key!r} is already registered for {_SPELLINGS[k][0]!r}")
        _SPELLINGS[k] = (target, s)
    return out


def _with_target(target, spellings) -> tuple:
    """The canonical target is always a spelling of itself (unless listed with an adapter)."""
    spellings = tuple(_spelling(s) for s in spellings)
    if any(s.key is target for s in spellings):
        return spellings
    return (_spelling(target),) + spellings


def register(target, *, ball, box, family, name=None, spellings=(), lipschitz=None, check=None) -> Rule:
    """Register the rule of canonical op ``target``. Raises if ``target`` already has one."""
    if target in _RULES:
        raise ValueError(f"a rule for {target!r} is already registered")
    if ball is None or box is None:
        raise ValueError("a rule needs both a ball and a box function")
    rule = Rule(
        target=target,
        ball=ball,
        box=box,
        family=family,
        name=name or getattr(target, "__name__", str(target)),
        lipschitz=lipschitz,
        check=check,
        spellings=_add_spellings(target, _with_target(target, spellings)),
    )
    _RULES[target] = rule
    return rule


def register_identity(*spellings) -> None:
    """Spellings the pipeline removes: their output is their first argument (Dropout in eval)."""
    _add_spellings(IDENTITY, spellings)


def rule_for(target) -> Optional[Rule]:
    """The rule of a canonical target, or None."""
    try:
        return _RULES.get(target)
    except TypeError:  # unhashable target
        return None


def spelling_for(kind: str, key) -> Optional[tuple]:
    """``(canonical_target, Spelling)`` for a call, or None if no rule spells it this way.

    Module classes match through their MRO, so a user subclass of ``nn.Conv2d`` is a conv.
    """
    if kind == "module":
        for cls in key.__mro__:
            hit = _SPELLINGS.get(("module", cls))
            if hit is not None:
                return hit
        return None
    try:
        return _SPELLINGS.get((kind, key))
    except TypeError:
        return None


def rules() -> list:
    """All registered rules, in registration order."""
    return list(_RULES.values())


def describe_spelling(s: Spelling) -> str:
    """``torch.nn.Conv2d``, ``torch.nn.functional.relu``, ``Tensor.view``, ``operator.add``."""
    if s.kind == "method":
        return f"Tensor.{s.key}"
    if s.kind == "module":
        mod = s.key.__module__
        return f"torch.nn.{s.key.__name__}" if mod.startswith("torch.nn") else f"{mod}.{s.key.__qualname__}"
    name = getattr(s.key, "__name__", repr(s.key))
    if getattr(torch.nn.functional, name, None) is s.key:
        return f"torch.nn.functional.{name}"
    if getattr(torch, name, None) is s.key:
        return f"torch.{name}"
    for alias, fn in vars(torch.nn.functional).items():  # F.logsigmoid is torch._C._nn.log_sigmoid
        if fn is s.key and not alias.startswith("_"):
            return f"torch.nn.functional.{alias}"
    mod = (getattr(s.key, "__module__", None) or "torch").replace("_operator", "operator")
    return f"{mod}.{name}"


def supported_ops() -> list:
    """Human-readable list of every accepted spelling, sorted (for error messages and docs)."""
    names = set()
    for (_, _), (_, s) in _SPELLINGS.items():
        names.add(describe_spelling(s))
    return sorted(names)


def bind(fn: Callable, args: tuple, kwargs: dict) -> dict:
    """Bind a call to a Python function's signature, defaults applied (for adapters)."""
    sig = inspect.signature(fn)
    ba = sig.bind(*args, **kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


def _first_line(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")


def ops_table() -> str:
    """Markdown table of every rule: name, family, the spellings that reach it, ball and box
    (first paragraph of their docstrings). docs/ops.md is this table (tests/test_ops_table.py)."""
    import importlib

    importlib.import_module("bcpc.rules")  # fills the table

    lines = ["| rule | family | spellings | ball | box |", "|---|---|---|---|---|"]
    for rule in sorted(rules(), key=lambda r: (r.family, r.name)):
        names = sorted({describe_spelling(s) for s in rule.spellings})
        spelled = ", ".join(f"`{n}`" for n in names)
        lines.append(f"| `{rule.name}` | {rule.family} | {spelled} | {_first_line(rule.ball)} | {_first_line(rule.box)} |")
    removed = sorted(describe_spelling(s) for (_, _), (t, s) in _SPELLINGS.items() if t is IDENTITY)
    lines += ["", "Removed by the pipeline (the identity in eval mode): " + ", ".join(f"`{n}`" for n in removed) + "."]
    return "\n".join(lines) + "\n"

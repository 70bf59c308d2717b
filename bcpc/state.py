"""Exact snapshots of tensor values, for caches that must never go stale.

A tensor's version counter misses edits made through ``.data`` (``p.data.mul_(...)``,
``p.data.copy_(...)``: manual SGD, weight clipping), and a storage pointer can be reused after a
tensor is freed. A cache keyed on either can hand out a bound of old weights for new ones, so the
caches of bound-relevant values (the float64 certification twin, the guaranteed Lipschitz bounds)
compare the values themselves: one pass over the weights, far cheaper than what they cache.
"""
from __future__ import annotations

import copy
import functools
import sys
import sysconfig
import types
from typing import Iterable, Optional

import torch
from torch import Tensor, nn


class Snapshot:
    """A copy of named tensors' values; :meth:`matches` compares them exactly (NaN never matches)."""

    def __init__(self, items: Iterable[tuple]):
        self.items = [(name, t.detach().clone()) for name, t in items]

    @classmethod
    def of_module(cls, module: nn.Module) -> "Snapshot":
        """Every parameter and buffer of ``module`` (shared ones once)."""
        return cls(named_state(module))

    def matches(self, items: Iterable[tuple]) -> bool:
        items = list(items)
        if len(items) != len(self.items):
            return False
        for (name, saved), (now_name, now) in zip(self.items, items):
            if name != now_name or not same_tensor_values(saved, now):
                return False
        return True

    def matches_module(self, module: nn.Module) -> bool:
        return self.matches(named_state(module))


def copy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, also where a module keeps a tensor autograd computed (an
    activation cached by forward, ``self.cache = out``, which ``deepcopy`` refuses): the copy holds
    a detached copy of it."""
    memo = {}
    for m in module.modules():
        for value in vars(m).values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
            for t in items:
                if isinstance(t, Tensor) and not t.is_leaf and id(t) not in memo:
                    memo[id(t)] = t.detach().clone()
    return copy.deepcopy(module, memo)


def copy_in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``module`` with every floating tensor in ``dtype``: parameters and buffers
    (``Module.to``), and also floating tensors kept as plain attributes (``self.w =
    torch.randn(...)`` in a user's model, constants torch.fx stores on a graph), which
    ``Module.to`` leaves alone, so that the float64 copy that certifies a float32 model does not
    meet a float32 constant in a matmul. (Plain tensor attributes are constants of the model;
    their values are watched by the change check, :func:`changes`.)"""
    twin = copy_module(module).to(dtype)
    for sub in twin.modules():
        for name, value in list(vars(sub).items()):
            if (isinstance(value, Tensor) and not isinstance(value, nn.Parameter)
                    and value.is_floating_point() and value.dtype != dtype):
                object.__setattr__(sub, name, value.to(dtype))
    return twin


def named_state(module: nn.Module) -> list:
    return list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b is not None]


def same_tensor_values(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    """Same shape, dtype, device and values, bit for bit where it matters (``torch.equal``)."""
    if a is None or b is None:
        return a is b
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and bool(torch.equal(a.detach(), b.detach())))


#: ``nn.Module.__dict__`` entries that are not model state a certificate depends on: the mode flag
#: (checked on its own), the containers the value snapshot covers, and caches torch keeps.
_SKIP_ATTRIBUTES = frozenset(["training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                              "_load_state_dict_post_hooks", "_is_full_backward_hook", "_compiled_call_impl",
                              "_backward_pre_hooks", "_backward_hooks"])


def _freeze(value, depth: int = 0):
    """A comparable stand-in for an attribute value: primitives by value, containers (sets and
    bytearrays too) item by item, tensors by a copy of their values, bound methods by their function
    and object (a review changed ``clipper.cap`` behind ``self.post = clipper.apply``), plain objects
    (``SimpleNamespace``, dataclasses, argparse namespaces, config objects) by their attributes,
    anything else by identity."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        return _TensorValue(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tobytes"):  # an array or a numpy scalar
        return ("ndarray", str(getattr(value, "dtype", "")), tuple(getattr(value, "shape", ())), value.tobytes())
    if depth > 8:
        return ("object", type(value).__qualname__, id(value))
    if isinstance(value, functools.partial):
        return ("partial", _freeze(value.func, depth + 1), _freeze(value.args, depth + 1),
                _freeze(value.keywords, depth + 1))
    if isinstance(value, types.FunctionType):
        return ("function", value.__qualname__, _code_key(value.__code__), _freeze(value.__defaults__, depth + 1),
                _freeze(value.__kwdefaults__, depth + 1))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_freeze(v, depth + 1) for v in value)
    if isinstance(value, (set, frozenset)):  # by contents, in an order that does not depend on the set's
        return ("set",) + tuple(sorted((_freeze(v, depth + 1) for v in value), key=repr))
    if isinstance(value, bytearray):
        return ("bytearray", bytes(value))
    if isinstance(value, types.MethodType):  # a bound method: its function and the state of its object
        return ("method", _freeze(value.__func__, depth + 1), _freeze(value.__self__, depth + 1))
    owner = getattr(value, "__self__", None)
    if isinstance(value, (types.BuiltinMethodType, types.MethodWrapperType)) and owner is not None \
            and not isinstance(owner, (types.ModuleType, type, nn.Module, torch.Tensor)):
        # a built-in object's method (self.lookup = table.get): the object's contents
        return ("method", ("function", f"{type(owner).__name__}.{value.__name__}"), _freeze(owner, depth + 1))
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _freeze(v, depth + 1)) for k, v in value.items())
    if _plain_object(value):
        return ("object", type(value).__qualname__, id(value)) + tuple(
            (k, _freeze(v, depth + 1)) for k, v in sorted(vars(value).items()) if not k.startswith("__"))
    slots = [n for klass in type(value).__mro__ for n in getattr(klass, "__slots__", ())
             if isinstance(n, str) and not n.startswith("__")]
    if slots and not isinstance(value, (nn.Module, torch.Tensor)):
        return ("object", type(value).__qualname__, id(value)) + tuple(
            (n, _freeze(getattr(value, n, None), depth + 1)) for n in sorted(set(slots)))
    return ("object", type(value).__qualname__, id(value))


def _code_key(code) -> tuple:
    """What a function computes, not where it is written: an identical re-definition compares equal."""
    return (code.co_code, code.co_names, code.co_varnames,
            tuple(_code_key(c) if isinstance(c, types.CodeType) else c for c in code.co_consts))


def _plain_object(value) -> bool:
    """An instance holding data in its ``__dict__`` (not a module, function, class or tensor)."""
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type, types.FunctionType,
                                                                  types.MethodType, types.ModuleType,
                                                                  types.BuiltinFunctionType)))


def _data(value) -> bool:
    """A value forward may read as data (traced into the graph as a constant)."""
    return not isinstance(value, (type, types.FunctionType, types.MethodType, types.ModuleType,
                                  types.BuiltinFunctionType, nn.Module)) and not callable(value)


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


#: Packages whose functions and module attributes are library code, not the user's model state.
_LIBRARY_PACKAGES = frozenset(["torch", "bcpc", "numpy", "math", "functools", "builtins", "typing", "collections",
                               "operator", "itertools", "copy", "types", "einops", "scipy"])
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _user_code(obj) -> bool:
    """A function or module of the user's own (not of the standard library or an installed package)."""
    if obj is None:
        return False
    module = isinstance(obj, types.ModuleType)
    name = getattr(obj, "__name__" if module else "__module__", None) or ""
    if name.split(".")[0] in _LIBRARY_PACKAGES or name in sys.builtin_module_names:
        return False
    path = getattr(obj, "__file__", None) if module else obj.__code__.co_filename
    if not path:
        return module  # a module made in memory (types.ModuleType) is the user's
    return not path.startswith(_LIBRARY_DIRS)


def _function_data(fn, seen: Optional[set] = None) -> tuple:
    """Globals and closure cells a function reads that hold data: fx bakes their values into the
    graph at trace time, so a later change must be seen. Followed into the user's own helper
    functions it calls and the attributes it reads from the user's own modules (``add_bias(h)``
    reading a global ``BIAS``, ``h + consts.BIAS``): rebinding such a constant leaves the traced
    graph with the old value (found by a new-user review)."""
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType):
        return ()
    seen = set() if seen is None else seen
    if id(fn) in seen or len(seen) > 64:
        return ()
    seen.add(id(fn))
    names = sorted(_code_names(fn.__code__))
    out = []

    def follow(label, value, depth=0):
        if isinstance(value, types.FunctionType):
            if _user_code(value):  # its code (a helper rebound to another function) and what it reads
                out.append((label, _freeze(value)))
                out.extend(_function_data(value, seen))
        elif isinstance(value, (staticmethod, classmethod)):
            follow(label, value.__func__, depth)
        elif isinstance(value, functools.partial):
            out.append((label, _freeze(value)))
            follow(label + " (its function)", value.func, depth)
        elif isinstance(value, type):
            if _user_code(sys.modules.get(value.__module__)) and id(value) not in seen:
                seen.add(id(value))
                out.extend(_class_data(value, seen))
        elif isinstance(value, types.ModuleType):
            if _user_code(value) and id(value) not in seen and depth < 4:
                seen.add(id(value))
                for attr in names:
                    if attr in vars(value):
                        follow(f"{value.__name__}.{attr} read by {fn.__qualname__}", vars(value)[attr], depth + 1)
        elif _data(value):
            out.append((label, _freeze(value)))
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
            for item in items:  # functions kept in a registry dict or a list
                if isinstance(item, (types.FunctionType, functools.partial)):
                    follow(label + " (an item)", item, depth)

    for name in names:
        if name in fn.__globals__:
            follow(f"global {name!r} read by {fn.__qualname__}", fn.__globals__[name])
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        follow(f"closure variable {name!r} of {fn.__qualname__}", value)
    return tuple(out)


def user_functions(m: nn.Module) -> list:
    """``(owner, name, function)`` for the code of the user's own that runs as ``m``'s forward: the
    methods its classes define (torch's and bcpc's own classes left out) and functions kept on the
    instance (``self.body = fn``)."""
    owners = [(klass.__name__, vars(klass)) for klass in type(m).__mro__
              if klass is not object and not klass.__module__.startswith(("torch.", "bcpc."))]
    owners.append((type(m).__name__, vars(m)))
    out = []
    for owner, attrs in owners:
        for attr, fn in attrs.items():
            fn = getattr(fn, "__func__", fn)  # staticmethod / classmethod
            if isinstance(fn, types.FunctionType):
                out.append((owner, attr, fn))
    return out


def names_read(fn, helpers: bool = False) -> set:
    """The global and attribute names ``fn``'s code reads (nested code included); ``helpers``: also
    those of the user's own functions it names (one level)."""
    names = set(_code_names(fn.__code__))
    if helpers:
        for g in list(names):
            helper = fn.__globals__.get(g)
            if isinstance(helper, types.FunctionType) and _user_code(helper):
                names |= _code_names(helper.__code__)
    return names


def _class_data(cls, seen: Optional[set] = None) -> tuple:
    """Class attributes holding data and the data globals of the methods, for the user's classes
    (torch's own are not user state)."""
    seen = set() if seen is None else seen
    out = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch"):
            continue
        for name, value in sorted(vars(klass).items()):
            if name.startswith("__"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, types.FunctionType):
                # its own code and defaults (forward's defaults are traced in: M.forward.__defaults__ = ...
                # after compile certified the old function, found by a new-user review), then what it reads
                out.append((f"method {klass.__qualname__}.{name}", _freeze(value)))
                out.extend(_function_data(value, seen))
            elif _data(value) and not isinstance(value, property):
                out.append((f"class attribute {klass.__qualname__}.{name}", _freeze(value)))
    return tuple(out)


class _TensorValue:
    def __init__(self, t: Tensor):
        self.t = t.detach().clone()

    def __eq__(self, other):
        return isinstance(other, _TensorValue) and same_tensor_values(self.t, other.t)

    def __repr__(self):
        return f"tensor of shape {tuple(self.t.shape)}"


class _Hook:
    """A global forward hook in a :func:`structure` record: equal only to the same hook object."""

    def __init__(self, hook):
        self.hook = hook

    def __eq__(self, other):
        return isinstance(other, _Hook) and other.hook is self.hook

    def __repr__(self):
        return describe_hook(self.hook)


def describe_hook(hook) -> str:
    """A hook as the user wrote it: its name and where it is defined."""
    fn = getattr(hook, "__func__", hook)
    code = getattr(fn, "__code__", None)
    name = getattr(fn, "__qualname__", type(hook).__name__)
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code is not None else name


class _Hooks(tuple):
    """The global forward hooks of one kind, in registration order (rendered by name)."""


def _global_forward_hooks() -> tuple:
    """The hooks every module's ``__call__`` runs (``torch.nn.modules.module.register_module_forward_hook``
    and ``..._pre_hook``): they change what ``model(x)`` computes as a module's own hooks do."""
    import torch.nn.modules.module as module_mod

    return tuple((f"global forward {kind} (torch.nn.modules.module.register_module_forward_{kind})",
                  _Hooks(_Hook(h) for h in hooks.values()))
                 for kind, hooks in (("pre_hook", module_mod._global_forward_pre_hooks),
                                     ("hook", module_mod._global_forward_hooks)))


def library_snapshot(model: nn.Module) -> dict:
    """``(namespace, label, name) -> object`` for every callable of torch's namespaces a forward
    reaches (``torch``, ``torch.nn.functional``, ``torch.Tensor``, ``torch.nn.Module``, and
    ``torch._C._nn``, the C functions F calls) and of every
    class of the model's modules, torch's own included, for :func:`library_changes`. A library
    patched after compile (``F.linear = ...``, ``nn.Conv2d._conv_forward = ...``,
    ``nn.Module.__call__ = ...``: quantisation and adapter libraries do it when imported) changes
    what ``model(x)`` computes but not the graph bcpc certifies, which lowers the layers itself;
    found by a new-user review (seven false certificates)."""
    import torch.nn.functional as F

    spaces = [("torch", torch), ("torch.nn.functional", F), ("torch.Tensor", torch.Tensor),
              ("torch.nn.Module", nn.Module), ("torch._C._nn", torch._C._nn), ("torch._VF", torch._VF)]
    seen = {id(space) for _, space in spaces}
    for m in model.modules():
        for klass in type(m).__mro__:
            if klass is not object and id(klass) not in seen:
                seen.add(id(klass))
                spaces.append((f"{klass.__module__}.{klass.__qualname__}", klass))
    out = {(space, label, name): value for label, space in spaces for name, value in list(vars(space).items())
           if callable(value) and not isinstance(value, types.ModuleType) and name not in _CONSTRUCTION}
    for label, space in spaces:  # a namespace's names: one added (torch._VF.dropout = f shadows the C function);
        if not (isinstance(space, type) and issubclass(space, nn.Module)):  # module classes: _RESOLVED below
            out[(space, label, _NAMES)] = _callable_names(space)
    for label, space in spaces:  # a module class: also what its methods resolve to (nn.Linear.__call__ = ... added)
        if isinstance(space, type) and issubclass(space, nn.Module):
            out[(space, label, _RESOLVED)] = _resolved_callables(space)
    return out


_RESOLVED = "<resolved methods>"
_NAMES = "<names>"
#: what builds a module (or unpickles it), never what an existing one computes: torch.compile wraps
#: nn.Module.__init__ and __setstate__ the first time it runs (dynamo's generation tagging), which
#: is no change of a compiled model (tests/test_backend.py failed when it ran first in its process)
_CONSTRUCTION = frozenset(["__init__", "__new__", "__init_subclass__", "__setstate__"])


def _callable_names(space) -> frozenset:
    return frozenset(k for k, v in list(vars(space).items()) if callable(v) and k not in _CONSTRUCTION)


def _resolved_callables(klass) -> dict:
    """name -> the callable ``klass.name`` finds along the MRO (unbound, as stored)."""
    found = {}
    for k in reversed(klass.__mro__):
        found.update((n, v) for n, v in vars(k).items()
                     if (callable(v) or isinstance(v, (staticmethod, classmethod))) and n not in _CONSTRUCTION)
    return found


def library_changes(snapshot: dict) -> Optional[str]:
    """The first callable of :func:`library_snapshot` replaced since, or None."""
    missing = object()
    for (space, label, name), value in snapshot.items():
        if name == _NAMES:
            now = _callable_names(space)
            if now - value:
                return f"{label}.{sorted(now - value)[0]} was added"
            continue
        if name == _RESOLVED:
            now = _resolved_callables(space)
            for n in sorted(set(now) | set(value)):
                if now.get(n, missing) is not value.get(n, missing):
                    return f"{label}.{n} now resolves to another function than at compile time"
            continue
        now = vars(space).get(name, missing)
        if now is not value:
            what = "deleted" if now is missing else f"replaced by {getattr(now, '__qualname__', type(now).__name__)}"
            return f"{label}.{name} was {what}"
    return None


def structure(module: nn.Module, skip: frozenset = frozenset()) -> list:
    """The module tree and every non-tensor-state attribute of every module (Python numbers and
    flags, plain tensor attributes, hooks, a monkeypatched ``forward``), and the global forward
    hooks, for :func:`changes`; ``skip``: ``(module name, attribute)`` pairs left out (activations
    forward keeps on a module)."""
    out = []
    for name, m in module.named_modules():
        attrs = tuple((k, _freeze(v)) for k, v in sorted(m.__dict__.items())
                      if k not in _SKIP_ATTRIBUTES and (name, k) not in skip)
        functions = tuple(item for v in m.__dict__.values() if isinstance(v, types.FunctionType)
                          for item in _function_data(v))  # e.g. a lambda stored as an attribute
        # on the root's record: the global hooks, and the shapes of the parameters and buffers, which the
        # graph holds as numbers where forward reads them (range(self.pe.shape[0]))
        extra = (_global_forward_hooks() + (("shapes of the parameters and buffers", tuple(
            (n, tuple(t.shape)) for n, t in named_state(module))),)) if not out else ()
        # the class's forward, torch's own included (nn.Linear.forward patched after compile changes model(x)
        # but not the graph, which lowers the layer itself: found by a new-user review)
        forward = (("forward of its class", _freeze(getattr(type(m), "forward", None))),)
        out.append((name, type(m), id(m), attrs + functions + _class_data(type(m)) + forward + extra))
    return out


def _render(frozen) -> str:
    """A :func:`_freeze` record as the user would write the value."""
    if isinstance(frozen, _Hooks):  # global forward hooks
        return ", ".join(map(repr, frozen)) or "none"
    if isinstance(frozen, tuple) and frozen and frozen[0] == "ndarray":
        return f"a numpy array of shape {frozen[2]} (other values)"
    if isinstance(frozen, tuple) and frozen and frozen[0] == "function":
        return f"function {frozen[1]}"
    if isinstance(frozen, tuple) and frozen and frozen[0] == "set":
        return "{" + ", ".join(_render(v) for v in frozen[1:]) + "}" if len(frozen) > 1 else "set()"
    if isinstance(frozen, tuple) and frozen and frozen[0] == "bytearray":
        return repr(bytearray(frozen[1]))
    if isinstance(frozen, tuple) and frozen and frozen[0] == "method":
        return f"bound method {frozen[1][1]} of {_render(frozen[2])}"
    if isinstance(frozen, tuple) and frozen and frozen[0] == "partial":
        return f"functools.partial({_render(frozen[1])}, ...)"
    if isinstance(frozen, tuple) and frozen and frozen[0] == "object":
        fields = ", ".join(f"{k}={_render(v)}" for k, v in frozen[3:])
        return f"{frozen[1]}({fields})" if len(frozen) > 3 else f"<{frozen[1]} object>"
    if isinstance(frozen, tuple) and frozen and frozen[0] in ("tuple", "list"):
        inner = ", ".join(_render(v) for v in frozen[1:])
        return f"({inner})" if frozen[0] == "tuple" else f"[{inner}]"
    if isinstance(frozen, tuple) and frozen and frozen[0] == "dict":
        return "{" + ", ".join(f"{k!r}: {_render(v)}" for k, v in frozen[1:]) + "}"
    return repr(frozen)


def changes(before: list, after: list) -> Optional[str]:
    """A description of the first difference between two :func:`structure` records, or None."""
    if [(n, t, i) for n, t, i, _ in before] != [(n, t, i) for n, t, i, _ in after]:
        was = {n: t.__name__ for n, t, _, _ in before}
        now = {n: t.__name__ for n, t, _, _ in after}
        for n in sorted(set(was) | set(now)):
            if was.get(n) != now.get(n):
                return f"submodule {n or '<root>'!r} was {was.get(n, 'absent')}, now {now.get(n, 'absent')}"
        for (n, _, i, _), (_, _, j, _) in zip(before, after):
            if i != j:
                return f"submodule {n or '<root>'!r} was replaced by another {was[n]} object"
        return "a submodule was replaced by another object"
    for (name, _, _, a), (_, _, _, b) in zip(before, after):
        if a != b:
            da, db = dict(a), dict(b)
            for k in sorted(set(da) | set(db)):
                if da.get(k, "absent") != db.get(k, "absent"):
                    what = k if " " in k else f"attribute {k!r}"
                    if isinstance(da.get(k), _TensorValue) and isinstance(db.get(k), _TensorValue):
                        return f"the values of the tensor {what} of {name or 'the model'} changed"
                    old, new = da.get(k), db.get(k)
                    if (isinstance(old, tuple) and isinstance(new, tuple) and old[:2] == new[:2]
                            and old[:1] == ("function",)):
                        return (f"the code or the default arguments of {old[1]} ({what} of {name or 'the model'}) "
                                "changed")
                    return (f"{what} of {name or 'the model'} was {_render(da.get(k, 'absent'))}, "
                            f"now {_render(db.get(k, 'absent'))}")
    return None

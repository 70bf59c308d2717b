"""``bcpc.compile``: the user-facing entry point."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import nn

from bcpc import pipeline
from bcpc.certified import CertifiedModule
from bcpc.errors import ConfigError, InputDomainError, InvalidInputError, UnsupportedOpError
from bcpc.meta import info
from bcpc.passes.lower import METHODS


def parse_norm(norm) -> float:
    """``"l2"`` -> 2, ``"linf"``/``"inf"`` -> inf, ``"l1"`` -> 1, any number p >= 1 -> p."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        table = {"l2": 2.0, "2": 2.0, "linf": math.inf, "inf": math.inf, "l_inf": math.inf, "l1": 1.0, "1": 1.0}
        if key in table:
            return table[key]
        if key.startswith("l"):
            key = key[1:]
        try:
            value = float(key)
        except ValueError:
            raise ConfigError(f"unsupported norm {norm!r}: use 'l2', 'linf', 'l1' or a number p >= 1") from None
    elif isinstance(norm, (int, float)) and not isinstance(norm, bool):
        value = float(norm)
    else:
        raise ConfigError(f"norm must be a string like 'l2' or a number p >= 1, got {type(norm).__name__}")
    if not (value >= 1):  # also rejects NaN
        raise ConfigError(f"unsupported norm p={value}: the perturbation set must be an l_p ball with p >= 1")
    return value


def _check_one_dtype(model: nn.Module) -> None:
    """Certification runs a float64 copy of the whole model: parameters and buffers of several
    floating dtypes (a float32 layer inside a float64 model, with casts between) cannot be copied
    that way, so such a model is refused here, not with a torch dtype error at certify."""
    by_dtype: dict = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            by_dtype.setdefault(t.dtype, []).append(name)
    if len(by_dtype) > 1:
        parts = "; ".join(f"{str(d).replace('torch.', '')}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                          for d, names in by_dtype.items())
        raise UnsupportedOpError(
            f"the model's parameters and buffers have several floating dtypes ({parts}). bcpc certifies with a "
            "float64 copy "
            "of the whole model, which a mixed-precision model with casts between its layers cannot run. Convert "
            "the model to one dtype (model.float() or model.double()) before bcpc.compile.")


def _domain(input_domain) -> tuple:
    """``input_domain`` as ``(low, high)`` of Python floats or None; anything else raises InputDomainError."""
    if input_domain is None:
        return None, None
    if not isinstance(input_domain, (tuple, list)) or len(input_domain) != 2:
        raise InputDomainError(f"input_domain must be a pair (low, high), e.g. (0.0, 1.0); got {input_domain!r}")
    ends = []
    for which, v in zip(("low", "high"), input_domain):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, torch.Tensor) or isinstance(v, (tuple, list)):
            raise InputDomainError(
                f"input_domain's {which} end has several values ({type(v).__name__}): bcpc takes one number per end, "
                "the same for every input coordinate. For per-channel ranges (inputs normalised per channel), put "
                "the normalisation inside the model so that it takes the raw inputs, with input_domain=(0.0, 1.0); "
                "or give the smallest low and the largest high (sound, looser)")
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v)):
            raise InputDomainError(f"input_domain's {which} end must be a number or None, got {v!r}")
        ends.append(None if v is None else float(v))
    return tuple(ends)


def compile(
    model: nn.Module,
    norm="l2",
    *,
    example_input: Optional[torch.Tensor] = None,
    input_shape: Optional[Sequence[int]] = None,
    input_domain: Optional[tuple] = None,
    method: str = "bcp",
    lipschitz_iters: int = 1,
    backend: Optional[str] = None,
    debug: bool = False,
) -> CertifiedModule:
    """Compile ``model`` into a certifying module (see bcpc.certified.CertifiedModule).

    Args:
        model: any torch.fx-traceable nn.Module returning logits ``(batch, classes)``.
        norm: the threat model: ``"l2"`` (default), ``"linf"``, or any p >= 1.
        example_input: one input batch (only its first sample's shape and dtype are used).
        input_shape: alternatively, the per-sample input shape, e.g. ``(1, 28, 28)``.
        input_domain: ``(low, high)`` valid input range (e.g. ``(0.0, 1.0)`` for pixels); either end
            may be None. Intersecting with it is sound and tightens the bounds.
        method: ``"bcp"`` (ball + box), ``"ibp"`` (box only), ``"lipschitz"`` (ball only).
        lipschitz_iters: power-iteration steps per training forward (Lipschitz cache).
        backend: ``None`` (default) runs the emitted module eagerly, with bcpc's fused CPU kernels;
            a ``torch.compile`` backend name (``"inductor"``) compiles the training path
            (``sound=False``: ``loss``, ``forward(..., sound=False)``) on its first call. The
            certification path (``sound=True``) always runs eagerly in float64.
        debug: check graph invariants between passes.

    Returns:
        a :class:`~bcpc.certified.CertifiedModule` sharing the parameters of ``model``:
        ``cert(x, eps)`` gives logits and certified margins, ``cert.certify(x, y, eps)`` a sound
        yes/no per input, ``cert.loss(x, y, eps)`` the certified training loss.

    Raises:
        UnsupportedOpError: an op without a bound rule (naming the node and the source line), a
            product of two perturbed values, in-place writes bcpc cannot rewrite, mixed dtypes.
        TraceError: torch.fx cannot trace the model (e.g. control flow on tensor values).
        ConfigError: an unknown norm, method or backend; ``lipschitz_iters < 1``.
        InvalidInputError: ``model`` is not an nn.Module, or neither ``example_input`` nor
            ``input_shape`` is given.
        InputDomainError: an empty ``input_domain`` (low > high).

    Example::

        import torch, bcpc
        from bcpc.models import conv_small

        cert = bcpc.compile(conv_small().eval(), "l2", input_shape=(1, 28, 28), input_domain=(0.0, 1.0))
        x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        cert.prepare(progress=True)                  # optional: the one-off guaranteed layer norms, now
        cert.certify(x, y, eps=0.1)                  # (4,) bool, sound
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"bcpc.compile expects a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    p = parse_norm(norm)
    if example_input is None:
        if input_shape is None:
            raise InvalidInputError("bcpc.compile needs example_input=<a batch of inputs> or input_shape=(C, H, W) "
                                    "to know the input size (convolution Lipschitz bounds depend on it)")
        param = next(iter(model.parameters()), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        device = param.device if param is not None else None
        example_input = torch.zeros((1,) + tuple(int(s) for s in input_shape), dtype=dtype, device=device)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise InvalidInputError("example_input must be a tensor with a batch dimension, e.g. x[:1]")
    lo, hi = _domain(input_domain)
    if lo is not None and hi is not None and not lo <= hi:
        raise InputDomainError(f"input_domain={input_domain!r} is empty (low > high)")
    if lipschitz_iters < 1:
        raise ConfigError("lipschitz_iters must be >= 1")
    if backend is not None:
        from torch import _dynamo
        if backend not in _dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"unknown torch.compile backend {backend!r}; choose one of "
                              f"{', '.join(_dynamo.list_backends())} (or None for eager)")
    _check_one_dtype(model)
    compiled = pipeline.run(model, example_input, method=method, norm=p, input_domain=(lo, hi),
                            lipschitz_iters=lipschitz_iters, debug=debug)
    num_classes = info(compiled.analysis.output).shape[1]
    return CertifiedModule(
        compiled.lowered, model=model, norm=p, method=method, input_domain=(lo, hi),
        input_shape=tuple(example_input.shape[1:]), num_classes=num_classes, analysis=compiled.analysis,
        canonical=compiled.canonical, backend=backend, cached_attributes=compiled.cached_attributes,
    )

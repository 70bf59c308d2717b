"""Soundness checks users can run on their own models and rules (DESIGN.md §6).

* :func:`sample_perturbations` – points uniformly inside the perturbation set, on its boundary,
  and at its centre (all inside the input domain);
* :func:`pgd_margin` – adversarial points from projected gradient descent on the margin;
* :func:`pgd_ce_last` – the attack of the BCP paper's code (cross-entropy, last iterate), for
  like-for-like comparisons with its published PGD accuracy;
* :func:`apgd_robust` – APGD-CE then APGD-T (AutoAttack's gradient components, via the
  ``torchattacks`` package), the field's standard robust-accuracy attack;
* :func:`record_activations` – every node's value when the *original* model runs on a point;
* :func:`check_soundness` – pushes points through the original model and checks, node by node,
  that each value lies in its certified box and ball, and that no margin falls below its certified
  lower bound. Returns a report; raises AssertionError naming the first violation.

Run them in float64 so that a failure is a logic error, not rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from bcpc.passes.trace import trace
from bcpc.state import copy_in_dtype


def _project(delta: Tensor, eps: Tensor, norm: float) -> Tensor:
    """Bring each sample's perturbation inside the l_p ball of radius eps (a scaling for p < inf)."""
    flat = delta.flatten(1)
    e = eps.reshape(-1, *([1] * (delta.dim() - 1)))
    if math.isinf(norm):
        return torch.maximum(torch.minimum(delta, e), -e)
    n = flat.norm(p=norm, dim=1).clamp_min(1e-30).reshape(e.shape)
    return delta * torch.clamp(e / n, max=1.0)


def _clip_domain(x: Tensor, domain) -> Tensor:
    lo, hi = domain if domain is not None else (None, None)
    if lo is not None or hi is not None:
        x = torch.clamp(x, min=lo, max=hi)
    return x


def _eps_tensor(eps, x: Tensor) -> Tensor:
    e = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    return e.expand(x.shape[0]) if e.dim() == 0 else e


def sample_perturbations(x: Tensor, eps, norm: float = 2.0, n: int = 32, domain=None,
                         generator: Optional[torch.Generator] = None) -> Tensor:
    """(n, B, ...) points of the perturbation set ``||x' - x||_p <= eps`` ∩ domain.

    A third are uniform inside the ball, a third on its sphere (radius exactly eps before the
    domain clip), the rest at box corners scaled onto the sphere (for linf: the cube's vertices);
    the first point is x itself. Clipping to a domain that contains x moves every coordinate
    towards x, so clipped points stay in the ball.
    """
    e = _eps_tensor(eps, x)
    d = x[0].numel()
    pts = [x.clone()]
    g = generator
    for i in range(1, n):
        kind = i % 3
        if kind == 2:  # sign corners
            u = torch.randint(0, 2, x.shape, generator=g, device="cpu").to(x) * 2 - 1
        else:
            u = torch.randn(x.shape, generator=g, device="cpu").to(x)
        if math.isinf(norm):
            if kind == 0:
                u = torch.rand(x.shape, generator=g, device="cpu").to(x) * 2 - 1
            elif kind == 1:
                u = u.sign()
            delta = u * e.reshape(-1, *([1] * (x.dim() - 1)))
        else:
            nrm = u.flatten(1).norm(p=norm, dim=1).reshape(-1, *([1] * (x.dim() - 1)))
            scale = e.reshape(nrm.shape)
            if kind == 0:
                scale = scale * torch.rand(nrm.shape, generator=g, device="cpu").to(x) ** (1.0 / d)
            delta = u / nrm * scale
        pts.append(_clip_domain(x + delta, domain))
    return torch.stack(pts)


def margin_of(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) ``z_y - max_{j != y} z_j``."""
    own = logits.gather(1, y[:, None])
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (own - others.amax(1, keepdim=True)).squeeze(1)


def _input_grad(out: Tensor, x: Tensor) -> Tensor:
    """d out / d x; zeros where no gradient reaches the input (a model that detaches every path:
    the attack cannot move, and the sampled points are what test it)."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(out, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def pgd_margin(model: nn.Module, x: Tensor, y: Tensor, eps, norm: float = 2.0, steps: int = 50,
               step_size: Optional[float] = None, restarts: int = 1, domain=None, random_start: bool = True,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Adversarial points: PGD minimising the margin ``z_y - max_{j != y} z_j``.

    l2: normalised-gradient steps; linf: sign steps; other p: l2 steps scaled back into the l_p
    ball. Step size defaults to ``2.5 * eps / steps``. Keeps the lowest-margin point over all steps
    and restarts (the first restart starts at x unless ``random_start``). Returns (B, ...).
    """
    e = _eps_tensor(eps, x)
    alpha = e * 2.5 / steps if step_size is None else torch.full_like(e, float(step_size))
    shape = (-1,) + (1,) * (x.dim() - 1)
    best = x.clone()
    with torch.no_grad():
        best_m = margin_of(model(x), y)
    for r in range(restarts):
        if random_start and (r > 0 or restarts == 1):
            start = sample_perturbations(x, e * 0.5, norm, n=2, domain=domain, generator=generator)[1]
        else:
            start = x.clone()
        adv = start.detach()
        for _ in range(steps):
            adv.requires_grad_(True)
            m = margin_of(model(adv), y)
            grad = _input_grad(m.sum(), adv)
            with torch.no_grad():
                better = m < best_m
                best = torch.where(better.reshape(shape), adv.detach(), best)
                best_m = torch.where(better, m.detach(), best_m)
                if math.isinf(norm):
                    step = grad.sign()
                else:
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(shape)
                adv = adv.detach() - alpha.reshape(shape) * step
                adv = _clip_domain(x + _project(adv - x, e, norm), domain)
        with torch.no_grad():
            m = margin_of(model(adv), y)
            better = m < best_m
            best = torch.where(better.reshape(shape), adv, best)
            best_m = torch.where(better, m, best_m)
    return best.detach()


def pgd_ce_last(model: nn.Module, x: Tensor, y: Tensor, eps, steps: int = 100,
                step_size: Optional[float] = None, domain=None) -> Tensor:
    """The l2 attack of the BCP paper's evaluation code: ``steps`` ascent steps on the
    cross-entropy, each of length ``step_size`` (default eps/4) along the per-sample normalised
    gradient, projected onto the eps-ball and clipped to ``domain``; starts at x and returns the
    *last* iterate. Usually weaker than :func:`pgd_margin`, which follows the margin and keeps
    the worst point seen (on the shipped MNIST 4C3F: 66.99% against 64.56% accuracy) — not
    always, per input, since the two follow different paths; bcpc reports both so published
    figures can be compared like for like."""
    e = _eps_tensor(eps, x)
    alpha = e / 4 if step_size is None else torch.full_like(e, float(step_size))
    shape = (-1,) + (1,) * (x.dim() - 1)
    adv = x.clone().detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(adv), y, reduction="sum")
        grad = _input_grad(loss, adv)
        with torch.no_grad():
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(shape)
            adv = adv.detach() + alpha.reshape(shape) * step
            adv = _clip_domain(x + _project(adv - x, e, 2.0), domain)
    return adv.detach()


#: how to install the optional attack package beside the CPU torch (its declared dependencies
#: would pull a CUDA build of torch)
TORCHATTACKS_INSTALL = "pip install scipy && pip install --no-deps torchattacks==3.5.1"


def apgd_robust(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float = 2.0, steps: int = 100,
                restarts: int = 1, seed: int = 0) -> Tensor:
    """(B,) bool: still correctly classified after APGD-CE and then APGD-T (targeted, DLR loss,
    every other class as a target) at radius ``eps`` — AutoAttack's two gradient attacks
    (Croce & Hein 2020) as the ``torchattacks`` package implements them, run on float32 copies of
    the inputs in [0, 1] (the package clips to that box). A point counts as robust only if neither
    attack finds an adversarial example; APGD-T only runs on the points APGD-CE left."""
    try:
        import torchattacks
    except ImportError:
        raise ImportError(f"the APGD attack needs the torchattacks package: {TORCHATTACKS_INSTALL}") from None
    if norm not in (2.0, math.inf):
        raise ValueError(f"APGD supports the l2 and linf norms, not l{norm:g}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("APGD (torchattacks) works on inputs in [0, 1]; these inputs leave that box")
    name = "L2" if norm == 2.0 else "Linf"
    model = model.eval()
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    n_classes = int(model(x[:1]).shape[1])
    attacks = [torchattacks.APGD(model, norm=name, eps=float(eps), steps=steps, n_restarts=restarts, seed=seed,
                                 loss="ce"),
               torchattacks.APGDT(model, norm=name, eps=float(eps), steps=steps, n_restarts=restarts, seed=seed,
                                  n_classes=n_classes)]
    for attack in attacks:
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        adv = attack(x[idx].float(), y[idx])
        with torch.no_grad():
            delta = (adv.double() - x[idx].double()).flatten(1).norm(p=2 if norm == 2.0 else math.inf, dim=1)
            if (delta > eps * (1 + 1e-5) + 1e-6).any():
                raise AssertionError("torchattacks returned a point outside the eps-ball")
            robust[idx] = model(adv.to(x.dtype)).argmax(1) == y[idx]
    return robust


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, Tensor):
            # a copy: a later in-place op of the model (h.relu_()) would change the recorded value
            self.values[n.name] = out.clone()
        return out


def record_activations(model: nn.Module, x: Tensor, graph_module: Optional[fx.GraphModule] = None) -> dict:
    """Every tensor value of the model's traced graph on input ``x``, by node name."""
    rec = _Recorder(graph_module if graph_module is not None else trace(model))
    with torch.no_grad():
        rec.run(x)
    return rec.values


@dataclass
class SoundnessReport:
    points: int = 0
    nodes_checked: int = 0
    worst_box_excess: float = -math.inf  # max over points/nodes of (value - upper) or (lower - value)
    worst_ball_excess: float = -math.inf  # max of ||value - center|| - radius
    min_margin_gap: float = math.inf  # min over points of (sampled margin - certified margin)
    violations: list = field(default_factory=list)


def reference_model(model: nn.Module, probe: Tensor, own_dtype: bool = False) -> tuple:
    """``(model, dtype)`` to check bounds against: a float64 copy of the user's model where it runs
    in float64, else (a forward that casts to float32 inside, ``x.float()``, meets the float64
    weights with a float32 tensor) the model itself in its own dtype, whose rounding then counts
    against the bounds (a stricter check). With ``own_dtype`` (the certificates of
    ``cert.model_rounding``) always the model itself, in its own dtype."""
    own = next((t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()),
               probe.dtype)
    if own_dtype:
        return model.eval(), own
    model64 = copy_in_dtype(model, torch.float64).eval()
    try:
        with torch.no_grad():
            model64(probe.to(torch.float64))
        return model64, torch.float64
    except RuntimeError as exc:
        if "dtype" not in str(exc) and "type" not in str(exc):
            raise
    return model.eval(), own


def _tile(t: Tensor, n: int) -> Tensor:
    return t.unsqueeze(0).expand((n,) + tuple(t.shape)).reshape((n * t.shape[0],) + tuple(t.shape[1:]))


def check_soundness(cert, model: nn.Module, x: Tensor, y: Tensor, eps, points: Tensor, atol: float = 1e-9,
                    raise_on_violation: bool = True) -> SoundnessReport:
    """Check sampled/adversarial ``points`` (n, B, ...) against ``cert``'s sound bounds.

    At every node of the user's graph: ``lower - atol <= value <= upper + atol`` and
    ``||value - center||_2 <= radius + atol``; at the output: ``z_y - z_j >= margin_lower_j - atol``
    (tolerances relative to the magnitudes involved). The model must be in eval mode (its output on
    one sample must not depend on the rest of the batch): all points run as one batch.
    """
    bounds = cert.node_bounds(x, eps, sound=True)
    cert_m = cert.margins(x, y, eps, sound=True)
    n = points.shape[0]
    model, dtype = reference_model(model, points[0], own_dtype=getattr(cert, "model_rounding", False))
    flat = points.reshape((-1,) + tuple(points.shape[2:])).to(dtype)
    acts = record_activations(model, flat)
    rep = SoundnessReport(points=int(flat.shape[0]))
    for name, b in bounds.items():
        if name not in acts:
            continue
        a = acts[name].to(torch.float64)
        rep.nodes_checked += 1
        if b.lower is not None:
            lo, hi = _tile(b.lower, n), _tile(b.upper, n)
            tol = atol * (1 + a.abs())
            ex = torch.maximum(lo - a - tol, a - hi - tol).max().item()
            rep.worst_box_excess = max(rep.worst_box_excess, ex)
            if ex > 0:
                rep.violations.append(f"node {name}: a value lies outside its box by {ex:.3e}")
        if b.radius is not None:
            dist = (a - _tile(b.center, n)).reshape(a.shape[0], -1).norm(dim=1)
            r = _tile(b.radius, n)
            ex = (dist - r - atol * (1 + r)).max().item()
            rep.worst_ball_excess = max(rep.worst_ball_excess, ex)
            if ex > 0:
                rep.violations.append(f"node {name}: a value lies outside its ball by {ex:.3e}")
    with torch.no_grad():
        logits = model(flat).to(torch.float64)
    yy = _tile(y, n)
    sampled = logits.gather(1, yy[:, None]) - logits
    own = torch.nn.functional.one_hot(yy, logits.shape[1]).bool()
    gap = (sampled - _tile(cert_m, n)).masked_fill(own, math.inf).min().item()
    rep.min_margin_gap = gap
    if gap < -atol * (1 + logits.abs().max().item()):
        rep.violations.append(f"a sampled margin lies below its certified lower bound by {-gap:.3e}")
    if rep.violations and raise_on_violation:
        raise AssertionError("unsound bound: " + "; ".join(rep.violations[:5]))
    return rep


@dataclass
class AuditReport:
    inputs: int = 0
    certified: int = 0
    attacked: int = 0  # certified inputs attacked (PGD with restarts + sphere samples)
    violations: int = 0  # certified inputs for which some attack point was misclassified (must be 0)
    min_gap: float = math.inf  # min over certified inputs of (attacked margin - certified margin)
    min_attacked_margin: float = math.inf  # min over certified inputs of the attacked margin
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in self.__dict__.items()}


def audit(cert, x: Tensor, y: Tensor, eps, *, pgd_steps: int = 100, restarts: int = 3, sphere_samples: int = 64,
          batch_size: int = 250, seed: int = 0, progress: bool = False) -> AuditReport:
    """Attack every input that ``cert.certify`` accepts and count violations (there must be none).

    For each certified input: PGD on the margin with ``restarts`` restarts (the first from x, the
    others random) plus ``sphere_samples`` points on the sphere / at box corners, all inside the
    input domain, pushed through the model in float64 (in its own dtype where it cannot run in
    float64, :func:`reference_model`; in its own dtype with ``cert.model_rounding``). A violation is an attack point classified other than y. Also reports the smallest gap between the certified margin lower bound and the
    margin actually reached by the attack (it must be >= 0; small values mean a tight bound).
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.time()
    rep = AuditReport()
    model_ref, dtype = reference_model(cert.model, x[:4], own_dtype=getattr(cert, "model_rounding", False))
    gen = torch.Generator().manual_seed(seed)
    for i in tqdm(range(0, x.shape[0], batch_size), disable=not progress, desc="audit", unit="batch"):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        rep.inputs += xb.shape[0]
        ok = cert.certify(xb, yb, eps)
        rep.certified += int(ok.sum())
        if not ok.any():
            continue
        xc, yc = xb[ok].to(torch.float64), yb[ok]
        m_cert = cert.margins(xc, yc, eps)
        m_cert = m_cert.masked_fill(torch.nn.functional.one_hot(yc, m_cert.shape[1]).bool(), math.inf).amin(1)
        pts = sample_perturbations(xc, eps, cert.norm, n=sphere_samples, domain=cert.input_domain, generator=gen)
        adv = pgd_margin(model_ref, xc.to(dtype), yc, eps, cert.norm, steps=pgd_steps, restarts=restarts,
                         domain=cert.input_domain, random_start=False, generator=gen)
        worst = torch.full((xc.shape[0],), math.inf, dtype=torch.float64)
        with torch.no_grad():
            for p in torch.cat([pts.to(dtype), adv[None].to(dtype)]):
                worst = torch.minimum(worst, margin_of(model_ref(p).to(torch.float64), yc))
        rep.attacked += xc.shape[0]
        rep.violations += int((worst <= 0).sum())
        rep.min_gap = min(rep.min_gap, float((worst - m_cert).min()))
        rep.min_attacked_margin = min(rep.min_attacked_margin, float(worst.min()))
    rep.seconds = round(time.time() - t0, 1)
    return rep

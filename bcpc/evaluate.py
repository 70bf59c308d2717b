"""Evaluation: clean accuracy, l2 PGD accuracy, sound verified accuracy, verified accuracy vs eps,
and the paper's tightness measure tau (Fig. 3), written to a JSON report and drawn as PNG plots."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from bcpc.testing import margin_of, pgd_ce_last, pgd_margin


@torch.no_grad()
def tightness(cert, x: torch.Tensor, eps: float) -> dict:
    """Paper Fig. 3: tau(x) = mean over ordered class pairs (j, i != j) of the translation t_i(x; j),
    with BCP (sound margins, every class as reference) and with the global Lipschitz bound
    (``rho * ||W_j - W_i||``, ``rho`` the sound ball radius at the last layer's input)."""
    c = cert.num_classes
    taus = torch.zeros(x.shape[0], dtype=torch.float64)
    for j in range(c):
        y = torch.full((x.shape[0],), j, dtype=torch.long)
        out = cert(x, eps, y)
        z = out.logits
        t = (z[:, j:j + 1] - z) - out.margins  # translation of class i when j is the reference
        t = t.masked_fill(torch.nn.functional.one_hot(y, c).bool(), 0.0)
        taus += t.sum(1) / (c * (c - 1))
    lip = None
    an = cert.analysis
    if an.last_affine is not None:
        nb = cert.node_bounds(x[:1], eps)
        rho = float(nb[an.last_affine.args[0].name].radius[0])
        w = cert.model.get_parameter(an.last_affine.args[1].target).detach().double()
        dist = torch.cdist(w, w)
        lip = rho * dist.sum().item() / (c * (c - 1))
    return {"tau_bcp": taus.tolist(), "tau_lipschitz": lip}


def evaluate(cert, x: torch.Tensor, y: torch.Tensor, eps: float, *, pgd_steps: int = 100,
             pgd_step_size: Optional[float] = None, pgd_restarts: int = 1, eps_curve: Sequence[float] = (),
             batch_size: int = 500, tightness_n: int = 0, progress: bool = True, ctx=None,
             paper_attack: bool = False) -> dict:
    """Metrics on (x, y). PGD: l2, ``pgd_steps`` steps of size ``pgd_step_size`` (default eps/4, as
    the paper's code) on the margin, keeping the worst point seen; the first restart from x
    itself, later ones from random points. With ``paper_attack`` also ``pgd_acc_paper_attack``:
    the BCP paper's own attack (:func:`bcpc.testing.pgd_ce_last`: cross-entropy, last iterate,
    same steps and step size), weaker, for comparing with its published PGD accuracy.

    With ``ctx`` (a :class:`bcpc.train.Dist` under torchrun) each rank evaluates every
    ``world``-th batch and the counts are summed over ranks."""
    from bcpc.train import Dist

    ctx = ctx or Dist()
    model = cert.model.eval()
    norm = cert.norm
    dom = cert.input_domain
    step = eps / 4 if pgd_step_size is None else pgd_step_size
    n = x.shape[0]
    clean = robust = robust_paper = verified = 0
    curve = {float(e): 0 for e in eps_curve}
    t0 = time.time()
    batches = range(ctx.rank * batch_size, n, batch_size * ctx.world)
    for i in tqdm(batches, disable=not progress or not ctx.main, desc="evaluate", unit="batch"):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        with torch.no_grad():
            correct = model(xb).argmax(1) == yb
        clean += correct.sum().item()
        if pgd_steps > 0:
            adv = pgd_margin(model, xb, yb, eps, norm, steps=pgd_steps, step_size=step, restarts=pgd_restarts,
                             domain=dom, random_start=False)
            with torch.no_grad():
                robust += ((margin_of(model(adv), yb) > 0) & correct).sum().item()
            if paper_attack:
                adv = pgd_ce_last(model, xb, yb, eps, steps=pgd_steps, step_size=step, domain=dom)
                with torch.no_grad():
                    robust_paper += ((model(adv).argmax(1) == yb) & correct).sum().item()
        verified += cert.certify(xb, yb, eps).sum().item()
        for e in curve:
            curve[e] += cert.certify(xb, yb, e).sum().item()
    keys = list(curve)
    clean, robust, robust_paper, verified, *vals = ctx.sum([clean, robust, robust_paper, verified]
                                                          + [curve[e] for e in keys])
    curve = dict(zip(keys, vals))
    report = {
        "n": n, "eps": eps, "norm": "linf" if math.isinf(norm) else f"l{norm:g}",
        "clean_acc": clean / n,
        "pgd_acc": robust / n if pgd_steps > 0 else None,
        "verified_acc": verified / n,
        "pgd": {"steps": pgd_steps, "step_size": step, "restarts": pgd_restarts, "random_start": pgd_restarts > 1,
                "loss": "margin", "keeps": "worst point seen"},
        "verified_acc_vs_eps": {f"{e:g}": v / n for e, v in curve.items()},
        "seconds": round(time.time() - t0, 1),
        "processes": ctx.world,
    }
    if paper_attack and pgd_steps > 0:
        report["pgd_acc_paper_attack"] = robust_paper / n
        report["pgd_paper_attack"] = {"steps": pgd_steps, "step_size": step, "loss": "cross-entropy",
                                      "keeps": "last iterate"}
    if tightness_n:
        report["tightness"] = tightness(cert, x[:tightness_n], eps)
    return report


def write_report(report: dict, out_dir) -> list:
    """Write report.json and the plots (verified accuracy vs eps; tightness violin). Returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json"]
    paths[0].write_text(json.dumps(report, indent=2, sort_keys=True))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install bcpc[plots]
        return paths
    curve = report.get("verified_acc_vs_eps") or {}
    if curve:
        es = sorted(curve, key=float)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([float(e) for e in es], [100 * curve[e] for e in es], marker="o")
        ax.set_xlabel("l2 radius eps")
        ax.set_ylabel("verified accuracy (%)")
        ax.set_title("verified accuracy vs eps (sound)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / "verified_vs_eps.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    tight = report.get("tightness")
    if tight:
        fig, ax = plt.subplots(figsize=(4, 3.5))
        ax.violinplot([tight["tau_bcp"]], showmeans=True)
        if tight["tau_lipschitz"] is not None:
            ax.axhline(tight["tau_lipschitz"], ls="--", color="k", label="global Lipschitz")
            ax.legend()
        ax.set_xticks([1], ["BCP"])
        ax.set_ylabel("tightness tau (lower is tighter)")
        fig.tight_layout()
        p = out / "tightness.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths

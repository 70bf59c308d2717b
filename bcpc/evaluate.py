"""Evaluation: clean accuracy, l2 PGD accuracy, sound verified accuracy, verified accuracy vs eps,
and the paper's tightness measure tau (Fig. 3); sound certification and the attack audit of a data
set in chunks with a progress bar counting images; the plots of ``bcpc evaluate`` (one run, or
several overlaid with ``--plot-compare``)."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from bcpc.testing import apgd_robust, margin_of, pgd_ce_last, pgd_margin


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
             batch_size: int = 100, tightness_n: int = 0, progress: bool = True, ctx=None,
             paper_attack: bool = False, apgd_steps: int = 0) -> dict:
    """Metrics on (x, y). PGD: l2, ``pgd_steps`` steps of size ``pgd_step_size`` (default eps/4, as
    the paper's code) on the margin, keeping the worst point seen; the first restart from x
    itself, later ones from random points. With ``paper_attack`` also ``pgd_acc_paper_attack``:
    the BCP paper's own attack (:func:`bcpc.testing.pgd_ce_last`: cross-entropy, last iterate,
    same steps and step size), weaker, for comparing with its published PGD accuracy. With
    ``apgd_steps > 0`` also ``apgd_acc``: APGD-CE then APGD-T (AutoAttack's gradient attacks, via
    torchattacks; :func:`bcpc.testing.apgd_robust`), ``robust_acc_all_attacks`` (correct under every
    attack run) and ``certified_broken_by_apgd`` (certified inputs APGD misclassifies: a soundness
    bug if ever above 0, so it raises).

    With ``ctx`` (a :class:`bcpc.train.Dist` under torchrun) each rank evaluates every
    ``world``-th batch and the counts are summed over ranks. ``progress`` shows a bar counting
    images (this rank's), with rate and time left.

    Returns:
        a dict of fractions and settings: ``n``, ``eps``, ``norm``, ``clean_acc``, ``pgd_acc``
        (None without PGD), ``verified_acc``, ``pgd`` (the attack), ``verified_acc_vs_eps``,
        ``seconds``, ``processes``, and ``pgd_acc_paper_attack`` / ``tightness`` where asked for;
        :func:`bcpc.report.build` turns it into the common report (percent).

    Example::

        rep = evaluate(cert, x[:200], y[:200], eps=1.58, pgd_steps=20, eps_curve=(0.5, 1.0))
        rep["verified_acc"] <= rep["pgd_acc"] <= rep["clean_acc"]
    """
    from bcpc.train import Dist

    ctx = ctx or Dist()
    model = cert.model.eval()
    norm = cert.norm
    dom = cert.input_domain
    step = eps / 4 if pgd_step_size is None else pgd_step_size
    n = x.shape[0]
    clean = robust = robust_paper = robust_apgd = robust_all = verified = seen = 0
    curve = {float(e): 0 for e in eps_curve}
    t0 = time.time()
    batches = range(ctx.rank * batch_size, n, batch_size * ctx.world)
    bar = tqdm(total=sum(min(batch_size, n - i) for i in batches), disable=not progress or not ctx.main,
               desc="evaluate", unit="img", dynamic_ncols=True)
    for i in batches:
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        with torch.no_grad():
            correct = model(xb).argmax(1) == yb
        clean += correct.sum().item()
        survives = correct.clone()  # correct under every attack run so far
        if pgd_steps > 0:
            adv = pgd_margin(model, xb, yb, eps, norm, steps=pgd_steps, step_size=step, restarts=pgd_restarts,
                             domain=dom, random_start=False)
            with torch.no_grad():
                ok = (margin_of(model(adv), yb) > 0) & correct
            robust += ok.sum().item()
            survives &= ok
            if paper_attack:
                adv = pgd_ce_last(model, xb, yb, eps, steps=pgd_steps, step_size=step, domain=dom)
                with torch.no_grad():
                    ok = (model(adv).argmax(1) == yb) & correct
                robust_paper += ok.sum().item()
                survives &= ok
        certified = cert.certify(xb, yb, eps)
        if apgd_steps > 0:
            ok = apgd_robust(model, xb, yb, eps, norm, steps=apgd_steps)
            if (certified & ~ok).any():
                raise AssertionError(f"APGD broke {int((certified & ~ok).sum())} certified input(s) of batch {i}: "
                                     "a soundness bug; please report it with this model")
            robust_apgd += ok.sum().item()
            survives &= ok
        robust_all += survives.sum().item()
        verified += certified.sum().item()
        for e in curve:
            curve[e] += cert.certify(xb, yb, e).sum().item()
        seen += xb.shape[0]
        bar.update(xb.shape[0])
        bar.set_postfix_str(f"clean {100 * clean / seen:.1f}% verified {100 * verified / seen:.1f}%", refresh=False)
    bar.close()
    keys = list(curve)
    clean, robust, robust_paper, robust_apgd, robust_all, verified, *vals = ctx.sum(
        [clean, robust, robust_paper, robust_apgd, robust_all, verified] + [curve[e] for e in keys])
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
    if apgd_steps > 0:
        report["apgd_acc"] = robust_apgd / n
        report["apgd"] = {"steps": apgd_steps, "attacks": "APGD-CE, then APGD-T (DLR, every other class)",
                          "implementation": "torchattacks", "restarts": 1}
        report["certified_broken_by_apgd"] = 0  # checked per batch above
    if apgd_steps > 0 or (pgd_steps > 0 and paper_attack):
        report["robust_acc_all_attacks"] = robust_all / n
    if tightness_n:
        report["tightness"] = tightness(cert, x[:tightness_n], eps)
    return report


def certified_count(cert, x: torch.Tensor, y: torch.Tensor, eps: float, *, batch_size: int = 100,
                    progress: bool = False, ctx=None) -> int:
    """How many of (x, y) ``cert.certify`` accepts (sound), in chunks of ``batch_size`` with a
    progress bar counting images. Under torchrun (``ctx``) each rank takes every ``world``-th
    chunk and the counts are summed.

    Example::

        certified_count(cert, x, y, eps=1.58, progress=True) / len(x)   # verified accuracy
    """
    from bcpc.train import Dist

    ctx = ctx or Dist()
    n = x.shape[0]
    starts = range(ctx.rank * batch_size, n, batch_size * ctx.world)
    ok = seen = 0
    with tqdm(total=sum(min(batch_size, n - i) for i in starts), disable=not progress or not ctx.main,
              desc="certify", unit="img", dynamic_ncols=True) as bar:
        for i in starts:
            ok += int(cert.certify(x[i:i + batch_size], y[i:i + batch_size], eps).sum())
            seen += min(batch_size, n - i)
            bar.update(min(batch_size, n - i))
            bar.set_postfix_str(f"verified {100 * ok / seen:.1f}%", refresh=False)
    (ok,) = ctx.sum([ok])
    return int(ok)


def audit_all(cert, x: torch.Tensor, y: torch.Tensor, eps: float, *, pgd_steps: int = 100, restarts: int = 3,
              sphere_samples: int = 64, batch_size: int = 100, seed: int = 0, progress: bool = False):
    """:func:`bcpc.testing.audit` over (x, y) in chunks of ``batch_size``, with a progress bar
    counting images and the violations so far. Chunk ``k`` draws its random points with seed
    ``seed + k`` (one chunk: exactly ``audit(..., seed=seed)``). Returns the summed AuditReport."""
    import math

    from bcpc.testing import AuditReport, audit

    total = AuditReport()
    t0 = time.time()
    n = x.shape[0]
    with tqdm(total=n, disable=not progress, desc="audit", unit="img", dynamic_ncols=True) as bar:
        for k, i in enumerate(range(0, n, batch_size)):
            rep = audit(cert, x[i:i + batch_size], y[i:i + batch_size], eps, pgd_steps=pgd_steps, restarts=restarts,
                        sphere_samples=sphere_samples, batch_size=batch_size, seed=seed + k, progress=False)
            for key in ("inputs", "certified", "attacked", "violations"):
                setattr(total, key, getattr(total, key) + getattr(rep, key))
            total.min_gap = min(total.min_gap, rep.min_gap)
            total.min_attacked_margin = min(total.min_attacked_margin, rep.min_attacked_margin)
            bar.update(rep.inputs)
            gap = "-" if math.isinf(total.min_gap) else f"{total.min_gap:.3g}"
            bar.set_postfix_str(f"certified {total.certified} violations {total.violations} min gap {gap}",
                                refresh=False)
    total.seconds = round(time.time() - t0, 1)
    return total


def plot_paths(out) -> tuple:
    """``(report.json path, prefix of the plot files)`` for ``--out``: a ``.json`` file (plots
    next to it, ``<stem>_verified_vs_eps.png``), or a folder (``report.json`` and the plots in it)."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        return out, str(out.with_name(out.stem + "_"))
    return out / "report.json", str(out) + os.sep


def _title(rep: dict) -> str:
    model, data = rep["model"], rep.get("data", {})
    where = model.get("checkpoint") or model.get("weights") or model.get("factory")
    name = model["name"] + (f" ({Path(where).name})" if where and Path(where).name != model["name"] else "")
    split = f"{data['source']} {data['split']}" if "split" in data else data.get("source", "")
    return f"{name}, {split}, n={data.get('n', '?'):,}".replace(", ,", ",")


def _curve(rep: dict) -> list:
    res = rep["results"]
    pts = {float(e): v for e, v in (res.get("verified_pct_vs_eps") or {}).items()}
    pts.setdefault(float(rep["threat"]["eps"]), res["verified_pct"])
    return sorted(pts.items())


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install bcpc[plots]
        return None
    return plt


#: the BCP paper's published figures for its settings (Table 2; Fig. 3's mean tightening where the
#: paper names the model: MNIST's 4C3F), keyed by (model, dataset source, norm, eps): drawn into
#: the plots of a run in the same setting
PAPER_FIGURES = {
    ("mnist_4c3f", "mnist", "l2", 1.58): {"verified_pct": 47.95, "clean_pct": 92.41, "tighter_pct": 55.4},
    ("cifar_4c3f", "cifar10", "l2", round(36 / 255, 4)): {"verified_pct": 49.58, "clean_pct": 63.88},
    ("cifar_6c2f", "cifar10", "l2", round(36 / 255, 4)): {"verified_pct": 51.30, "clean_pct": 65.72},
    ("cifar_wrn", "cifar10", "l2", round(36 / 255, 4)): {"verified_pct": 50.33, "clean_pct": 64.79},
}


def paper_figures(rep: dict) -> Optional[dict]:
    """The paper's figures if ``rep`` is a run of the paper's setting (model, data, norm, eps), else None."""
    eps = round(float(rep["threat"]["eps"]), 4)
    key = (rep["model"].get("name"), (rep.get("data") or {}).get("source", "").lower(), rep["threat"]["norm"], eps)
    return PAPER_FIGURES.get(key)


def write_plots(rep: dict, prefix) -> list:
    """The plots of one evaluate report (:mod:`bcpc.report` layout): verified accuracy vs eps
    (with clean and PGD accuracy, from 0), and the tightness violin where tau was measured.
    Files are ``<prefix>verified_vs_eps.png`` and ``<prefix>tightness.png``. Returns the paths
    written; none without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    prefix = str(prefix)
    res, norm = rep["results"], rep["threat"]["norm"]
    paths = []
    if res.get("verified_pct_vs_eps"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        es, vs = zip(*_curve(rep))
        ax.plot(es, vs, marker="o", label="verified (sound)")
        ax.axhline(res["clean_pct"], ls=":", color="k", label="clean")
        if "pgd_pct" in res:
            ax.plot([rep["threat"]["eps"]], [res["pgd_pct"]], marker="x", ls="none", color="C3", markersize=9,
                    label=f"PGD at eps {rep['threat']['eps']:g}")
        paper = paper_figures(rep)
        if paper:
            ax.plot([rep["threat"]["eps"]], [paper["verified_pct"]], marker="*", ls="none", color="C2", markersize=11,
                    label=f"BCP paper, Table 2: {paper['verified_pct']}% verified")
        ax.set_xlabel(f"{norm} radius eps")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(left=0)
        ax.set_title(f"verified accuracy vs eps\n{_title(rep)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = Path(prefix + "verified_vs_eps.png")
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    tau = (rep.get("details") or {}).get("tau_bcp_per_input")
    if tau:
        fig, ax = plt.subplots(figsize=(4.5, 3.8))
        ax.violinplot([tau], showmeans=True)
        ax.plot([], [], color="C0", lw=6, alpha=0.5, label=f"{rep['method']}: tau per input (mean: bar)")
        if "tau_lipschitz" in res:
            ax.axhline(res["tau_lipschitz"], ls="--", color="k", label="global Lipschitz")
            paper = paper_figures(rep)
            if paper and "tighter_pct" in paper:
                ax.axhline(res["tau_lipschitz"] * (1 - paper["tighter_pct"] / 100), ls=":", color="C2",
                           label=f"paper's mean tightening ({paper['tighter_pct']}%, Fig. 3)")
        ax.set_xticks([1], [rep["method"]])
        ax.set_ylim(0, 1.15 * max(max(tau), res.get("tau_lipschitz", 0)))
        ax.set_ylabel("tightness tau (lower is tighter)")
        ax.set_title(f"tightness at eps {rep['threat']['eps']:g}, {len(tau)} inputs\n{_title(rep)}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        p = Path(prefix + "tightness.png")
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_compare(reports: list, labels: list, path) -> Path:
    """Verified accuracy vs eps of several evaluate reports in one plot (legend: ``labels``),
    from 0 to 100%. Raises :class:`~bcpc.errors.MissingToolError` without matplotlib."""
    from bcpc.errors import MissingToolError

    plt = _pyplot()
    if plt is None:
        raise MissingToolError("--plot-compare needs matplotlib, which is not installed (pip install matplotlib, "
                               "or bcpc[plots])")
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (rep, label) in enumerate(zip(reports, labels)):
        es, vs = zip(*_curve(rep))
        ax.plot(es, vs, marker="o", color=f"C{k}", label=f"{label}: verified")
        if "pgd_pct" in rep["results"]:
            ax.plot([rep["threat"]["eps"]], [rep["results"]["pgd_pct"]], marker="x", ls="none", color=f"C{k}",
                    markersize=9, label=f"{label}: PGD")
    norms = sorted({r["threat"]["norm"] for r in reports})
    ax.set_xlabel(f"{'/'.join(norms)} radius eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.set_title("verified accuracy vs eps (sound)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Peer comparison: the cost of auto_LiRPA's certified training steps (l2 IBP and CROWN-IBP).

    .venv-peers/bin/python benchmarks/peers.py [--models mnist_4c3f,cifar_6c2f,resnet_small]
                                               [--batches 50,128] [--reps 5] [--eps 0.1412]

Runs in its own virtual environment, because auto-lirpa 0.3 (the newest release on PyPI) pins
numpy<2 and was written for torch<1.13:

    python3.11 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.13.0
    .venv-peers/bin/pip install "numpy<2"
    .venv-peers/bin/pip install --no-deps auto-lirpa
    .venv-peers/bin/pip install packaging appdirs pyyaml tqdm
    .venv-peers/bin/pip install -e . --no-deps
    .venv-peers/bin/pip install networkx "numba>=0.59"

auto-lirpa 0.3 does not run on torch 2.13 as shipped; ``import_auto_lirpa`` below patches three
torch-API drifts at run time (nothing in site-packages is edited; none changes a bound):
``torch.onnx.symbolic_helper._set_opset_version`` (removed), ``torch._C.Node.__getitem__``
(removed) and the ``remove_duplicate`` keyword that ``nn.Module.parameters()`` now passes to
``_named_members`` (which BoundedModule overrides with the old signature).

For each model and batch, one training step (loss forward + backward + SGD step, lr 1e-6) is timed
for (a) plain cross-entropy, (b) auto_LiRPA's IBP certified loss and (c) auto_LiRPA's CROWN-IBP
certified loss, each the median of --reps after 2 warm-ups; ratios are to (a). The certified
loss is the one of auto_LiRPA's training examples: a forward pass of the BoundedModule on the
BoundedTensor, lower bounds of the margins y_true - y_j (specification matrix C, j != true),
then cross-entropy on the negated lower bounds padded with a zero column (label 0). (c) is the
pure CROWN-IBP bound (``method='CROWN-IBP'``, IBP intermediate bounds + a CROWN backward pass
for the margins), as in the simple_training example; cifar_training's warm-up mix
kappa*CROWN-IBP + (1-kappa)*IBP costs about the same (the IBP final bound reuses the
intermediate bounds) and is pure IBP once eps reaches its target.

The perturbation is ``PerturbationLpNorm(norm=2, eps=eps)``, which auto_LiRPA supports for both
methods: IBP bounds the first linear/conv layer by the weights' l2 row norms times eps, CROWN
concretises with the dual (l2) norm. auto_LiRPA ignores x_L/x_U for l2, so the [0, 1] input box
is not intersected with the ball (bcpc's ``input_domain``); that loosens its bounds slightly and
does not change the cost.
"""
import argparse
import inspect
import os
import time

import torch
import torch.nn.functional as F

from bcpc import models
from bench import median_time, shape_of  # benchmarks/ is on sys.path when run as a script

def import_auto_lirpa():
    """Import auto_LiRPA (0.3) on a recent torch, patching the torch-API drifts it trips on."""
    import torch.onnx.symbolic_helper as sh

    if not hasattr(sh, "_set_opset_version"):
        # the opset global moved; auto_LiRPA's parse_graph sets opset 12 before _optimize_graph
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        def _set_opset_version(version):
            GLOBALS.export_onnx_opset_version = version

        sh._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):
        # node[attr] was removed; the typed accessor named by kindOf (f, i, s, t, fs, is, ...) remains
        torch._C.Node.__getitem__ = lambda self, key: getattr(self, self.kindOf(key))(key)
    import auto_LiRPA
    from auto_LiRPA import BoundedModule

    named = BoundedModule._named_members
    if "remove_duplicate" not in inspect.signature(named).parameters:
        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            return named(self, get_members_fn, prefix, recurse)  # dedups by identity anyway

        BoundedModule._named_members = _named_members
    return auto_LiRPA


def spec_matrix(y, num_classes, dtype):
    """C (batch, classes-1, classes): row j is e_y - e_j for each j != y (margins of the true class)."""
    eye = torch.eye(num_classes, dtype=dtype)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    keep = y.unsqueeze(1) != torch.arange(num_classes).unsqueeze(0)
    return c[keep].view(y.size(0), num_classes - 1, num_classes)


def robust_ce(lb):
    """auto_LiRPA's certified loss: CE on -[0, lb] with label 0."""
    padded = torch.cat((torch.zeros(lb.size(0), 1, dtype=lb.dtype), lb), dim=1)
    return F.cross_entropy(-padded, torch.zeros(lb.size(0), dtype=torch.long))


def _error_text(e, limit=160):
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def measure_auto_lirpa(model, x, y, eps, reps):
    """Seconds per training step: plain CE, auto_LiRPA IBP and CROWN-IBP certified losses (l2, eps).

    Returns plain_step, ibp_step, crown_ibp_step (seconds), ibp_ratio, crown_ibp_ratio (to the plain
    step), build_s (BoundedModule conversion), ibp_sound / crown_ibp_sound (the bounds are below the
    margins at the centre x) and, where a method could not run, ibp_error / crown_ibp_error (a
    conversion failure is reported under both). ``model`` is trained in place (lr 1e-6).
    """
    lirpa = import_auto_lirpa()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # tiny steps: weights change, bounds stay finite

    def plain_step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {"plain_step": median_time(plain_step, reps)}
    try:
        t = time.perf_counter()
        bounded = lirpa.BoundedModule(model, torch.empty_like(x[:2]))  # shares the model's parameters
        out["build_s"] = time.perf_counter() - t
    except Exception as e:  # e.g. an operator auto_LiRPA cannot bound
        out["ibp_error"] = out["crown_ibp_error"] = "BoundedModule: " + _error_text(e)
        return out
    bounded.train()
    bopt = torch.optim.SGD(bounded.parameters(), lr=1e-6)
    ptb = lirpa.PerturbationLpNorm(norm=2, eps=eps)
    c = spec_matrix(y, bounded.final_shape[-1], x.dtype)

    def lower_bounds(method):
        xb = lirpa.BoundedTensor(x, ptb)
        logits = bounded(xb)  # as in auto_LiRPA's examples: sets the forward values (and BN batch stats)
        lb, _ = bounded.compute_bounds(C=c, method=method, bound_upper=False)
        return logits, lb

    for key, method in (("ibp", "IBP"), ("crown_ibp", "CROWN-IBP")):
        def step(method=method):
            loss = robust_ce(lower_bounds(method)[1])
            bopt.zero_grad()
            loss.backward()
            bopt.step()

        try:
            out[f"{key}_step"] = median_time(step, reps)
            out[f"{key}_ratio"] = out[f"{key}_step"] / out["plain_step"]
            with torch.no_grad():
                logits, lb = lower_bounds(method)
                margins = torch.einsum("bsk,bk->bs", c, logits)
                out[f"{key}_sound"] = bool((lb <= margins + 1e-4 * (1 + margins.abs())).all())
        except Exception as e:
            out[f"{key}_error"] = _error_text(e)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist_4c3f,cifar_6c2f,resnet_small")
    ap.add_argument("--batches", default="50,128")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--eps", type=float, default=36 / 255, help="l2 radius (bench.py uses 36/255)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import warnings

    warnings.filterwarnings("ignore")  # torch.jit / ONNX-export deprecation chatter from auto_LiRPA's tracer
    lirpa = import_auto_lirpa()
    print(f"torch {torch.__version__}, auto_LiRPA {getattr(lirpa, '__version__', '?')}, {args.threads} thread(s), "
          f"l2 eps {args.eps:.4f}, median of {args.reps}; ratios are to the plain training step of the same "
          "model and batch")
    print(f"{'model':>13} {'batch':>5} {'plain step':>10} | {'IBP step':>10} {'ratio':>7} | "
          f"{'CROWN-IBP':>10} {'ratio':>7} | {'build s':>7} | notes")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            torch.manual_seed(0)
            model = models.ARCHITECTURES[name]()
            x = torch.rand((batch,) + shape_of(name))
            y = torch.randint(0, 10, (batch,))
            r = measure_auto_lirpa(model, x, y, args.eps, args.reps)
            cells, notes = [], []
            for key in ("ibp", "crown_ibp"):
                if f"{key}_step" in r:
                    cells.append(f"{1000 * r[key + '_step']:8.1f}ms {r[key + '_ratio']:6.2f}x")
                    if not r.get(f"{key}_sound", True):
                        notes.append(f"{key}: lower bound above the centre margin!")
                else:
                    cells.append(f"{'failed':>10} {'-':>7}")
                    if r.get(f"{key}_error") not in notes:
                        notes.append(r[f"{key}_error"])
            build = f"{r['build_s']:7.2f}" if "build_s" in r else f"{'-':>7}"
            print(f"{name:>13} {batch:>5} {1000 * r['plain_step']:8.1f}ms | {cells[0]} | {cells[1]} | {build} | "
                  f"{'; '.join(notes)}", flush=True)


if __name__ == "__main__":
    main()

"""What the box adds to the ball: BCP against the global Lipschitz bound on a trained model.

    python benchmarks/bcp_gain.py --checkpoint models/mnist_4c3f_minmax.pt [--split test] [--n 10000] [--eps 1.58]

Certifies the same images twice, soundly (guaranteed layer norms, float64): with the model's
BCP certificate (ball ∩ box, ``method="bcp"``) and with the global Lipschitz bound alone
(``method="lipschitz"``: the ball, the product of the layer norms, and the pairwise last-layer
rows). Prints verified accuracy with each, how many images only BCP certifies, the mean
certified worst-case margin with each, and on how many (image, class) pairs the box binds (the
BCP margin is above the ball's). The BCP margin is never below the ball's: the box can only
cut the ball's set, never grow it.
"""
import argparse
import time

import torch

import bcpc
from bcpc import data
from bcpc.train import load_trained


def checkpoint_parser(doc: str, split: str, n: int) -> argparse.ArgumentParser:
    """The arguments every trained-model benchmark takes: checkpoint, split, n, eps."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a bcpc checkpoint (best.pt / models/*.pt)")
    ap.add_argument("--split", default=split, choices=["train", "val", "test"], help=f"data split (default {split})")
    ap.add_argument("--n", type=int, default=n, help=f"images, from the first (default {n})")
    ap.add_argument("--eps", type=float, default=None, help="l2 radius (default: the run's evaluation eps)")
    return ap


def load(args) -> tuple:
    """``(model, cert, cfg, eps, x, y)`` of a :func:`checkpoint_parser` command line."""
    model, cert, cfg, _ = load_trained(args.checkpoint)
    eps = cfg.target_eps_eval if args.eps is None else args.eps
    x, y = data.load(cfg.dataset, cfg.data_root, args.split)
    return model, cert, cfg, eps, x[:args.n], y[:args.n]


def global_bound(model, cfg, example):
    """The model compiled with the global Lipschitz bound alone (``method="lipschitz"``)."""
    return bcpc.compile(model, cfg.norm, example_input=example, method="lipschitz",
                        input_domain=tuple(cfg.input_domain) if cfg.input_domain else None)


def main():
    ap = checkpoint_parser(__doc__, "test", 10000)
    ap.add_argument("--batch-size", type=int, default=500, help="images per certify call (default 500)")
    args = ap.parse_args()
    model, cert, cfg, eps, x, y = load(args)
    glob = global_bound(model, cfg, x[:1])
    t0 = time.perf_counter()
    v_bcp = v_glob = only_bcp = binds = pairs = 0
    m_bcp = m_glob = 0.0
    for i in range(0, len(x), args.batch_size):
        xb, yb = x[i:i + args.batch_size], y[i:i + args.batch_size]
        oa, ob = cert(xb, eps, yb), glob(xb, eps, yb)
        ma, mb = oa.margins, ob.margins
        a = ma.amin(1) > cert.threshold(oa.logits)  # as CertifiedModule.certify (+inf at the label)
        b = mb.amin(1) > glob.threshold(ob.logits)
        v_bcp += int(a.sum())
        v_glob += int(b.sum())
        only_bcp += int((a & ~b).sum())
        if (ma < mb - 1e-9).any():
            raise AssertionError("a BCP margin below the global bound's: the box grew the set (a bug)")
        finite = torch.isfinite(ma)
        binds += int((ma[finite] > mb[finite] + 1e-9 * (1 + mb[finite].abs())).sum())
        pairs += int(finite.sum())
        m_bcp += float(ma.masked_fill(~finite, float("inf")).amin(1).sum())
        m_glob += float(mb.masked_fill(~finite, float("inf")).amin(1).sum())
    n = len(x)
    print(f"{args.checkpoint} ({cfg.model}), {args.split} split, first {n} images, l2 eps {eps:g}; "
          f"sound certificates ({time.perf_counter() - t0:.0f} s)")
    print(f"verified, BCP (ball and box):          {100 * v_bcp / n:6.2f}%")
    print(f"verified, global Lipschitz bound:      {100 * v_glob / n:6.2f}%")
    print(f"certified by BCP only:                 {only_bcp} images")
    print(f"mean worst-case certified margin: BCP {m_bcp / n:.4f}, global {m_glob / n:.4f}")
    print(f"(image, class) pairs where the box binds: {binds} of {pairs} ({100 * binds / max(1, pairs):.2f}%)")


if __name__ == "__main__":
    main()

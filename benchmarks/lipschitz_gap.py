"""Per-layer gap between the power-iteration estimate and the guaranteed Lipschitz bound.

    python benchmarks/lipschitz_gap.py [--model mnist_4c3f] [--seed 0] [--iters 1000]

Prints, for each affine layer of the model at random init (seed given): the estimate after the
cache's 50 warm-up steps (what training starts from), a fully converged power iteration in float64,
the guaranteed upper bound used by certification, their gap, and the time the bound took.
"""
import argparse
import time

import torch

import bcpc
from bcpc import models


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist_4c3f", choices=sorted(models.ARCHITECTURES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=1000)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = models.ARCHITECTURES[args.model]().eval()
    shape = (1, 1, 28, 28) if args.model.startswith("mnist") else (1, 3, 32, 32)
    cert = bcpc.compile(model, example_input=torch.zeros(shape))
    t0 = time.perf_counter()
    rows = cert.lipschitz_table(converge_iters=args.iters)
    print(f"model {args.model}, seed {args.seed}, converged = {args.iters} power-iteration steps in float64")
    print(f"{'layer':>6} {'kind':>7} {'input':>14} {'estimate@50':>12} {'converged':>12} {'guaranteed':>12} {'gap %':>7}")
    for r in rows:
        gap = 100 * (r["upper"] / r["converged"] - 1)
        print(f"{r['node']:>6} {r['kind']:>7} {str(r['in_shape']):>14} {r['estimate']:12.6f} {r['converged']:12.6f} "
              f"{r['upper']:12.6f} {gap:7.3f}")
    print(f"total {time.perf_counter() - t0:.2f} s (bounds + convergence runs)")


if __name__ == "__main__":
    main()

"""Per-layer gap between the power-iteration estimate and the guaranteed Lipschitz bounds.

    python benchmarks/lipschitz_gap.py [--model mnist_4c3f] [--seed 0] [--iters 1000] [--checkpoint PATH]

Prints, for each affine layer of the model (at random init with the seed given, or the weights of
a bcpc checkpoint): the estimate the training cache holds, a converged power iteration in float64
(a lower bound on the true norm), the guaranteed upper bound certification uses (for convolutions
up to ``EXACT_MAX_DIM`` coordinates: the certified exact norm), the circular-embedding bound it
replaces, the gap of each to the converged estimate, and the time each bound took (one process).
"""
import argparse
import time

import torch

import bcpc
from bcpc import lipschitz, models
from bcpc.train import load_trained


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist_4c3f", choices=sorted(models.ARCHITECTURES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--checkpoint", default=None, help="a bcpc checkpoint (overrides --model / --seed)")
    args = ap.parse_args()
    if args.checkpoint:
        _, cert, cfg, _ = load_trained(args.checkpoint)
        what = f"checkpoint {args.checkpoint} ({cfg.model})"
    else:
        torch.manual_seed(args.seed)
        model = models.ARCHITECTURES[args.model]().eval()
        shape = (1, 1, 28, 28) if args.model.startswith("mnist") else (1, 3, 32, 32)
        cert = bcpc.compile(model, example_input=torch.zeros(shape))
        what = f"model {args.model}, seed {args.seed}"
    t0 = time.perf_counter()
    rows = cert.lipschitz_table(converge_iters=args.iters)
    print(f"{what}; converged = {args.iters} power-iteration steps in float64 (a lower bound on the norm)")
    print(f"{'layer':>6} {'kind':>7} {'input':>14} {'estimate':>10} {'converged':>10} {'guaranteed':>10} {'gap %':>7} "
          f"{'s':>6} {'circular':>10} {'gap %':>7} {'s':>6}")
    mods = cert.lipschitz_modules
    for r in rows:
        lip, weight_name = mods[r["node"]]
        w = cert.model.get_parameter(weight_name).detach().double()
        start = time.perf_counter()
        if lip.kind == "linear":
            guaranteed = circular = float(lipschitz.dense_sigma_upper(w))
            t_circ = 0.0
        else:
            p = lip.params
            geometry = (w, lip.in_shape[1:], p["stride"], p["padding"], p["dilation"], p["groups"])
            guaranteed = float(lipschitz.conv_sigma_upper(*geometry))
            mid = time.perf_counter()
            circular = float(lipschitz.conv_sigma_upper(*geometry, exact_max_dim=0))
            t_circ = time.perf_counter() - mid
        t_exact = time.perf_counter() - start - t_circ
        gap = 100 * (guaranteed / r["converged"] - 1)
        gap_c = 100 * (circular / r["converged"] - 1)
        print(f"{r['node']:>6} {r['kind']:>7} {'x'.join(map(str, r['in_shape'])):>14} {r['estimate']:10.6f} {r['converged']:10.6f} "
              f"{guaranteed:10.6f} {gap:7.3f} {t_exact:6.2f} {circular:10.6f} {gap_c:7.3f} {t_circ:6.2f}")
    print(f"total {time.perf_counter() - t0:.2f} s (bounds + convergence runs)")


if __name__ == "__main__":
    main()

"""How loose is the global Lipschitz bound of a trained model, and what would a tighter one buy?

    python benchmarks/bound_ceiling.py --checkpoint runs/mnist_4c3f_minmax/best.pt --split val --n 300

Three measurements, all in float64:

1. Per layer: the guaranteed norm (what certificates use) against power iteration run to
   convergence (a lower bound on the true norm); their product. (benchmarks/lipschitz_gap.py
   has the details: the training estimate, the bounds the guaranteed one replaces, timings.)
2. Per (image, class) pair: the global bound on the margin ``z_y - z_j`` (``||W_y - W_j||``
   times the product of the other layers' guaranteed norms) over the norm of that margin's
   gradient at the image. The gradient norm is a lower bound on the local Lipschitz constant,
   so no sound bound can certify a radius larger than the global one by more than this ratio.
   Then the verified accuracy with every certified radius scaled up by 1, the minimum and the
   median ratio: the ceiling of any tighter bound on this model.
3. When the model ends ``Linear, MaxMin, Linear``: for each class pair ``c = W_a - W_b``, the
   product bound ``||c|| ||W||`` of the last two layers against (a) the split of MaxMin's
   Jacobian into its pair-mean and pair-difference parts, ``||c P W|| + ||c Q|| ||Q W||`` (a
   sound bound over all MaxMin Jacobians), and (b) the largest ``||c J W||`` over random MaxMin
   Jacobians ``J`` (a lower bound on what any such bound can reach).
"""
import copy
import statistics
import time

import torch

from bcpc.nn import MaxMin

from bcp_gain import checkpoint_parser, global_bound, load  # this folder's script, run as benchmarks/...


def spectral(a: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(a, 2).item()


def maxmin_split(n: int, dtype) -> tuple:
    """``P`` (the mean of each MaxMin pair ``(i, i + n/2)``) and ``Q = I - P``."""
    half = n // 2
    p = torch.zeros(n, n, dtype=dtype)
    i = torch.arange(half)
    p[i, i] = p[i, i + half] = p[i + half, i] = p[i + half, i + half] = 0.5
    return p, torch.eye(n, dtype=dtype) - p


def random_maxmin_jacobian(n: int, generator: torch.Generator) -> torch.Tensor:
    """The column order of a MaxMin Jacobian: each pair ``(i, i + n/2)`` kept or swapped."""
    half = n // 2
    swap = torch.rand(half, generator=generator) < 0.5
    order = torch.arange(n)
    order[:half][swap] += half
    order[half:][swap] -= half
    return order


def main():
    ap = checkpoint_parser(__doc__, "val", 300)
    ap.add_argument("--samples", type=int, default=20, help="random MaxMin Jacobians per class pair (default 20)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, cert, cfg, eps, x, y = load(args)
    model, x = model.double().eval(), x.double()

    rows = cert.lipschitz_table(converge_iters=200)
    print(f"{args.checkpoint}: {args.split} split, first {len(x)} images, l2 eps {eps}")
    print("layer norms (guaranteed / converged power iteration):")
    for r in rows:
        print(f"  {r['node']:>6} {r['kind']:<8} {r['upper']:9.4f} / {r['converged']:9.4f}  "
              f"(+{100 * (r['upper'] / r['converged'] - 1):.2f}%)")
    upper = torch.tensor([r["upper"] for r in rows], dtype=torch.float64)
    converged = torch.tensor([r["converged"] for r in rows], dtype=torch.float64)
    print(f"  product {upper.prod():.4f} / {converged.prod():.4f}")

    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    w = last.weight.double()
    inner = float(upper[:-1].prod())  # every layer but the last
    pair_bound = torch.cdist(w, w) * inner  # K[a, b] = ||W_a - W_b|| * product of the others
    x.requires_grad_(True)
    z = model(x)
    ratios = []
    for j in range(z.shape[1]):
        margin = z.gather(1, y[:, None]).squeeze(1) - z[:, j]
        grad, = torch.autograd.grad(margin.sum(), x, retain_graph=True)
        norm = grad.flatten(1).norm(dim=1)
        keep = (y != j) & (norm > 0)
        ratios.append(pair_bound[y[keep], j] / norm[keep])
    ratio = torch.cat(ratios).detach()
    low, median = ratio.min().item(), ratio.median().item()
    print(f"global bound / margin gradient norm at the image, over {len(ratio)} (image, class) pairs: "
          f"min {low:.3f}, median {median:.3f}, max {ratio.max().item():.3f}")

    glob = global_bound(copy.deepcopy(model).float(), cfg, x[:1].float().detach())
    with torch.no_grad():
        radius = torch.cat([glob.certified_radius(x[i:i + 250].float().detach(), y[i:i + 250])
                            for i in range(0, len(x), 250)])
    for label, scale in (("as it is", 1.0), (f"x{low:.3f} (min ratio)", low), (f"x{median:.3f} (median ratio)", median)):
        print(f"verified at {eps} with every certified radius {label}: {100 * (radius * scale >= eps).float().mean():.1f}%")

    mods = [m for m in model.modules() if not list(m.children())]
    if len(mods) >= 3 and isinstance(mods[-3], torch.nn.Linear) and isinstance(mods[-2], MaxMin) \
            and isinstance(mods[-1], torch.nn.Linear):
        hidden = mods[-3].weight.double().detach()
        n = hidden.shape[0]
        p, q = maxmin_split(n, torch.float64)
        gen = torch.Generator().manual_seed(0)
        split, sampled = [], []
        w = w.detach()
        for a in range(w.shape[0]):
            for b in range(w.shape[0]):
                if a == b:
                    continue
                c = (w[a] - w[b])[None]
                product = spectral(c) * spectral(hidden)
                split.append((spectral(c @ p @ hidden) + spectral(c @ q) * spectral(q @ hidden)) / product)
                best = max(spectral(c[:, random_maxmin_jacobian(n, gen)] @ hidden) for _ in range(args.samples))
                sampled.append(best / product)
        print(f"last two layers (Linear, MaxMin, Linear), over {len(split)} class pairs, against the product bound:")
        print(f"  mean/difference split of MaxMin (sound): median {statistics.median(split):.3f}x, "
              f"min {min(split):.3f}x")
        print(f"  best of {args.samples} random MaxMin Jacobians (reachable): median {statistics.median(sampled):.3f}x, "
              f"max {max(sampled):.3f}x")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

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
   sound bound over all MaxMin Jacobians), (b) the largest ``||c J W||`` over random MaxMin
   Jacobians ``J``, and (c) that Jacobian improved by steepest ascent, one pair swapped at a time
   (both lower bounds on what any bound valid for every Jacobian can reach).
4. When the model is a ``Sequential`` of convolutions, linear layers, MaxMin and Flatten: for each
   MaxMin, the share of its pairs whose order no input of the ball can change, judged by the
   ball's own bound on each pair difference (radius times the norm of the difference of the two
   rows): where a pair is stable its Jacobian is known, which a per-input bound could use.
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


def ascend(u: torch.Tensor, hidden: torch.Tensor) -> float:
    """``max ||u' W||`` reached from ``u`` by swapping MaxMin pairs ``(i, i + n/2)`` of ``u`` one
    at a time, always the swap that gains most, until none gains (a local maximum)."""
    half = len(u) // 2
    diff = hidden[:half] - hidden[half:]          # rows h_i - h_{i + half}
    sq = (diff * diff).sum(1)
    u = u.clone()
    v = u @ hidden
    for _ in range(4 * half):
        delta = u[half:] - u[:half]               # a swap of pair i adds delta_i (h_i - h_{i + half})
        gain = 2 * delta * (diff @ v) + delta * delta * sq
        i = int(gain.argmax())
        if gain[i] <= 1e-12 * float(v @ v):
            break
        v = v + delta[i] * diff[i]
        u[i], u[i + half] = u[i + half].clone(), u[i].clone()
    return float(v.norm())


def stable_pairs(model, rows, x, eps) -> None:
    """Measurement 4: stable MaxMin pairs per layer (see the module docstring)."""
    layers = list(model) if isinstance(model, torch.nn.Sequential) else []
    kinds = (torch.nn.Conv2d, torch.nn.Linear, MaxMin, torch.nn.Flatten)
    if not layers or not all(isinstance(m, kinds) for m in layers):
        print("stable MaxMin pairs: skipped (not a Sequential of Conv2d, Linear, MaxMin, Flatten)")
        return
    norms = iter(r["upper"] for r in rows)
    h, radius = x, eps
    pre_radius = eps  # the ball radius at the input of the last affine layer
    print(f"stable MaxMin pairs at l2 eps {eps} (the ball's bound on each pair difference):")
    with torch.no_grad():
        for i, layer in enumerate(layers):
            out = layer(h)
            if isinstance(layer, MaxMin):
                w = layers[i - 1].weight.double()
                half = w.shape[0] // 2
                reach = pre_radius * (w[:half] - w[half:]).flatten(1).norm(dim=1)
                gap = (h[:, :half] - h[:, half:]).abs()
                stable = (gap > reach.view((1, -1) + (1,) * (gap.dim() - 2))).flatten(1).double().mean(1)
                print(f"  {i:>3} after {type(layers[i - 1]).__name__}: {100 * stable.mean():.1f}% of pairs "
                      f"(per image min {100 * stable.min():.1f}%, max {100 * stable.max():.1f}%)")
            elif isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                pre_radius = radius
                radius = radius * next(norms)
            h = out


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
        split, sampled, ascended = [], [], []
        w = w.detach()
        for a in range(w.shape[0]):
            for b in range(w.shape[0]):
                if a == b:
                    continue
                c = (w[a] - w[b])[None]
                product = spectral(c) * spectral(hidden)
                split.append((spectral(c @ p @ hidden) + spectral(c @ q) * spectral(q @ hidden)) / product)
                orders = [random_maxmin_jacobian(n, gen) for _ in range(args.samples)]
                norms = [spectral(c[:, o] @ hidden) for o in orders]
                best = max(norms)
                sampled.append(best / product)
                ascended.append(ascend(c[0, orders[norms.index(best)]], hidden) / product)
        print(f"last two layers (Linear, MaxMin, Linear), over {len(split)} class pairs, against the product bound:")
        print(f"  mean/difference split of MaxMin (sound): median {statistics.median(split):.3f}x, "
              f"min {min(split):.3f}x")
        print(f"  best of {args.samples} random MaxMin Jacobians (reachable): median {statistics.median(sampled):.3f}x, "
              f"max {max(sampled):.3f}x")
        print(f"  that Jacobian after steepest ascent by pair swaps (reachable): median {statistics.median(ascended):.4f}x, "
              f"min {min(ascended):.4f}x")
    stable_pairs(model, rows, x.detach(), eps)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

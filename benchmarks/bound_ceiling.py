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
5. For the same models, across the whole network: for each class pair ``c = W_a - W_b``, the
   largest ``||c J||`` found over the network's Jacobians ``J`` with *every* MaxMin's pair order
   free (each pair kept or swapped, independently of any input), by block-coordinate ascent of
   ``<c J, v>``: ``v`` set to ``c J`` normalised, then each MaxMin's orders in turn set to the best
   for the others fixed (exact: the objective is linear in one layer's orders), until no order
   changes; started from the orders at real images and from random ones. Every ``J`` it reaches
   is one a bound valid for all MaxMin Jacobians must cover (the product bound is one such bound,
   as is any semidefinite or loop-transformation bound that ignores the input), so its ratio to
   the product bound is how much any of them could gain.
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
    layers = _layers(model)
    if layers is None:
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


def _layers(model):
    """The model as a list of Conv2d / Linear / MaxMin / Flatten (channel-dim MaxMin), or None."""
    layers = list(model) if isinstance(model, torch.nn.Sequential) else []
    kinds = (torch.nn.Conv2d, torch.nn.Linear, MaxMin, torch.nn.Flatten)
    if not layers or not all(isinstance(m, kinds) for m in layers) or any(
            isinstance(m, MaxMin) and m.dim != 1 for m in layers):
        return None
    return layers


def masked_pass(layers, v, swaps):
    """The network's linear map with every MaxMin's pair order fixed (``swaps[k]`` True where the
    pair ``(i, i + C/2)`` of the k-th MaxMin is swapped), no biases. Returns the output, the inputs
    of the MaxMins and their outputs (gradients retained)."""
    ins, outs, h, k = [], [], v, 0
    for layer in layers:
        if isinstance(layer, torch.nn.Conv2d):
            h = torch.nn.functional.conv2d(h, layer.weight, None, layer.stride, layer.padding, layer.dilation,
                                           layer.groups)
        elif isinstance(layer, torch.nn.Linear):
            h = torch.nn.functional.linear(h, layer.weight)
        elif isinstance(layer, MaxMin):
            a, b = h.chunk(2, 1)
            ins.append(h)
            h = torch.cat([torch.where(swaps[k], b, a), torch.where(swaps[k], a, b)], 1)
            h.retain_grad()
            outs.append(h)
            k += 1
        else:
            h = layer(h)
    return h, ins, outs


def realised_swaps(layers, x):
    """The pair orders of every MaxMin at the inputs ``x`` (True where the second half is larger)."""
    swaps, h = [], x
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, MaxMin):
                a, b = h.chunk(2, 1)
                swaps.append(b > a)
            h = layer(h)
    return swaps


def ascend_network(layers, c, swaps, sweeps: int, input_shape) -> torch.Tensor:
    """Block-coordinate ascent of ``max <c J, v>`` over ``||v|| = 1`` and every MaxMin's pair orders
    (measurement 5). ``c``: (K, classes) rows (margins of the output); ``swaps``: per MaxMin, (K, C/2, ...) starting orders.
    Returns ``||c J||`` (K,) at the orders reached, each a local maximum or after ``sweeps`` sweeps."""
    swaps = [s.clone() for s in swaps]
    zero = torch.zeros((len(c),) + tuple(input_shape), dtype=c.dtype)

    def backward_from_c(v):  # v.grad = (c J)^T, and each MaxMin output's gradient
        v = v.detach().requires_grad_(True)
        out, ins, outs = masked_pass(layers, v, swaps)
        (out * c).sum().backward()
        return v, ins, outs

    for _ in range(sweeps):
        g = backward_from_c(zero)[0].grad.flatten(1)
        v = (g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)).view_as(zero)
        changed = 0
        for k in range(len(swaps)):
            _, ins, outs = backward_from_c(v)
            a1, a2 = outs[k].grad.chunk(2, 1)
            f1, f2 = ins[k].detach().chunk(2, 1)
            new = (a1 * f2 + a2 * f1) > (a1 * f1 + a2 * f2)
            changed += int((new != swaps[k]).sum())
            swaps[k] = new
        if not changed:
            break
    return backward_from_c(zero)[0].grad.flatten(1).norm(dim=1).detach()


def network_ceiling(model, rows, x, starts: int, sweeps: int) -> None:
    """Measurement 5 (see the module docstring)."""
    layers = _layers(model)
    if layers is None or not any(isinstance(m, MaxMin) for m in layers):
        print("whole-network ascent over MaxMin orders: skipped (not a Sequential of Conv2d, Linear, MaxMin, Flatten)")
        return
    w = layers[-1].weight.double().detach()
    classes = w.shape[0]
    inner = float(torch.tensor([r["upper"] for r in rows[:-1]], dtype=torch.float64).prod())
    pairs = [(a, b) for a in range(classes) for b in range(classes) if a != b]
    bound = torch.stack([w[a] - w[b] for a, b in pairs]).norm(dim=1) * inner
    eye = torch.eye(classes, dtype=torch.float64)
    c_pairs = torch.stack([eye[a] - eye[b] for a, b in pairs])  # the margin z_a - z_b of the output
    gen = torch.Generator().manual_seed(0)
    real = realised_swaps(layers, x[:starts])
    best = torch.zeros(len(pairs), dtype=torch.float64)
    start_best = torch.zeros(len(pairs), dtype=torch.float64)
    for s in range(2 * starts):
        if s < starts:  # the orders at image s, for every class pair
            swaps = [r[s:s + 1].expand((len(pairs),) + r.shape[1:]) for r in real]
        else:
            swaps = [torch.rand((len(pairs),) + r.shape[1:], generator=gen) < 0.5 for r in real]
        zero = torch.zeros((len(pairs),) + tuple(x.shape[1:]), dtype=torch.float64, requires_grad=True)
        out, _, _ = masked_pass(layers, zero, swaps)
        (out * c_pairs).sum().backward()
        start_best = torch.maximum(start_best, zero.grad.flatten(1).norm(dim=1))
        reached = ascend_network(layers, c_pairs, swaps, sweeps, x.shape[1:])
        best = torch.maximum(best, reached)
        print(f"  start {s + 1} of {2 * starts} ({'image' if s < starts else 'random'}): median "
              f"{(reached / bound).median():.4f}x the product bound", flush=True)
    ratio, start_ratio = best / bound, start_best / bound
    print(f"whole network, over {len(pairs)} class pairs, against the product bound (|c| times every other layer's norm):")
    print(f"  the Jacobians at {starts} images and {starts} random MaxMin orders (reachable): median "
          f"{start_ratio.median():.4f}x, max {start_ratio.max():.4f}x")
    print(f"  after block-coordinate ascent over every MaxMin's pair orders (reachable): median "
          f"{ratio.median():.4f}x, min {ratio.min():.4f}x, max {ratio.max():.4f}x")


def main():
    ap = checkpoint_parser(__doc__, "val", 300)
    ap.add_argument("--samples", type=int, default=20, help="random MaxMin Jacobians per class pair (default 20)")
    ap.add_argument("--starts", type=int, default=2, help="whole-network ascent: images and random orders to start "
                    "from, each (default 2)")
    ap.add_argument("--sweeps", type=int, default=50, help="whole-network ascent: at most this many sweeps (default 50)")
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
    network_ceiling(model, rows, x.detach(), args.starts, args.sweeps)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

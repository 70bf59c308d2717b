"""``solve_t`` on the CPU: the torch path (one sort of the breakpoints) against the numba kernel (selection).

    python benchmarks/solver_kernel.py [--reps 30] [--threads 1]

For each shape (B, K, n) and dtype: the median time of ``solve_t`` over --reps repetitions after
warm-up, on each path, in one process, and the ratio torch / numba; also the torch sort alone (the
part the kernel replaces with an O(n) search) and the largest relative difference of the margins
(``dual_margin_lower`` at either ``t``, evaluated in float64). Problems are random with rho from a
twentieth of the box-corner distance to past it (both ``t*`` finite and ``t* = inf``), and one
``c == 0`` row per sample, as for the reference class in ``bcpc.margins``. Shapes: the MNIST
training step (50, 10, 512) and (128, 10, 512) in float32, certification (200, 10, 512) in float64,
a small conv net (50, 10, 100).
"""
import argparse

import torch

from bcpc import solver
from bench import median_time  # benchmarks/ is on sys.path when run as a script

SHAPES = [((50, 10, 512), torch.float32), ((128, 10, 512), torch.float32), ((200, 10, 512), torch.float64),
          ((50, 10, 100), torch.float32)]


def problem(b, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    z = torch.randn(b, n, generator=gen, dtype=f64)
    lower = z - torch.rand(b, n, generator=gen, dtype=f64)
    upper = z + torch.rand(b, n, generator=gen, dtype=f64)
    c = torch.randn(b, k, n, generator=gen, dtype=f64)
    c[:, 0] = 0
    d = torch.where(c > 0, z.unsqueeze(1) - lower.unsqueeze(1), upper.unsqueeze(1) - z.unsqueeze(1))
    rho = d.norm(dim=-1)[:, -1] * torch.linspace(0.05, 1.2, b, dtype=f64)
    return tuple(x.to(dtype) for x in (z, rho, lower, upper, c))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.reps} after warm-up")
    print(f"{'shape':>16} {'dtype':>8} {'torch sort':>11} {'torch':>10} {'numba':>10} {'torch/numba':>12} {'margin rel diff':>16}")
    with torch.no_grad():
        for shape, dtype in SHAPES:
            prob = problem(*shape, dtype)
            z, rho, lower, upper, c = prob
            breakpoints = c.abs()
            t_sort = median_time(lambda: breakpoints.sort(dim=-1), args.reps)
            t_torch = median_time(lambda: solver._solve_t_torch(*prob), args.reps)
            t_numba = median_time(lambda: solver._solve_t_cpu(*prob), args.reps)
            p64 = tuple(x.double() for x in prob)
            ref = solver.dual_margin_lower(*p64, None, solver._solve_t_torch(*prob).double())
            got = solver.dual_margin_lower(*p64, None, solver._solve_t_cpu(*prob).double())
            diff = ((ref - got).abs() / ref.abs().clamp_min(1e-12)).max().item()
            name = str(dtype).replace("torch.", "")
            print(f"{str(shape):>16} {name:>8} {t_sort * 1e3:>8.2f} ms {t_torch * 1e3:>7.2f} ms "
                  f"{t_numba * 1e3:>7.2f} ms {t_torch / t_numba:>11.1f}x {diff:>16.1e}")


if __name__ == "__main__":
    main()

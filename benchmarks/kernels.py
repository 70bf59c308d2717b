"""The fused numba kernels against their pure-torch paths, one process, one run.

    python benchmarks/kernels.py [--reps 20] [--threads 1] [--inductor]

For each kernel of bcpc.kernels (forward + backward, at the largest activation of MNIST 4C3F,
batch 50: 32 x 28 x 28; the 3136 x 512 weight for the weight kernels), for the last-layer
``solve_t`` (certification shape, float64) and for a whole certified training step and a sound
certification batch of 4C3F, the median time with the kernels (default) and with
``BCPC_FUSED=0`` (the torch path), and the speed-up torch / fused.

``--inductor`` adds the 4C3F certified step under ``bcpc.compile(..., backend="inductor")``
with the kernels' custom ops in the compiled graph (``BCPC_FUSED_COMPILE=1``, the fused column)
and with the torch path that inductor fuses (``BCPC_FUSED_COMPILE=0``), each compiled afresh
(the one-off compile times are printed after the row): the figure that picks the default of
``BCPC_FUSED_COMPILE`` (``bcpc.kernels.COMPILE_DEFAULT``).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/ helpers)

import bcpc  # noqa: E402
import bcpc.models  # noqa: E402
from bcpc import kernels, solver  # noqa: E402


def median_ms(fn, reps):
    return 1000 * bench.median_time(fn, reps, warmup=3)


def both(fn, reps):
    """(fused ms, torch ms)."""
    os.environ["BCPC_FUSED"] = "1"
    fused = median_ms(fn, reps)
    os.environ["BCPC_FUSED"] = "0"
    try:
        ref = median_ms(fn, reps)
    finally:
        os.environ["BCPC_FUSED"] = "1"
    return fused, ref


def cases():
    torch.manual_seed(0)
    shape = (50, 32, 28, 28)
    a_s, a_d, center = torch.randn(shape), torch.rand(shape), torch.randn(shape)
    bias, rownorm, radius = torch.randn(32, 1, 1), torch.rand(shape[1:]), torch.rand(50)
    for t in (a_s, a_d, center, bias, rownorm, radius):
        t.requires_grad_()
    lower = torch.randn(shape, requires_grad=True)
    upper = (lower.detach() + torch.rand(shape)).requires_grad_()
    grads = [torch.randn(shape), torch.randn(shape)]
    weight = torch.randn(512, 3136, requires_grad=True)
    x2 = torch.rand(50, 3136, requires_grad=True)

    def affine():
        torch.autograd.backward(kernels.affine_box(a_s, a_d, bias, center, rownorm, radius), grads)

    def relu():
        torch.autograd.backward(kernels.relu_box(lower, upper), grads)

    def abs_square():
        torch.autograd.backward(kernels.abs_square(weight), [torch.ones_like(weight)] * 2)

    def abs_linear():
        kernels.abs_linear(x2, weight).sum().backward()

    yield "affine_box fwd+bwd (50x32x28x28)", affine
    yield "relu_box fwd+bwd", relu
    yield "abs_square fwd+bwd (512x3136)", abs_square
    yield "abs_linear fwd+bwd (50x3136 @ 3136x512)", abs_linear

    g = torch.Generator().manual_seed(1)
    z = torch.rand(200, 512, generator=g, dtype=torch.float64)
    lo, hi = z - torch.rand(200, 512, generator=g, dtype=torch.float64), z + 0.1
    c = torch.randn(200, 10, 512, generator=g, dtype=torch.float64)
    rho = torch.rand(200, generator=g, dtype=torch.float64)
    yield "solve_t (200x10x512, float64)", lambda: solver.solve_t(z, rho, lo, hi, c)

    model, cert, x, y, _ = bench.setup("mnist_4c3f", 50)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    step = bench.training_step(lambda: cert.loss(x, y, 36 / 255, 1.0), opt)
    plain = bench.training_step(lambda: F.cross_entropy(model(x), y), opt)
    yield "4C3F certified training step, batch 50", step
    xc, yc = torch.rand(200, 1, 28, 28), torch.randint(0, 10, (200,))

    def certify():
        model.eval()
        cert.certify(xc, yc, 36 / 255)
        model.train()
    yield "4C3F sound certification, 200 images", certify
    yield "(4C3F plain training step, batch 50)", plain


def compiled_step(reps, batch=50, order=("1", "0")):
    """{setting: (median ms, compile s)} of the 4C3F certified step, backend="inductor"."""
    out = {}
    old = os.environ.get("BCPC_FUSED_COMPILE")
    try:
        for setting in order:
            os.environ["BCPC_FUSED_COMPILE"] = setting
            torch.compiler.reset()
            torch.manual_seed(0)
            model = bcpc.models.ARCHITECTURES["mnist_4c3f"]()
            x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
            cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), backend="inductor")
            with torch.no_grad():  # the Lipschitz cache's first 50 steps, eagerly: not in the compiled graph
                cert.propagation(x, 36 / 255, y, False)
            opt = torch.optim.SGD(model.parameters(), lr=1e-6)
            step = bench.training_step(lambda cert=cert: cert.loss(x, y, 36 / 255, 1.0), opt)
            t = time.perf_counter()
            step()
            out[setting] = (median_ms(step, reps), time.perf_counter() - t)
    finally:
        torch.compiler.reset()
        if old is None:
            os.environ.pop("BCPC_FUSED_COMPILE", None)
        else:
            os.environ["BCPC_FUSED_COMPILE"] = old
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inductor", action="store_true", help="also the compiled step, BCPC_FUSED_COMPILE=1 vs 0")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.reps}")
    print(f"{'':42} {'fused ms':>9} {'torch ms':>9} {'torch/fused':>11}")
    for name, fn in cases():
        fused, ref = both(fn, args.reps)
        print(f"{name:42} {fused:9.2f} {ref:9.2f} {ref / fused:10.2f}x", flush=True)
    if args.inductor:
        r = compiled_step(args.reps)
        (fused, fused_s), (ref, ref_s) = r["1"], r["0"]
        print(f"{'4C3F certified step, inductor, batch 50':42} {fused:9.2f} {ref:9.2f} {ref / fused:10.2f}x  "
              f"(BCPC_FUSED_COMPILE=1 / 0; compile {fused_s:.0f} s / {ref_s:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""What the trace-time path watch costs a compile: warm ``bcpc.compile`` with and without it.

    python benchmarks/compile_watch.py [--models mnist_4c3f,resnet18_like] [--reps 5] [--threads 1]

While torch.fx traces, ``passes.trace._PathWatch`` follows the model's Python code
(``sys.settrace`` for exceptions caught in the model's own files and calls of ``is_fx_tracing``,
``sys.setprofile`` for random draws; docs/soundness.md). This script times warm compiles of each
model with the watch as shipped and with it replaced by one that watches nothing, alternating the
two so that both see the same machine load, and prints the medians and their ratio. The watch-off
compile exists only here: ``bcpc.compile`` always watches.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import bcpc
from bcpc.models import ARCHITECTURES
from bcpc.passes import trace as trace_pass

SHAPES = {"mnist": (1, 28, 28), "cifar": (3, 32, 32), "resnet": (3, 32, 32)}


class _NoWatch:
    """A path watch that sees nothing: the compile without the watch's cost."""

    def __init__(self, model):
        self.caught, self.asked, self.drawn = [], [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def refuse(self) -> None:
        pass


def shape_of(name: str) -> tuple:
    if name == "resnet18_like":
        return (3, 32, 32)
    return SHAPES[name.split("_")[0]]


def factory(name: str):
    if name == "resnet18_like":
        return lambda: bcpc.models.resnet18_like(3, 10)
    return ARCHITECTURES[name]


def time_compiles(name: str, reps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = factory(name)().eval()
    x = torch.rand((1,) + shape_of(name))
    watched = trace_pass._PathWatch

    def compile_once(watch) -> float:
        trace_pass._PathWatch = watch
        try:
            t = time.perf_counter()
            bcpc.compile(model, "l2", example_input=x, input_domain=(0.0, 1.0))
            return time.perf_counter() - t
        finally:
            trace_pass._PathWatch = watched

    compile_once(watched)  # lazy imports and first-call caches
    compile_once(_NoWatch)
    on, off = [], []
    for _ in range(reps):
        on.append(compile_once(watched))
        off.append(compile_once(_NoWatch))
    return statistics.median(on), statistics.median(off)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_4c3f,mnist_4c3f_minmax,cifar_6c2f,resnet_small,resnet18_like",
                    help="comma-separated architectures (bcpc.models.ARCHITECTURES or resnet18_like)")
    ap.add_argument("--reps", type=int, default=5, help="compiles of each kind per model (median; default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"warm bcpc.compile, median of {args.reps}, {args.threads} thread(s), the two kinds alternated")
    print(f"{'model':<20} {'watched (s)':>11} {'unwatched (s)':>13} {'ratio':>6}")
    for name in args.models.split(","):
        on, off = time_compiles(name, args.reps)
        print(f"{name:<20} {on:11.3f} {off:13.3f} {on / off:5.2f}x")


if __name__ == "__main__":
    main()

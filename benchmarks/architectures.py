"""Compile time and first-certify time of the real architectures of tests/architectures.py.

    python benchmarks/architectures.py [--size full|test] [--threads N]

``full``: ResNet-18 and MobileNetV2 (width 1.0) on 3x32x32 (CIFAR size); ``test``: the sizes the
test suite uses. First certify includes the one-off guaranteed Lipschitz bounds of every layer
(cached afterwards); the second certify of the same batch is the steady state. Batch 8, float32,
l2 eps 0.1. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import bcpc  # noqa: E402
from architectures import ARCHITECTURES, MobileNetV2, ResNet18  # noqa: E402

FULL = {"resnet18": (lambda: ResNet18(10), (3, 32, 32)), "mobilenet_v2": (lambda: MobileNetV2(10), (3, 32, 32))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "test"), default="full", help="architecture sizes (default: full)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    archs = dict(ARCHITECTURES)
    if args.size == "full":
        archs.update(FULL)
    print(f"threads {args.threads}, batch 8, float32, l2 eps 0.1, sizes: {args.size}\n")
    print("| model | input | parameters | compile (s) | first certify (s) | next certify (s) |")
    print("|---|---|---|---|---|---|")
    for name, (make, shape) in archs.items():
        torch.manual_seed(0)
        model = make().eval()
        x = torch.rand((8,) + shape)
        y = model(x).argmax(1)
        t0 = time.perf_counter()
        cert = bcpc.compile(model, "l2", example_input=x)
        t1 = time.perf_counter()
        cert.certify(x, y, 0.1)
        t2 = time.perf_counter()
        cert.certify(x, y, 0.1)
        t3 = time.perf_counter()
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {'x'.join(map(str, shape))} | {params:,} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t3 - t2:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()

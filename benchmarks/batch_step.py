"""The cost of a training step of issue 15's recipe at several batch sizes: ``cert.loss`` with
GloRo's loss and the global bound (``method="lipschitz"``), forward + backward + Adam, on the
4C3F-MinMax, in float32 or with bfloat16 convolutions (``precision: bfloat16``), median of the
steps after a warm-up; printed per step and per epoch of 50,000 images.

    python benchmarks/batch_step.py --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

import bcpc
from bcpc import train as T
from bcpc.models import ARCHITECTURES


def step_time(batch: int, iters: int, precision: str, steps: int) -> float:
    torch.manual_seed(0)
    model = ARCHITECTURES["mnist_4c3f_minmax"]()
    cert = bcpc.compile(model, norm="l2", method="lipschitz", input_shape=(1, 28, 28), lipschitz_iters=iters)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with T.step_precision(precision, torch.device("cpu")):
            loss = cert.loss(x, y, 1.738, 1.5, kind="gloro")
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[5:])
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--settings", default="128:5:float32,128:2:float32,128:5:bfloat16,128:2:bfloat16,512:5:float32",
                        help="batch:power iterations:precision, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for setting in args.settings.split(","):
        batch, iters, precision = setting.split(":")
        t = step_time(int(batch), int(iters), precision, args.steps)
        print(f"batch {batch}, {iters} power iterations, {precision}: {t * 1000:.1f} ms per step, "
              f"{t * 50000 / int(batch):.1f} s per epoch", flush=True)


if __name__ == "__main__":
    main()

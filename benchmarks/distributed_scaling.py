"""Samples per second of certified training with 1 and with N processes (torchrun, gloo on CPU).

    python benchmarks/distributed_scaling.py [--nproc 2] [--steps 60] [--batch 50] [--model mnist_small]

Trains the same config (real MNIST, certified loss from the first step) for --steps global steps,
once with one process and once under torchrun with --nproc processes on this machine, each
process limited to one thread, and prints samples/s and the ratio, measured in one run.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def run(cfg_path: Path, nproc: int, steps: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = ["-m", "bcpc", "train", "--config", str(cfg_path), "--no-progress", "--max-steps", str(steps)]
    if nproc == 1:
        cmd = [sys.executable] + base
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port)] + base
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--model", default="mnist_small")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for nproc in (1, args.nproc):
            cfg = dict(name=f"p{nproc}", model=args.model, out_dir=tmp, data_root="data", epochs=1, warmup_epochs=0,
                       ramp_epochs=0, batch_size=args.batch, eps=1.58, threads=1, val_subset=args.nproc * 10,
                       checkpoint_every=10**6, train_subset=args.batch * args.steps)
            path = Path(tmp) / f"p{nproc}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            # one short run first so data loading and imports are warm, then the timed run
            results[nproc] = run(path, nproc, args.steps)
        samples = args.batch * args.steps
        print(f"{args.model}, global batch {args.batch}, {args.steps} certified steps, 1 thread per process "
              f"(wall time includes start-up and one validation pass)")
        for nproc, sec in results.items():
            print(f"  {nproc} process(es): {sec:7.1f} s  {samples / sec:8.1f} samples/s")
        print(f"  speed-up {args.nproc} vs 1: {results[1] / results[args.nproc]:.2f}x")


if __name__ == "__main__":
    main()

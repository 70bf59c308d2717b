"""Every benchmark script the docs show runs, in a reduced form, and prints its figures.

The figures themselves are measured by running the scripts as docs/performance.md and
docs/soundness.md say; here only that the commands work as written (smaller arguments)."""
import re
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_prints_ratios_to_the_plain_step():
    out = run("bench.py", "--models", "mnist_4c3f", "--batches", "2", "--reps", "1")
    row = [line for line in out.splitlines() if line.strip().startswith("mnist_4c3f")]
    assert len(row) == 1 and row[0].count("x") >= 2, out  # certified-step and memory ratios
    out = run("bench.py", "--models", "mnist_small_minmax", "--batches", "2", "--reps", "1", "--threads", "1,2",
              "--steps-only", "--bf16")
    rows = [line for line in out.splitlines() if line.strip().startswith("mnist_small_minmax")]
    assert len(rows) == 2 and all(r.count("x") >= 5 for r in rows), out  # one table per thread count, bf16 steps
    out = run("bench.py", "--models", "mnist_small_minmax", "--batches", "2,3", "--memory-only")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("mnist_small_minmax")]
    assert len(rows) == 2 and all(float(r[2].rstrip("x")) > 1 for r in rows), out  # certified keeps more


def test_solver_kernel_benchmark_runs():
    out = run("solver_kernel.py", "--reps", "1")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("(")]
    assert len(rows) == 4, out  # one row per (shape, dtype)
    assert all(float(r[-1]) < 1e-5 for r in rows), out  # both paths give the same margins


def test_lipschitz_gap_runs():
    out = run("lipschitz_gap.py", "--iters", "20", "--model", "mnist_small")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].startswith("_")]
    assert len(rows) == 4, out  # two convolutions, two linear layers
    for r in rows:
        converged, guaranteed, circular = float(r[4]), float(r[5]), float(r[8])
        assert converged <= guaranteed <= circular, r  # a lower bound, the certified norm, the looser bound


def test_audit_models_runs():
    out = run("audit_models.py", "--n", "4", "--pgd-steps", "2", "--restarts", "1")
    assert out.strip(), out


@pytest.mark.skipif(importlib.util.find_spec("auto_LiRPA") is None,
                    reason="auto-lirpa lives in its own environment (.venv-peers; see benchmarks/peers.py)")
def test_peers_runs():
    out = run("peers.py", "--models", "mnist_4c3f", "--batches", "2", "--reps", "1")
    assert "mnist_4c3f" in out, out


def test_kernels_benchmark_runs():
    out = run("kernels.py", "--reps", "1")
    assert "torch/fused" in out and "certified training step" in out, out


def test_device_parity_runs():
    # without a GPU this compares the CPU with itself: the parity line is only checked for its
    # presence; the soundness line (PGD against the certified bounds) is a real check
    out = run("device_parity.py", "--n", "20", "--pgd-steps", "3", "--device", "cpu")
    assert "certificates that differ:" in out and "throughput ratio" in out, out
    assert "below the certified bound: 0 of" in out, out


def test_gpu_benchmark_runs_on_the_cpu():
    # the reduced form; aot_eager for inductor: the same capture, no code generation (minutes on a CPU)
    out = run("gpu.py", "--device", "cpu", "--steps", "3", "--batches", "8", "--backend", "aot_eager",
              "--data", "random", "--images", "64", "--certify", "20")
    assert "not a GPU measurement" in out, out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["8"]]
    assert [r[1] for r in rows] == ["eager", "inductor", "cudagraphs"], out
    assert len({r[5] for r in rows}) == 1, out  # the same loss in every mode: same weights, data and steps
    checks = [line for line in out.splitlines() if "certificates that differ" in line]
    assert len(checks) == 4 and all("differ: 0," in c and "within tolerance" in c for c in checks), out


def test_fuzz_benchmark_prints_its_counts():
    out = run("fuzz.py", "--n", "12")
    counts = {k.strip(): v.split()[0] for k, v in (line.split(":", 1) for line in out.splitlines()
                                                   if ":" in line and not line.startswith(" "))}
    assert counts["models generated"] == "12", out
    assert int(counts["compiled"]) + int(counts["refused"]) == 12, out
    assert counts["violations"] == "0", out


def test_bcp_gain_compares_the_box_with_the_global_bound():
    out = run("bcp_gain.py", "--checkpoint", "models/mnist_small_demo.pt", "--split", "val", "--n", "100")
    figures = {line.split(":")[0].strip(): line.split(":")[1].split()[0] for line in out.splitlines() if ":" in line}
    bcp = float(figures["verified, BCP (ball and box)"].rstrip("%"))
    glob = float(figures["verified, global Lipschitz bound"].rstrip("%"))
    assert 0 < glob <= bcp, out  # the box only ever adds certificates


def test_precision_drift_compares_bfloat16_gradients_with_float32():
    for extra in ((), ("--all-bf16",)):
        out = run("precision_drift.py", "--checkpoint", "models/mnist_small_demo.pt", "--steps", "2", "--every", "1", *extra)
        rows = [line.split("cosines")[1].split() for line in out.splitlines() if line.startswith("step")]
        assert len(rows) == 2 and all(0.5 < float(c) <= 1.0 + 1e-6 for r in rows for c in r), out


def test_bound_ceiling_compares_the_global_bound_with_the_gradient():
    out = run("bound_ceiling.py", "--checkpoint", "models/mnist_small_demo.pt", "--split", "val", "--n", "40")
    ratio = re.search(r"min ([\d.]+), median ([\d.]+), max ([\d.]+)", out)
    assert ratio, out
    low, median, high = map(float, ratio.groups())
    assert 1.0 <= low <= median <= high, out  # a sound bound is never below the gradient norm it bounds
    verified = [float(v) for v in re.findall(r"every certified radius .*: ([\d.]+)%", out)]
    assert len(verified) == 3 and verified == sorted(verified), out

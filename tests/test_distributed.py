"""Data-parallel certified training with torchrun + gloo on CPU (2 processes on loopback)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from bcpc import checkpoint
from tests.fixtures import tiny_mnist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, name):
    cfg = dict(name=name, model="mnist_small", out_dir=str(tmp_path / "runs"), data_root=str(tmp_path / "d"),
               epochs=1, warmup_epochs=0.2, ramp_epochs=0.5, batch_size=20, lr=1e-3, val_subset=40,
               checkpoint_every=5, eps=0.5, threads=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(path, nproc=1, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "bcpc", "train", "--config", str(path), "--no-progress", *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "bcpc", "train", "--config", str(path),
               "--no-progress", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _params(tmp_path, name):
    return checkpoint.load(tmp_path / "runs" / name / "last.pt")


LR, ADAM_STEP_MAX = 1e-3, 8.0


def _close(a, b):
    """Two runs that differ only in the order of the gradient all-reduce.

    Their gradients agree to float32 rounding, but Adam divides by sqrt(v): an element whose
    gradient is near zero gets a step of either sign, so a few elements may part by up to two full
    steps per step. Adam's step is at most ``ADAM_STEP_MAX * lr`` per element (|m_hat| / sqrt(v_hat)
    <= (1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2)) ~ 7.3 for the default betas), which bounds every
    element; and almost every element (99.5%; measured: 17 of 8192 outside once) stays within
    float32 rounding amplified by 25 steps (rtol 1e-4, atol 2e-5).
    """
    steps = a["step"]
    for k in a["model_state"]:
        x, y = a["model_state"][k].double(), b["model_state"][k].double()
        diff = (x - y).abs()
        assert float(diff.max()) <= 2 * steps * ADAM_STEP_MAX * LR, k
        off = diff > 2e-5 + 1e-4 * y.abs()
        assert float(off.double().mean()) <= 0.005, f"{k}: {int(off.sum())} of {off.numel()} elements differ"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_mnist(root / "d")
    return root


def test_two_processes_match_one_process_with_the_same_global_batch(data_dir):
    _train(_config(data_dir, "one"), 1)
    _train(_config(data_dir, "two"), 2)
    a, b = _params(data_dir, "one"), _params(data_dir, "two")
    assert a["step"] == b["step"] == 25
    _close(a, b)
    # the Lipschitz cache (power-iteration vectors) is identical across the runs too
    for k in a["lip_state"]:
        torch.testing.assert_close(a["lip_state"][k], b["lip_state"][k], rtol=1e-3, atol=1e-5)


def test_checkpoint_from_two_processes_resumes_in_one(data_dir):
    path = _config(data_dir, "mixed")
    _train(path, 2, "--max-steps", "10")
    assert _params(data_dir, "mixed")["step"] == 10
    _train(path, 1, "--resume")
    a, b = _params(data_dir, "one"), _params(data_dir, "mixed")
    assert b["step"] == 25
    _close(a, b)


def test_certify_and_evaluate_shard_over_processes(data_dir):
    """`bcpc certify` / `bcpc evaluate` under torchrun give the single-process counts."""
    import json

    ckpt = data_dir / "runs" / "one" / "best.pt"
    if not ckpt.exists():
        _train(_config(data_dir, "one"), 1)
    common = ["--checkpoint", str(ckpt), "--eps", "0.3", "--data-root", str(data_dir / "d"), "--split", "test"]
    one = json.loads(_train_like(1, "certify", *common, "--json").stdout)
    two = json.loads(_train_like(2, "certify", *common, "--json").stdout)
    assert two["runtime"]["processes"] == 2 and one["results"] == two["results"]
    assert one["data"]["n"] == two["data"]["n"] == 100
    ev = ["--pgd-steps", "3", "--batch-size", "30", "--no-progress", "--eps-curve", "0.1,0.3", "--json"]
    e1 = json.loads(_train_like(1, "evaluate", *common, *ev).stdout)
    e2 = json.loads(_train_like(2, "evaluate", *common, *ev).stdout)
    assert e1["results"] == e2["results"]


def _train_like(nproc, command, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port())]
    out = subprocess.run(launcher + ["-m", "bcpc", command, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out

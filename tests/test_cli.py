"""The command line: help, one-line errors with exit code 2, and the demo in its reduced form."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bcpc", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_help_lists_every_subcommand_with_examples():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("train", "evaluate", "certify", "audit", "inspect", "demo"):
        assert cmd in out.stdout
    assert "examples:" in out.stdout


@pytest.mark.parametrize("args,words", [
    (("train", "--config", "missing.yaml"), "does not exist"),
    (("evaluate", "--checkpoint", "missing.pt"), "does not exist"),
    (("certify", "--checkpoint", "README.md"), "corrupted or truncated"),
])
def test_user_errors_are_one_line_exit_2(args, words):
    out = run(*args)
    assert out.returncode == 2
    assert out.stderr.startswith("bcpc: error:") and words in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_debug_flag_shows_traceback():
    out = run("--debug", "train", "--config", "missing.yaml")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_demo_quick_runs_end_to_end(tmp_path):
    """The README's main job, reduced (CI): real MNIST, certified training, sound certification."""
    out = run("demo", "--quick", "--no-progress", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "certified accuracy" in out.stdout and "clean accuracy" in out.stdout
    best = tmp_path / "demo" / "best.pt"
    assert best.exists()
    audit = run("audit", "--checkpoint", str(best), "--n", "60", "--eps", "0.3", "--pgd-steps", "10", "--restarts", "1",
                "--samples", "8", "--no-progress")
    assert audit.returncode == 0, audit.stderr[-2000:]
    assert '"violations": 0' in audit.stdout

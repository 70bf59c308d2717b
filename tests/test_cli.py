"""The command line: help, one-line errors with exit code 2, and the demo in its reduced form."""
import json
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
    report = tmp_path / "report"
    ev = run("evaluate", "--checkpoint", str(best), "--eps", "1.58", "--n", "40", "--pgd-steps", "5",
             "--eps-curve", "0.5,1.0,1.58", "--tightness-n", "4", "--out", str(report), "--no-progress",
             "--paper-attack")
    assert ev.returncode == 0, ev.stderr[-2000:]
    rep = json.loads((report / "report.json").read_text())
    assert rep["n"] == 40 and set(rep["verified_acc_vs_eps"]) == {"0.5", "1", "1.58"}
    assert rep["clean_acc"] >= rep["pgd_acc_paper_attack"] >= rep["verified_acc"]
    assert rep["pgd_paper_attack"] == {"steps": 5, "step_size": 1.58 / 4, "loss": "cross-entropy", "keeps": "last iterate"}
    assert rep["verified_acc"] == rep["verified_acc_vs_eps"]["1.58"]
    assert len(rep["tightness"]["tau_bcp"]) == 4
    assert (report / "verified_vs_eps.png").exists() and (report / "tightness.png").exists()
    cf = run("certify", "--checkpoint", str(best), "--eps", "1.58", "--n", "40")
    assert cf.returncode == 0 and json.loads(cf.stdout)["n"] == 40


def test_train_command_with_the_shipped_4c3f_config(tmp_path):
    """The exact command of docs/results.md, cut to two steps with --set/--max-steps."""
    out = run("train", "--config", "configs/mnist_4c3f.yaml", "--set", f"out_dir={tmp_path}", "--set",
              "train_subset=200", "--set", "val_subset=20", "--max-steps", "2", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["step"] == 2
    again = run("train", "--config", "configs/mnist_4c3f.yaml", "--set", f"out_dir={tmp_path}", "--set",
                "train_subset=200", "--set", "val_subset=20", "--max-steps", "3", "--resume", "--no-progress")
    assert again.returncode == 0 and json.loads(again.stdout)["step"] == 3


README_RUNNABLE = [ln.split("#")[0].split() for ln in (ROOT / "README.md").read_text().splitlines()
                   if ln.startswith(("bcpc evaluate", "bcpc certify", "bcpc audit", "bcpc inspect"))]


@pytest.mark.parametrize("argv", README_RUNNABLE, ids=[a[1] for a in README_RUNNABLE])
def test_readme_commands_run_as_written(argv):
    out = run(*argv[1:])
    assert out.returncode == 0, out.stderr[-2000:]
    if argv[1] == "evaluate":
        rep = json.loads(out.stdout)
        assert rep["n"] == 500 and rep["verified_acc"] > 0.2 and rep["clean_acc"] >= rep["pgd_acc"] >= rep["verified_acc"]
    elif argv[1] in ("certify", "audit"):
        rep = json.loads(out.stdout)
        assert rep.get("verified_acc", 1) > 0.2 and rep.get("violations", 0) == 0
    else:
        assert "tau" in out.stdout


def test_readme_lists_the_runnable_commands():
    assert [a[1] for a in README_RUNNABLE] == ["evaluate", "certify", "audit", "inspect"]

"""The command line: help, one-line errors with exit code 2, typo suggestions, the user's own
model and data, progress, and the demo in its reduced form (also interrupted)."""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bcpc import cli, report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "mnist_small_demo.pt"


def run(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two cores, often shared: one thread per process
    return subprocess.run([sys.executable, "-m", "bcpc", *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=env)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def summary_figures(text: str) -> dict:
    """The percentages of a report summary: {"clean accuracy": 85.0, ...}."""
    return {k: float(v) for k, v in re.findall(r"^  (clean accuracy|PGD accuracy|verified accuracy)\s+([\d.]+)%",
                                                 text, flags=re.M)}


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


def _state_dict(tmp_path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(torch.load(DEMO, weights_only=True)["model_state"], path)
    return path


def _npz(tmp_path, n=20, scale=1.0) -> Path:
    from bcpc import data

    x, y = data.mnist(ROOT / "data", "test")
    path = tmp_path / "test.npz"
    np.savez(path, x=scale * x[:n].numpy(), y=y[:n].numpy())
    return path


@pytest.mark.parametrize("args,words", [
    (("certify", "--checkpoint", "models"), "models is a directory (it holds mnist_4c3f.pt, mnist_4c3f_minmax.pt, mnist_small_demo.pt); "
                                            "pass the .pt file inside, e.g. models/mnist_4c3f.pt"),
    (("evaluate", "--checkpoint", "WEIGHTS"),
     "is a plain state_dict, not a bcpc checkpoint (no model, no config): pass the model that builds it too, "
     "--model pkg.module:factory --weights"),
    (("audit", "--model", "bcpc.models:conv_small", "--weights", "WEIGHTS", "--data", "DATA"), "--eps is required"),
    (("certify", "--model", "bcpc.models:conv_4c3f", "--data", "DATA", "--eps", "1", "--input-shape-typo"), None),
    (("certify", "--model", "bcpc.models:conv_6c2f", "--data", "DATA", "--eps", "1"),
     "(shape 1,28,28) does not fit bcpc.models:conv_6c2f: it expects 3,32,32 per sample, got 1,28,28; its first "
     "layer '0' (Conv2d) takes 3 channels, not 1"),
    (("certify", "--model", "bcpc.models:conv_small", "--data", "BIG", "--eps", "1"),
     "outside the input domain [0.0, 1.0]; pass --input-domain LOW,HIGH"),
    (("certify", "--model", "bcpc.models:conv_small", "--data", "gone.npz", "--eps", "1"), "no such file or folder"),
    (("certify", "--weights", "WEIGHTS", "--data", "DATA"), "needs the model it belongs to: --model"),
    (("certify", "--data", "DATA"), "which model? Give --checkpoint FILE"),
    (("certify", "--model", "bcpc.models:conv_small"), "needs data: --data FILE.npz"),
])
def test_mistakes_get_a_message_saying_what_to_do(args, words, tmp_path, capsys, one_thread):
    args = [{"WEIGHTS": str(_state_dict(tmp_path)) if "WEIGHTS" in args else None,
             "DATA": str(_npz(tmp_path)) if "DATA" in args else None,
             "BIG": str(_npz(tmp_path, 2, 255.0)) if "BIG" in args else None}.get(a) or a for a in args]
    if words is None:  # an option that does not exist: argparse's usage, exit 2, with the closest option
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2
        assert "unrecognized argument: --input-shape-typo" in capsys.readouterr().err
        return
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert cli.main(args) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert err.startswith("bcpc: error:") and words in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,words", [
    (["audit", "--pgd-stepz", "3"], "unrecognized argument: --pgd-stepz (did you mean --pgd-steps?)"),
    (["certify", "--batchsize", "4"], "(did you mean --batch-size?)"),
    (["evaluate", "--tightnes-n=3"], "(did you mean --tightness-n?)"),
    (["evalute"], "invalid choice: 'evalute'"),
    (["inspect", "--formt", "yaml"], "(did you mean --format?)"),
])
def test_typos_get_a_suggestion(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err, err
    if argv == ["evalute"]:
        assert "did you mean 'evaluate'?" in err


def _options(parser):
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    for name, sub in parser.commands.items():
        text = " ".join(sub.format_help().split())
        for action in _options(sub):
            assert action.help, f"bcpc {name} {action.option_strings[0]} has no help text"
            if action.default not in (None, False):
                assert f"(default: {action.default})" in text or "default:" in action.help, \
                    f"bcpc {name} {action.option_strings[0]} does not show its default"


def test_the_same_concept_has_the_same_option_in_every_command():
    commands = cli.build_parser().commands
    flags = {name: {s for a in sub._actions for s in a.option_strings} for name, sub in commands.items()}
    shared = {"--checkpoint", "--model", "--weights", "--seed", "--data", "--data-root", "--split", "--n", "--eps",
              "--norm", "--input-domain", "--out", "--json", "--no-progress"}
    for name in ("evaluate", "certify", "audit", "inspect"):
        assert shared <= flags[name], (name, shared - flags[name])
    for name in ("evaluate", "certify", "audit"):
        assert {"--batch-size", "--threads"} <= flags[name]
    for name in ("evaluate", "audit"):
        assert {"--pgd-steps", "--pgd-restarts", "--restarts"} <= flags[name]  # --restarts: hidden old spelling
    ns = commands["audit"].parse_args(["--restarts", "2"])
    assert ns.pgd_restarts == 2 and commands["audit"].parse_args([]).pgd_restarts == 3


def test_certify_shows_progress_counting_images_and_writes_its_report(tmp_path, capsys, one_thread):
    out = tmp_path / "c.json"
    assert cli.main(["certify", "--checkpoint", str(DEMO), "--eps", "1.58", "--n", "30", "--batch-size", "10",
                     "--data-root", str(ROOT / "data"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "guaranteed layer norms" in captured.err and "30/30" in captured.err and "img/s" in captured.err
    rep = report.validate(json.loads(out.read_text()))
    assert rep["data"]["n"] == 30 and captured.out == report.render_text(rep)
    assert f"{rep['results']['certified']} of 30 certified" in captured.out
    assert cli.main(["certify", "--checkpoint", str(DEMO), "--eps", "1.58", "--n", "5", "--no-progress",
                     "--data-root", str(ROOT / "data"), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["data"]["n"] == 5
    plain = json.loads(captured.out)
    assert plain["threat"]["model_rounding"] is False
    assert cli.main(["certify", "--checkpoint", str(DEMO), "--eps", "1.58", "--n", "5", "--no-progress",
                     "--data-root", str(ROOT / "data"), "--json", "--model-rounding"]) == 0
    rounded = report.validate(json.loads(capsys.readouterr().out))
    assert rounded["threat"]["model_rounding"] is True
    assert rounded["results"]["certified"] <= plain["results"]["certified"]
    assert "own rounding included" in report.render_text(rounded)


def test_inspect_needs_no_input_shape_with_a_checkpoint(capsys, one_thread):
    assert cli.main(["inspect", "--checkpoint", str(DEMO), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "input (1, 28, 28)" in captured.out and captured.err == ""
    assert cli.main(["inspect", "bcpc.models:conv_small", "--checkpoint", str(DEMO), "--no-progress"]) == 0
    assert "input (1, 28, 28)" in capsys.readouterr().out
    assert cli.main(["inspect", "bcpc.models:mlp", "--no-progress", "--json"]) == 0  # the shape read off the model
    captured = capsys.readouterr()
    assert "no --input-shape given; bcpc.models:mlp runs on 784" in captured.err
    rep = report.validate(json.loads(captured.out))  # without --eps: no data, no radius
    assert "data" not in rep and "eps" not in rep["threat"] and rep["model"]["input_shape"] == [784]
    assert rep["results"]["weight_layers"] == 3 and rep["model"]["seed"] == 0


def test_an_image_folder_is_data_too(tmp_path, capsys, one_thread):
    from PIL import Image

    from bcpc import data

    x, y = data.mnist(ROOT / "data", "test")
    for i in range(12):
        folder = tmp_path / "digits" / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((255 * x[i, 0].numpy()).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    xs, ys, meta = data.from_image_folder(tmp_path / "digits")
    assert xs.shape == (12, 1, 28, 28) and xs.dtype == torch.float32
    pixels = (255 * x[:12]).round() / 255  # what the 8-bit PNGs hold
    for k in range(12):  # every image read back exactly, with its own label (folders named by digits)
        i = next(i for i in range(12) if torch.equal(xs[k], pixels[i]))
        assert ys[k] == y[i]
    assert ys[:len(meta["classes"])].tolist() == [int(c) for c in meta["classes"]]  # one of every class first
    weights = _state_dict(tmp_path)
    assert cli.main(["certify", "--model", "bcpc.models:conv_small", "--weights", str(weights), "--data",
                     str(tmp_path / "digits"), "--eps", "1.58", "--no-progress", "--json"]) == 0
    rep = report.validate(json.loads(capsys.readouterr().out))
    assert rep["data"]["source"] == "image-folder" and rep["data"]["n"] == 12
    assert rep["model"]["factory"] == "bcpc.models:conv_small" and len(rep["model"]["sha256"]) == 64


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
                "--samples", "8", "--no-progress", "--json")
    assert audit.returncode == 0, audit.stderr[-2000:]
    assert report.validate(json.loads(audit.stdout))["results"]["violations"] == 0
    out = tmp_path / "report"
    ev = run("evaluate", "--checkpoint", str(best), "--eps", "1.58", "--n", "40", "--pgd-steps", "5",
             "--eps-curve", "0.5,1.0,1.58", "--tightness-n", "4", "--out", str(out), "--no-progress",
             "--paper-attack")
    assert ev.returncode == 0, ev.stderr[-2000:]
    rep = report.validate(json.loads((out / "report.json").read_text()))
    res = rep["results"]
    assert rep["data"]["n"] == 40 and set(res["verified_pct_vs_eps"]) == {"0.5", "1", "1.58"}
    assert res["clean_pct"] >= res["pgd_paper_attack_pct"] >= res["verified_pct"]
    assert rep["attack"]["paper_attack"] is True and rep["attack"]["pgd_step_size"] == 1.58 / 4
    assert res["verified_pct"] == res["verified_pct_vs_eps"]["1.58"]
    assert res["tau_n"] == 4 and len(rep["details"]["tau_bcp_per_input"]) == 4
    assert (out / "verified_vs_eps.png").exists() and (out / "tightness.png").exists()
    assert ev.stdout == report.render_text(rep)
    cf = run("certify", "--checkpoint", str(best), "--eps", "1.58", "--n", "40", "--json")
    assert cf.returncode == 0 and json.loads(cf.stdout)["data"]["n"] == 40


def test_train_command_with_the_shipped_4c3f_config(tmp_path):
    """The exact command of docs/results.md, cut to two steps with --set/--max-steps."""
    out = run("train", "--config", "configs/mnist_4c3f.yaml", "--set", f"out_dir={tmp_path}", "--set",
              "train_subset=200", "--set", "val_subset=20", "--max-steps", "2", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["step"] == 2
    again = run("train", "--config", "configs/mnist_4c3f.yaml", "--set", f"out_dir={tmp_path}", "--set",
                "train_subset=200", "--set", "val_subset=20", "--max-steps", "3", "--resume", "--no-progress")
    assert again.returncode == 0 and json.loads(again.stdout)["step"] == 3


README_LINES = [ln.split("#")[0].split() for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.startswith(("bcpc evaluate", "bcpc certify", "bcpc audit", "bcpc inspect"))]
README_RUNNABLE = [a for a in README_LINES if "--model" not in a]  # the user's-own-model line needs its files
README_OWN_MODEL = [a for a in README_LINES if "--model" in a]


@pytest.mark.parametrize("argv", README_RUNNABLE, ids=[a[1] for a in README_RUNNABLE])
def test_readme_commands_run_as_written(argv):
    out = run(*argv[1:])
    assert out.returncode == 0, out.stderr[-2000:]
    figures = summary_figures(out.stdout)
    if argv[1] == "evaluate":
        assert "first 500 inputs" in out.stdout and figures["verified accuracy"] > 20
        assert figures["clean accuracy"] >= figures["PGD accuracy"] >= figures["verified accuracy"]
    elif argv[1] in ("certify", "audit"):
        assert figures["verified accuracy"] > 20
        assert argv[1] == "certify" or re.search(r"^  violations\s+0  must be 0$", out.stdout, flags=re.M)
    else:
        assert "tau" in out.stdout
    if argv[1] != "inspect":
        assert "guaranteed layer norms" in out.stderr and "img/s" in out.stderr  # progress, on stderr


def test_readme_lists_the_runnable_commands():
    assert [a[1] for a in README_RUNNABLE] == ["evaluate", "certify", "audit", "inspect"]
    assert [a[1] for a in README_OWN_MODEL] == ["certify"]


def test_readme_own_model_and_data_command_runs_as_written(tmp_path):
    """With the three files docs/cli.md makes: a factory module, a plain state_dict, an .npz."""
    (tmp_path / "my_model.py").write_text("from bcpc.models import conv_small\n\n\ndef make():\n"
                                          "    return conv_small()\n")
    _state_dict(tmp_path)
    _npz(tmp_path, n=50)
    out = run(*README_OWN_MODEL[0][1:], "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "my_model:make (Sequential), weights weights.pt" in out.stdout and "first 50 inputs" in out.stdout
    assert summary_figures(out.stdout)["verified accuracy"] > 20


def test_demo_interrupted_says_what_was_kept_and_prints_no_result(tmp_path):
    """SIGTERM (a scheduler, `kill`) while the demo trains: the checkpoint is written, the message
    says the demo starts from scratch and how to continue instead, and no result is printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # 500 quick epochs (minutes): the signal lands mid-training however fast the step gets (2 epochs
    # once finished inside the 1.5 s below, and the test failed)
    proc = subprocess.Popen([sys.executable, "-m", "bcpc", "demo", "--quick", "--epochs", "500", "--no-progress",
                             "--out-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    config = tmp_path / "demo" / "config.json"
    deadline = time.time() + 300
    while not config.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # a few training steps
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    text = stdout + stderr
    assert "interrupted: checkpoint written to" in text and "last.pt" in text
    assert "`bcpc demo` starts again from scratch" in text
    assert f"bcpc train --config {config} --resume" in text and "no result, the run is unfinished" in text
    assert "certified accuracy" not in stdout and "trained in" not in stdout
    step = int(re.search(r"at step (\d+)", text).group(1))
    again = run("train", "--config", str(config), "--resume", "--max-steps", str(step + 1), "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]  # the advice works
    assert json.loads(again.stdout)["step"] == step + 1

"""bcpc.inspect and `bcpc inspect`: every format parses, carries the numbers of cert.node_bounds /
lipschitz_table / margins / tightness, is deterministic; the CLI's errors are one line, exit 2;
docs/inspect.md shows what its commands print now.

Regenerate the output blocks of docs/inspect.md with ``python tests/test_inspect.py --update-docs``.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
import yaml
from torch import nn

import bcpc
from bcpc import cli
from bcpc.errors import ConfigError, InvalidEpsilonError, InvalidInputError, MissingToolError
from bcpc.evaluate import tightness
from bcpc.inspect import build_report, num, render, render_dot
from bcpc.models import conv_small, mlp

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "inspect.md"
REL = 5.01e-6  # rounding to 6 significant digits moves a value by at most 5e-6 of itself


class Tiny(nn.Module):
    """conv-BN-ReLU, a residual conv, average pooling, flatten, two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, 1, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = h + self.conv2(h)
        h = self.pool(h).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 1])
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0))
    eps = 0.3
    report = build_report(cert, x, y, eps=eps)
    texts = {f: render(report, f, cert) for f in ("table", "yaml", "json", "dot", "code")}
    return dict(model=model, cert=cert, x=x, y=y, eps=eps, report=report, texts=texts,
                graph=render(report, "networkx", cert))


def close(a, b, rel=REL):
    return a == pytest.approx(b, rel=rel, abs=1e-12)


def user_nodes(cert):
    return [n.name for n in cert.canonical.graph.nodes if n.op not in ("get_attr", "output")]


def test_yaml_and_json_load_back_to_the_same_data(case):
    data = yaml.safe_load(case["texts"]["yaml"])
    assert data == json.loads(case["texts"]["json"])
    assert list(data) == ["model", "norm", "method", "input_shape", "input_domain", "num_classes", "margins_at",
                          "nodes", "edges", "run", "output"]
    assert data["model"] == "Tiny" and data["norm"] == "l2" and data["input_shape"] == [1, 8, 8]
    assert [n["name"] for n in data["nodes"]] == user_nodes(case["cert"])


def test_node_records_match_the_compiled_graph(case):
    cert = case["cert"]
    data = json.loads(case["texts"]["json"])
    nodes = {n["name"]: n for n in data["nodes"]}
    for name, rule in cert.rules.items():
        assert nodes[name]["rule"] == rule
    assert nodes["x"]["family"] == "input" and nodes["x"]["inputs"] == []
    assert nodes["bn"]["family"] == "affine" and nodes["bn"]["lipschitz"] is None  # no weight cache
    assert nodes["add"]["residual_merge"] and nodes["add"]["rule"] == "add"
    assert sorted(nodes["add"]["inputs"]) == ["conv2", "relu"]
    assert nodes["fc2"]["last_affine"] and data["margins_at"] == "fc2"
    assert nodes["conv1"]["shape"] == [4, 8, 8] and nodes["fc1"]["shape"] == [16]
    # source lines point into the user's forward, not into torch
    assert "test_inspect.py" in nodes["add"]["source"] and "h = h + self.conv2(h)" in nodes["add"]["source"]
    edges = {tuple(e) for e in data["edges"]}
    assert ("relu", "add") in edges and ("conv2", "add") in edges and ("x", "conv1") in edges


def test_lipschitz_numbers_match_lipschitz_table(case):
    data = json.loads(case["texts"]["json"])
    nodes = {n["name"]: n for n in data["nodes"]}
    rows = case["cert"].lipschitz_table()
    assert {r["node"] for r in rows} == {k for k, n in nodes.items() if n["lipschitz"] is not None}
    for r in rows:
        lip = nodes[r["node"]]["lipschitz"]
        assert close(lip["estimate"], r["estimate"]) and close(lip["upper"], r["upper"])
        assert close(lip["gap"], r["upper"] / r["estimate"] - 1, rel=1e-4)
        assert lip["upper"] >= lip["estimate"] * (1 - 1e-6)


def test_bound_numbers_match_node_bounds(case):
    cert, x, eps = case["cert"], case["x"], case["eps"]
    data = json.loads(case["texts"]["json"])
    nodes = {n["name"]: n for n in data["nodes"]}
    nb = cert.node_bounds(x, eps)
    ibp = bcpc.compile(case["model"], "l2", example_input=x[:1], input_domain=(0.0, 1.0),
                       method="ibp").node_bounds(x, eps)
    assert set(nb) == {k for k, n in nodes.items() if n["bounds"] is not None}
    for name, b in nb.items():
        rec = nodes[name]["bounds"]
        width = b.upper - b.lower
        ibp_width = (ibp[name].upper - ibp[name].lower).mean().item()
        assert close(rec["radius"], b.radius.mean().item())
        assert close(rec["width_mean"], width.mean().item()) and close(rec["width_max"], width.max().item())
        assert close(rec["ibp_width_mean"], ibp_width)
        assert close(rec["ibp_ratio"], ibp_width / width.mean().item(), rel=1e-5)
        assert rec["ibp_ratio"] >= 1 - 1e-6  # the BCP box lies inside the interval box
        ins = [nb[i] for i in nodes[name]["inputs"]]
        if ins:
            widest = max((i.upper - i.lower).mean().item() for i in ins)
            assert close(rec["width_growth"], width.mean().item() / widest, rel=1e-5)
            assert close(rec["radius_growth"], b.radius.mean().item() / max(i.radius.mean().item() for i in ins),
                         rel=1e-5)
    assert close(nodes["x"]["bounds"]["radius"], eps)
    assert data["run"] == {"eps": eps, "sound": True, "n_inputs": 3, "labels": "given"}


def test_output_numbers_match_margins_certify_and_tightness(case):
    cert, x, y, eps = case["cert"], case["x"], case["y"], case["eps"]
    out = json.loads(case["texts"]["json"])["output"]
    m = cert.margins(x, y, eps)
    ok = cert.certify(x, y, eps)
    pred = cert.model(x).argmax(1)
    for i, rec in enumerate(out["inputs"]):
        assert rec["label"] == int(y[i]) and rec["prediction"] == int(pred[i]) and rec["certified"] == bool(ok[i])
        for j, v in enumerate(rec["margins"]):
            assert (v is None) == (j == int(y[i]))
            if v is not None:
                assert close(v, m[i, j].item())
        others = torch.cat([m[i, :y[i]], m[i, y[i] + 1:]])
        assert close(rec["margin_min"], others.min().item())
    tau = tightness(cert, x, eps)
    assert [close(a, b) for a, b in zip(out["tau_per_input"], tau["tau_bcp"])] == [True] * 3
    mean = sum(tau["tau_bcp"]) / 3
    assert close(out["tau_mean"], mean) and close(out["tau_lipschitz"], tau["tau_lipschitz"])
    assert close(out["tighter_than_lipschitz"], 1 - mean / tau["tau_lipschitz"], rel=1e-5)
    assert 0 < out["tighter_than_lipschitz"] < 1  # BCP translations never exceed the global Lipschitz ones


def test_networkx_graph_has_the_records_as_attributes(case):
    g, data = case["graph"], yaml.safe_load(case["texts"]["yaml"])
    assert isinstance(g, nx.DiGraph)
    assert list(g.nodes) == [n["name"] for n in data["nodes"]]
    for rec in data["nodes"]:
        attrs = dict(g.nodes[rec["name"]])
        assert attrs == {k: v for k, v in rec.items() if k != "name"}
    assert {tuple(e) for e in data["edges"]} == set(g.edges)
    assert g.graph["output"] == data["output"] and g.graph["margins_at"] == "fc2"
    assert nx.is_directed_acyclic_graph(g)


def dot_statements(text):
    nodes = {name: label for name, label, _ in
             re.findall(r'^  "([^"]+)" \[label="([^"]*)", fillcolor="(#[0-9a-f]{6})"', text, flags=re.M)}
    edges = set(re.findall(r'^  "([^"]+)" -> "([^"]+)";$', text, flags=re.M))
    return nodes, edges


def test_dot_names_every_node_and_edge(case):
    text, data = case["texts"]["dot"], json.loads(case["texts"]["json"])
    assert text.startswith("digraph bcpc {") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    nodes, edges = dot_statements(text)
    assert list(nodes) == [n["name"] for n in data["nodes"]]
    assert edges == {tuple(e) for e in data["edges"]}
    conv2 = next(n for n in data["nodes"] if n["name"] == "conv2")
    assert f"growth x{conv2['bounds']['width_growth']:.3g}" in nodes["conv2"]
    colours = re.findall(r'fillcolor="(#[0-9a-f]{6})"', text)
    assert len(set(colours)) > 1  # nodes that widen and nodes that tighten get different colours


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz (dot) is not installed")
def test_dot_renders_to_png_and_svg(case, tmp_path):
    png = render_dot(case["texts"]["dot"], tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = render_dot(case["report"], tmp_path / "g.svg").read_text()
    assert "<svg" in svg and "conv2" in svg


def test_render_without_dot_is_a_clear_error(case, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MissingToolError, match="graphviz"):
        render_dot(case["texts"]["dot"], tmp_path / "g.png")
    with pytest.raises(ConfigError, match="png, svg, pdf"):
        render_dot(case["texts"]["dot"], tmp_path / "g.gif")


def test_code_is_the_emitted_module(case):
    assert case["texts"]["code"] == case["cert"].code
    assert bcpc.inspect(case["cert"], format="code") == case["cert"].code


def test_table_shows_each_node_with_its_numbers(case):
    table, data = case["texts"]["table"], json.loads(case["texts"]["json"])
    lines = table.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("node "))
    rows = {ln.split()[0]: ln for ln in lines[head + 1:head + 1 + len(data["nodes"])]}
    assert list(rows) == [n["name"] for n in data["nodes"]]
    for n in data["nodes"]:
        if n["bounds"]:
            assert f"{n['bounds']['radius']:.4g}" in rows[n["name"]]
            assert f"{n['bounds']['width_mean']:.4g}" in rows[n["name"]]
        if n["lipschitz"]:
            assert f"{n['lipschitz']['upper']:.4g}" in rows[n["name"]]
    out = data["output"]
    assert f"bcp {out['tau_mean']:.4g}, global Lipschitz {out['tau_lipschitz']:.4g}" in table
    assert f"{100 * out['tighter_than_lipschitz']:.1f}% tighter" in table


def test_inspect_is_deterministic_and_equals_the_report(case):
    cert, x, y, eps = case["cert"], case["x"], case["y"], case["eps"]
    first = bcpc.inspect(cert, x, y, eps=eps, format="yaml")
    assert first == bcpc.inspect(cert, x, y, eps=eps, format="yaml") == case["texts"]["yaml"]
    assert bcpc.inspect(cert, x, y, eps=eps, format="json") == case["texts"]["json"]
    plain = bcpc.inspect(cert)
    assert plain == bcpc.inspect(cert, format="table") and "radius" not in plain and "conv2" in plain


def test_without_labels_the_predictions_are_the_reference(case):
    cert, x, eps = case["cert"], case["x"], case["eps"]
    data = json.loads(bcpc.inspect(cert, x, eps=eps, format="json"))
    assert data["run"]["labels"] == "predicted"
    assert all(i["label"] == i["prediction"] for i in data["output"]["inputs"])


def test_training_path_is_reported_as_such(case):
    cert, x, y, eps = case["cert"], case["x"], case["y"], case["eps"]
    data = json.loads(bcpc.inspect(cert, x, y, eps=eps, format="json", sound=False))
    with torch.no_grad():  # with autograd on, the training path would advance the Lipschitz cache
        nb = cert.node_bounds(x, eps, sound=False)
    assert data["run"]["sound"] is False
    assert all(i["certified"] is None for i in data["output"]["inputs"])
    assert close(data["nodes"][-1]["bounds"]["radius"], nb["fc2"].radius.double().mean().item(), rel=1e-5)


def test_float_formatting_is_fixed():
    assert num(1 / 3) == 0.333333 and num(123456789.0) == 123457000.0 and num(float("inf")) == "inf"
    assert num(float("-inf")) == "-inf" and num(float("nan")) == "nan" and num(None) is None


def test_bad_arguments_raise_clear_errors(case):
    cert, x = case["cert"], case["x"]
    with pytest.raises(ConfigError, match="unknown inspect format 'svg'"):
        bcpc.inspect(cert, format="svg")
    with pytest.raises(InvalidEpsilonError, match="give the radius"):
        bcpc.inspect(cert, x)
    with pytest.raises(InvalidInputError, match="pass the input"):
        bcpc.inspect(cert, eps=0.1)
    with pytest.raises(InvalidInputError, match="shape"):
        bcpc.inspect(cert, torch.rand(2, 1, 9, 9), eps=0.1)


# --- command line ---------------------------------------------------------------------------

def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bcpc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_help_lists_inspect_with_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "evaluate", "certify", "inspect", "demo"):
        assert cmd in out
    assert "bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28" in out
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])
    assert "--checkpoint" in capsys.readouterr().out


def test_cli_json_with_a_state_dict_checkpoint(tmp_path):
    torch.manual_seed(5)
    model = conv_small().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = run_cli("inspect", "bcpc.models:conv_small", "--input-shape", "1,28,28", "--checkpoint",
                  str(tmp_path / "w.pt"), "--eps", "0.5", "--n", "2", "--format", "json")
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    # the checkpoint's weights were loaded (not the seed-0 initialisation)
    cert = bcpc.compile(model, "l2", input_shape=(1, 28, 28), input_domain=(0.0, 1.0))
    upper = {r["node"]: r["upper"] for r in cert.lipschitz_table()}
    for n in data["nodes"]:
        if n["lipschitz"]:
            assert close(n["lipschitz"]["upper"], upper[n["name"]])
    x = torch.rand((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))  # --data random, --seed 0
    nb = cert.node_bounds(x, 0.5)
    assert set(nb) == {n["name"] for n in data["nodes"]}
    for n in data["nodes"]:
        assert close(n["bounds"]["width_mean"], (nb[n["name"]].upper - nb[n["name"]].lower).mean().item())
    assert data["run"]["labels"] == "predicted" and data["input_domain"] == [0.0, 1.0]


def test_cli_reads_a_training_checkpoint_and_its_config(tmp_path, capsys):
    torch.manual_seed(3)
    model = mlp(784, (32,), 10).eval()
    lip = bcpc.compile(model, "l2", input_shape=(1, 28, 28)).propagation.lip
    with torch.no_grad():  # a cache vector e_0: its estimate is ||W[:, 0]||, far from the converged one
        lip.get_submodule("_1").u.zero_()[0, 0] = 1.0
    torch.save({"format": "bcpc-checkpoint-v1", "model_state": model.state_dict(), "lip_state": lip.state_dict(),
                "config": {"norm": "l2", "input_domain": [0.0, 0.5], "dataset": "cifar10"}}, tmp_path / "c.pt")
    (tmp_path / "mymodels.py").write_text("import bcpc.models\n\ndef small():\n"
                                          "    return bcpc.models.mlp(784, (32,), 10)\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # MODULE is imported from the current folder, like `python -m`
    try:
        assert cli.main(["inspect", "mymodels:small", "--input-shape", "1,28,28", "--checkpoint", "c.pt",
                         "--eps", "0.1", "--n", "1", "--format", "yaml"]) == 0
    finally:
        os.chdir(cwd)
        sys.modules.pop("mymodels", None)
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["input_domain"] == [0.0, 0.5] and data["model"] == "Sequential"
    first = next(n for n in data["nodes"] if n["name"] == "_1")
    assert close(first["lipschitz"]["estimate"], model[1].weight[:, 0].norm().item())  # the checkpoint's cache
    assert len(data["output"]["inputs"]) == 1


@pytest.mark.parametrize("args,words", [
    (("bcpc.models",), "not of the form MODULE:FACTORY"),
    (("no_such_package.models:make",), "cannot import 'no_such_package.models'"),
    (("bcpc.models:make_4c3f",), "has no attribute 'make_4c3f'; callables there: BasicBlock"),
    (("bcpc.models:BasicBlock",), "must build the model with no arguments"),
    (("bcpc.data:SPLITS",), "not a function or class"),
    (("bcpc.models:conv_4c3f", "--input-shape", "3,32,32"), "--input-shape 3,32,32 does not fit"),
    (("bcpc.models:conv_4c3f", "--input-shape", "1,28,x"), "is not a shape"),
    (("bcpc.models:conv_4c3f", "--checkpoint", "missing.pt"), "does not exist"),
    (("bcpc.models:conv_4c3f", "--checkpoint", "MISMATCH"), "does not match the model"),
    (("bcpc.models:conv_4c3f", "--input-domain", "0"), "is not LOW,HIGH"),
    (("bcpc.models:conv_4c3f", "--eps", "1", "--n", "0"), "--n must be at least 1"),
    (("bcpc.models:conv_4c3f", "--eps", "-1"), "eps must be >= 0"),
    (("bcpc.models:mlp", "--data", "mnist", "--eps", "1", "--input-shape", "784"), "MNIST images have shape"),
    (("bcpc.models:conv_4c3f", "--render", "g.gif"), "cannot render DOT to 'gif'"),
])
def test_cli_errors_are_one_line_exit_2(args, words, tmp_path, capsys):
    args = list(args)
    if "MISMATCH" in args:
        torch.save(conv_small().state_dict(), tmp_path / "other.pt")
        args[args.index("MISMATCH")] = str(tmp_path / "other.pt")
    if "--input-shape" not in args:
        args += ["--input-shape", "1,28,28"]
    assert cli.main(["inspect", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bcpc: error:") and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_render_without_graphviz_fails_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli.main(["inspect", "bcpc.models:conv_4c3f", "--input-shape", "1,28,28", "--render", "g.svg"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("bcpc: error: rendering needs graphviz's `dot`")
    assert len(captured.err.strip().splitlines()) == 1


def test_cli_error_in_a_subprocess_has_no_traceback_unless_debug():
    out = run_cli("inspect", "bcpc.models:conv_4c3f", "--input-shape", "2,28,28")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("bcpc: error: --input-shape 2,28,28 does not fit")
    assert len(out.stderr.strip().splitlines()) == 1
    debug = run_cli("--debug", "inspect", "bcpc.models:conv_4c3f", "--input-shape", "2,28,28")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# --- docs/inspect.md shows what its commands print -----------------------------------------

_BLOCK = re.compile(r"```bash\n(?P<cmd>.*?)\n```\n\n```text\n(?P<out>.*?)```", flags=re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?")


def doc_commands(text=None):
    """(command, shown output) for every bash block of docs/inspect.md; every bash block is
    followed by the text block of its output."""
    text = DOC.read_text() if text is None else text
    pairs = [(m["cmd"].strip(), m["out"]) for m in _BLOCK.finditer(text)]
    assert len(pairs) == text.count("```bash"), "every bash block in docs/inspect.md needs its output block"
    return pairs


def run_doc_command(command, workdir: Path) -> str:
    """Run a documented shell command with `bcpc` meaning this checkout's bcpc."""
    bindir = workdir / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "bcpc"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bcpc "$@"\n')
    wrapper.chmod(0o755)
    data = workdir / "data"
    (ROOT / "data").mkdir(exist_ok=True)  # a fresh clone has none yet: the first command fetches MNIST into it
    if not data.is_symlink() and not data.exists():
        data.symlink_to(ROOT / "data", target_is_directory=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done.stdout


def _ulp(token: str) -> float:
    mant, _, exp = token.partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    return 10.0 ** (-decimals + (int(exp) if exp else 0))


def same_output(shown: str, now: str) -> bool:
    """Equal up to the last printed digit of each number (float32 power iteration and BLAS
    differ across machines in the last bits); everything else exactly, whitespace aside."""
    a, b = shown.strip().splitlines(), now.strip().splitlines()
    if len(a) != len(b):
        return False
    for la, lb in zip(a, b):
        if _NUMBER.sub("#", " ".join(la.split())) != _NUMBER.sub("#", " ".join(lb.split())):
            return False
        for ta, tb in zip(_NUMBER.findall(la), _NUMBER.findall(lb)):
            if abs(float(ta) - float(tb)) > 2.01 * max(_ulp(ta), _ulp(tb)):
                return False
    return True


def test_same_output_tolerates_only_last_digit_changes():
    assert same_output("a  1.234  x2  1.2e+04\n", "a 1.235 x2 1.2e+04")
    assert not same_output("a 1.234", "a 1.244")
    assert not same_output("a 1.234", "b 1.234")
    assert not same_output("a 1.234\nb", "a 1.234")


def test_docs_page_shows_the_current_output(tmp_path):
    pairs = doc_commands()
    assert len(pairs) >= 4 and all(cmd.startswith("bcpc inspect") for cmd, _ in pairs)
    for command, shown in pairs:
        if "--render" in command and shutil.which("dot") is None:
            continue  # the rendering command needs graphviz; the others still run
        now = run_doc_command(command, tmp_path)
        assert shown.strip(), f"docs/inspect.md shows no output for `{command}`"
        assert same_output(shown, now), f"docs/inspect.md is stale for `{command}`; now it prints:\n{now}"
        if "--render" in command:
            path = tmp_path / command.split("--render ")[1].split()[0]
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def update_docs() -> None:
    """Rewrite the output blocks of docs/inspect.md with what the commands print now."""
    import tempfile

    text = DOC.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        def fill(m):
            if "--render" in m["cmd"] and shutil.which("dot") is None:
                return m[0]  # needs graphviz: keep what the page shows (the test skips it too)
            out = run_doc_command(m["cmd"].strip(), Path(tmp))
            return f"```bash\n{m['cmd']}\n```\n\n```text\n{out}```"
        text = _BLOCK.sub(fill, text)
    DOC.write_text(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-docs"]:
        update_docs()
    else:
        sys.exit("usage: python tests/test_inspect.py --update-docs")

"""One report for ``bcpc evaluate``, ``certify``, ``audit`` and ``inspect``.

Every command builds the same dict: what was run (the bcpc version, the model and the SHA-256 of
its file, the data source and split, n, the threat model, the method, the attack settings, threads
and device, the wall time split into the one-off set-up and the per-image work) and what came out
(``results``, accuracies in percent). A field that does not apply is left out, never written empty
(no ``null``, ``{}``, ``[]`` or ``""``).

* :data:`FIELDS` is the schema: every field, its type, the commands that write it and those that
  must; docs/cli.md shows it as a table (generated from it by tests/test_report.py);
* :func:`build` assembles a report, :func:`validate` checks one against the schema;
* :func:`render_text` is the aligned summary the commands print by default (``--json`` prints the
  JSON instead), :func:`write` the file of ``--out``, :func:`read` loads one back (also the
  ``report.json`` of bcpc before this layout, for ``bcpc evaluate --plot-compare``).

Example::

    from bcpc import report
    rep = report.read("runs/eval/report.json")
    report.validate(rep)
    print(report.render_text(rep))
"""
from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SCHEMA = "bcpc-report/1"
COMMANDS = ("evaluate", "certify", "audit", "inspect")
_E, _C, _A, _I = COMMANDS
_ALL = COMMANDS
_RUN = (_E, _C, _A)  # the commands that run over a data set


@dataclass(frozen=True)
class Field:
    """One field of the report: ``path`` (dotted), ``kind`` (str, int, float, bool, pct: a float in
    [0, 100], list, map: text keys to pct, dict: free-form), the ``commands`` that may write it, the
    ones that must (``required``), and what it means."""

    path: str
    kind: str
    commands: tuple
    required: tuple
    doc: str


FIELDS = (
    Field("schema", "str", _ALL, _ALL, f"`{SCHEMA}`: the version of this layout"),
    Field("command", "str", _ALL, _ALL, "evaluate, certify, audit or inspect"),
    Field("bcpc_version", "str", _ALL, _ALL, "the bcpc that wrote the report"),
    Field("created", "str", _ALL, _ALL, "when the report was written (UTC, ISO 8601)"),
    Field("model.name", "str", _ALL, _ALL, "the architecture: a training run's model (a key of "
          "`bcpc.models.ARCHITECTURES`), else the class of the module the factory built"),
    Field("model.checkpoint", "str", _ALL, (), "the bcpc training checkpoint (`--checkpoint`)"),
    Field("model.factory", "str", _ALL, (), "`MODULE:FACTORY` that built the model (`--model`)"),
    Field("model.weights", "str", _ALL, (), "the file loaded into the factory's model (`--weights`: a state_dict "
          "or a bcpc checkpoint)"),
    Field("model.sha256", "str", _ALL, (), "SHA-256 of the checkpoint or weights file"),
    Field("model.seed", "int", _ALL, (), "the torch seed the factory ran under, where no weights were loaded "
          "(the weights are that seed's initialisation)"),
    Field("model.parameters", "int", _ALL, _ALL, "number of parameters"),
    Field("model.input_shape", "list", _ALL, _ALL, "the per-image input shape the model was compiled for"),
    Field("model.num_classes", "int", _ALL, _ALL, "number of classes (logits)"),
    Field("data.source", "str", _ALL, _RUN, "`mnist` or `cifar10` (bcpc's loaders), `npz`, `image-folder`, or "
          "`random` (inspect: seeded uniform inputs in the input domain, the predictions as labels)"),
    Field("data.path", "str", _ALL, (), "the data file or folder (mnist, cifar10: the data root)"),
    Field("data.split", "str", _ALL, (), "train, val or test, where the source has splits"),
    Field("data.sha256", "str", _ALL, (), "SHA-256 of an .npz file"),
    Field("data.classes", "list", _ALL, (), "an image folder's class folders, in label order"),
    Field("data.n", "int", _ALL, _RUN, "inputs used: the first n of the source"),
    Field("threat.norm", "str", _ALL, _ALL, "the norm of the perturbation ball: l2, linf, l1 or lp"),
    Field("threat.eps", "float", _ALL, _RUN, "its radius (inspect: only with `--eps`)"),
    Field("threat.input_domain", "list", _ALL, _ALL, "[low, high]: every perturbed input lies in it too; an open "
          "end is the string `-inf` / `inf`"),
    Field("threat.model_rounding", "bool", _ALL, (), "true: the certificates also hold for the float32 model's "
          "own arithmetic (`--model-rounding`); false (and absent, in reports written before it existed): for the "
          "model's function computed in float64"),
    Field("method", "str", _ALL, _ALL, "the bound behind the certificates: bcp, ibp or lipschitz"),
    Field("attack.pgd_steps", "int", (_E, _A), (_A,), "PGD steps (evaluate leaves the attack out with "
          "`--pgd-steps 0`)"),
    Field("attack.pgd_step_size", "float", (_E, _A), (_A,), "PGD step size (l2: normalised gradient steps)"),
    Field("attack.pgd_restarts", "int", (_E, _A), (_A,), "PGD runs per input: the first from the input "
          "itself, the others from random points"),
    Field("attack.pgd_loss", "str", (_E, _A), (_A,), "`margin`: PGD minimises z_y - max_j z_j"),
    Field("attack.pgd_keeps", "str", (_E, _A), (_A,), "`worst point seen`: the lowest-margin point over all "
          "steps and restarts"),
    Field("attack.paper_attack", "bool", (_E,), (), "also the BCP paper's PGD (cross-entropy, last iterate, the "
          "same steps and step size; `--paper-attack`)"),
    Field("attack.apgd_steps", "int", (_E,), (), "steps of each APGD attack (APGD-CE, then APGD-T; torchattacks; "
          "`--apgd-steps`)"),
    Field("attack.samples", "int", (_A,), (_A,), "points per certified input on the sphere / at box corners"),
    Field("runtime.device", "str", _ALL, _ALL, "where the model ran (`cpu`, `cuda:0`)"),
    Field("runtime.threads", "int", _ALL, _ALL, "torch CPU threads per process"),
    Field("runtime.processes", "int", _ALL, _ALL, "processes (torchrun; 1 without)"),
    Field("runtime.setup_s", "float", _ALL, _ALL, "seconds of one-off set-up: loading, compiling, the guaranteed "
          "layer norms of the first sound call"),
    Field("runtime.run_s", "float", _ALL, _ALL, "seconds of the per-input work after the set-up"),
    Field("runtime.per_image_ms", "float", _ALL, _RUN, "run_s per input, in milliseconds"),
    Field("runtime.images_per_s", "float", _ALL, _RUN, "inputs per second after the set-up"),
    Field("results.clean_pct", "pct", (_E,), (_E,), "clean accuracy"),
    Field("results.pgd_pct", "pct", (_E,), (), "accuracy under PGD (left out with `--pgd-steps 0`)"),
    Field("results.pgd_paper_attack_pct", "pct", (_E,), (), "accuracy under the paper's attack (`--paper-attack`)"),
    Field("results.apgd_pct", "pct", (_E,), (), "accuracy under APGD-CE + APGD-T (`--apgd-steps`)"),
    Field("results.robust_all_attacks_pct", "pct", (_E,), (), "correct under every attack run (PGD, the paper's, "
          "APGD)"),
    Field("results.certified_broken_by_apgd", "int", (_E,), (), "certified inputs APGD misclassifies: always 0 "
          "(evaluate stops with an error otherwise)"),
    Field("results.certified", "int", _ALL, _RUN, "inputs certified (sound: every point of the ball is classified "
          "as the label)"),
    Field("results.verified_pct", "pct", _ALL, _RUN, "verified accuracy: certified / n"),
    Field("results.verified_pct_vs_eps", "map", (_E,), (), "radius (text) -> verified accuracy at that radius "
          "(`--eps-curve`)"),
    Field("results.attacked", "int", (_A,), (_A,), "certified inputs attacked"),
    Field("results.violations", "int", (_A,), (_A,), "certified inputs some attack point misclassifies: must be 0"),
    Field("results.min_gap", "float", (_A,), (), "smallest (attacked margin - certified margin lower bound); >= 0, "
          "small means a tight bound"),
    Field("results.min_attacked_margin", "float", (_A,), (), "smallest margin an attack reached"),
    Field("results.tau_n", "int", (_E, _I), (), "inputs the tightness tau was measured on (`--tightness-n`)"),
    Field("results.tau_bcp", "float", (_E, _I), (), "mean tightness tau of the method's bound (paper Fig. 3; lower "
          "is tighter)"),
    Field("results.tau_lipschitz", "float", (_E, _I), (), "tau with the global Lipschitz bound"),
    Field("results.tighter_than_lipschitz_pct", "float", (_E, _I), (), "1 - tau_bcp / tau_lipschitz, in percent"),
    Field("results.nodes", "int", (_I,), (_I,), "nodes of the user's graph"),
    Field("results.weight_layers", "int", (_I,), (_I,), "layers with a weight (a Lipschitz cache)"),
    Field("results.lipschitz_gap_max_pct", "float", (_I,), (), "largest gap between a layer's guaranteed "
          "Lipschitz bound and its estimate, in percent"),
    Field("results.margin_min_mean", "float", (_I,), (), "mean over the inputs of the smallest certified margin"),
    Field("details", "dict", (_E, _I), (), "records too long for the summary: evaluate: `tau_bcp_per_input`; "
          "inspect: the per-node records of `--format json`"),
)
_BY_PATH = {f.path: f for f in FIELDS}


class ReportError(ValueError):
    """A report that does not follow :data:`FIELDS` (a bcpc bug, or a file that is not a report)."""


# --- building ------------------------------------------------------------------------------

def pct(count, n) -> float:
    """``100 * count / n``, rounded to 2 decimals."""
    return round(100.0 * count / n, 2)


def percent(fraction: float) -> float:
    """A fraction in percent, rounded to 2 decimals."""
    return round(100.0 * fraction, 2)


def num(value, digits: int = 6):
    """A float rounded to ``digits`` significant digits (JSON has no inf/nan: those become text;
    None stays None)."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(f"{value:.{digits}g}")


def norm_name(p: float) -> str:
    return "linf" if math.isinf(p) else f"l{p:g}"


def domain(lo, hi) -> list:
    """An input domain for the report: ``[low, high]``, an open end as ``"-inf"`` / ``"inf"``."""
    return [num(lo) if lo is not None else "-inf", num(hi) if hi is not None else "inf"]


def runtime(setup_s: float, run_s: float, n: int, device: str, threads: int, processes: int = 1) -> dict:
    """The ``runtime`` section: set-up and per-input time kept apart, so the rate is the rate."""
    out = {"device": device, "threads": threads, "processes": processes, "setup_s": round(setup_s, 2),
           "run_s": round(run_s, 2)}
    if n and run_s > 0:
        out["per_image_ms"] = num(1000.0 * run_s / n, 4)
        out["images_per_s"] = num(n / run_s, 4)
    return out


def prune(value):
    """Drop None, empty strings, lists and dicts, recursively (a report has no empty fields)."""
    if isinstance(value, dict):
        out = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if not _empty(v)}
    if isinstance(value, (list, tuple)):
        return [prune(v) for v in value]
    return value


def _empty(v) -> bool:
    return v is None or (isinstance(v, (str, list, tuple, dict)) and len(v) == 0)


def build(command: str, *, model: dict, threat: dict, method: str, runtime: dict, results: dict,
          data: Optional[dict] = None, attack: Optional[dict] = None, details: Optional[dict] = None) -> dict:
    """A report of ``command`` in the layout of :data:`FIELDS` (empty fields dropped)."""
    import bcpc

    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return prune({"schema": SCHEMA, "command": command, "bcpc_version": bcpc.__version__, "created": created,
                  "model": model, "data": data, "threat": threat, "method": method, "attack": attack,
                  "runtime": runtime, "results": results, "details": details})


# --- checking ------------------------------------------------------------------------------

def _leaves(value, prefix=""):
    for k, v in value.items():
        path = f"{prefix}{k}"
        field = _BY_PATH.get(path)
        if isinstance(v, dict) and (field is None or field.kind not in ("map", "dict")):
            if not v:
                yield path, v
            yield from _leaves(v, path + ".")
        else:
            yield path, v


def _kind_ok(kind: str, v) -> bool:
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return number and math.isfinite(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "pct":
        return number and 0.0 <= v <= 100.0
    if kind == "list":
        return isinstance(v, list)
    if kind == "map":
        return isinstance(v, dict) and all(isinstance(k, str) and _kind_ok("pct", x) for k, x in v.items())
    if kind == "dict":
        return isinstance(v, dict)
    raise AssertionError(kind)


def problems(report) -> list:
    """Everything in ``report`` that does not follow :data:`FIELDS` (an empty list: it does)."""
    if not isinstance(report, dict):
        return [f"a report is a JSON object, not a {type(report).__name__}"]
    command = report.get("command")
    if command not in COMMANDS:
        return [f"command is {command!r}; expected one of {', '.join(COMMANDS)}"]
    out = []
    if report.get("schema") != SCHEMA:
        out.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    seen = set()
    for path, v in _leaves(report):
        field = _BY_PATH.get(path)
        seen.add(path)
        if _empty(v):
            out.append(f"{path}: empty")
        elif field is None:
            out.append(f"{path}: not a field of {SCHEMA}")
        elif command not in field.commands:
            out.append(f"{path}: not written by {command}")
        elif not _kind_ok(field.kind, v):
            out.append(f"{path}: {v!r} is not a {field.kind}")
    for field in FIELDS:
        if command in field.required and field.path not in seen:
            out.append(f"{field.path}: missing (required for {command})")
    return out


def validate(report) -> dict:
    """Raise :class:`ReportError` listing every problem of ``report``; return it unchanged."""
    found = problems(report)
    if found:
        raise ReportError("not a valid bcpc report: " + "; ".join(found))
    return report


# --- files ---------------------------------------------------------------------------------

def write(report: dict, path) -> Path:
    """Write ``report`` as JSON (2-space indent, keys in the report's order) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(report))
    return path


def to_json(report: dict) -> str:
    """JSON text: objects indented by 2, lists of plain values on one line."""
    return _dump(report, 0) + "\n"


def _dump(value, depth: int) -> str:
    pad = "  " * (depth + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {_dump(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return json.dumps(list(value), allow_nan=False)
        return "[\n" + ",\n".join(pad + _dump(v, depth + 1) for v in value) + "\n" + "  " * depth + "]"
    return json.dumps(value, allow_nan=False)


def read(path) -> dict:
    """Load a report; a ``report.json`` of bcpc before :data:`SCHEMA` (accuracies as fractions,
    ``verified_acc_vs_eps``) is converted to this layout as far as it carries the fields.
    Raises :class:`ReportError` for a file that is neither."""
    from bcpc.errors import ConfigError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"report {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"report {path} is not JSON ({exc})") from None
    if isinstance(data, dict) and data.get("schema") == SCHEMA:
        return data
    if isinstance(data, dict) and "verified_acc" in data and "n" in data:
        return _from_legacy(data)
    raise ConfigError(f"{path} is not a bcpc report (no 'schema': {SCHEMA!r})")


def _from_legacy(d: dict) -> dict:
    """The evaluate report of bcpc before the common layout, in this one, as far as it goes (enough
    to plot and summarise; it lacks what the old report did not record, so it does not validate)."""
    pgd = d.get("pgd") or {}
    results = {"clean_pct": 100 * d["clean_acc"], "pgd_pct": None if d.get("pgd_acc") is None else 100 * d["pgd_acc"],
               "pgd_paper_attack_pct": 100 * d["pgd_acc_paper_attack"] if "pgd_acc_paper_attack" in d else None,
               "verified_pct": 100 * d["verified_acc"], "certified": round(d["verified_acc"] * d["n"]),
               "verified_pct_vs_eps": {k: round(100 * v, 2) for k, v in (d.get("verified_acc_vs_eps") or {}).items()}}
    return prune({
        "schema": SCHEMA, "command": "evaluate", "bcpc_version": "unknown", "created": "unknown",
        "model": {"name": d.get("model", "unknown"), "checkpoint": d.get("checkpoint")},
        "data": {"source": "mnist" if "mnist" in str(d.get("model", "")) else "unknown", "split": d.get("split"),
                 "n": d["n"]},
        "threat": {"norm": d.get("norm", "l2"), "eps": d["eps"]},
        "method": "bcp",
        "attack": {"pgd_steps": pgd.get("steps"), "pgd_step_size": pgd.get("step_size"),
                   "pgd_restarts": pgd.get("restarts"), "pgd_loss": pgd.get("loss"), "pgd_keeps": pgd.get("keeps")},
        "runtime": {"processes": d.get("processes"), "run_s": d.get("seconds")},
        "results": {k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()},
    })


# --- the summary ---------------------------------------------------------------------------

def _g(v, digits: int = 4) -> str:
    return v if isinstance(v, str) else f"{v:.{digits}g}"


def _p(v) -> str:
    return f"{v:.2f}%"


def _model_line(m: dict) -> str:
    if "checkpoint" in m:
        text = f"{m['name']}, checkpoint {m['checkpoint']}"
    elif "factory" in m:
        text = f"{m['factory']} ({m['name']})" + (f", weights {m['weights']}" if "weights" in m else "")
    else:
        text = m["name"]
    if "sha256" in m:
        text += f" (sha256 {m['sha256'][:12]}...)"
    if "seed" in m:
        text += f", initialised with seed {m['seed']}"
    shape = "x".join(map(str, m["input_shape"]))
    return text + f"; input {shape}, {m['num_classes']} classes, {m['parameters']:,} parameters"


def _data_line(d: dict) -> str:
    source = d["source"]
    if source in ("mnist", "cifar10"):
        text = source.upper() if source == "mnist" else "CIFAR-10"
        text += f" {d['split']} split" if "split" in d else ""
    elif source == "random":
        text = "seeded random inputs in the input domain (labels: the predictions)"
    else:
        text = f"{'image folder' if source == 'image-folder' else source} {d.get('path', '')}".rstrip()
        if "split" in d:
            text += f" ({d['split']} split)"
        if "classes" in d:
            text += f", {len(d['classes'])} classes"
        if "sha256" in d:
            text += f" (sha256 {d['sha256'][:12]}...)"
    return text + (f", first {d['n']:,} inputs" if "n" in d else "")


def _threat_line(r: dict) -> str:
    t = r["threat"]
    lo, hi = t["input_domain"]
    dom = "unbounded inputs" if (lo, hi) == ("-inf", "inf") else f"inputs in [{_g(lo)}, {_g(hi)}]"
    ball = f"{t['norm']} ball of radius {_g(t['eps'])}" if "eps" in t else f"{t['norm']} norm (no radius given)"
    arithmetic = ", the float32 model's own rounding included" if t.get("model_rounding") else ""
    return f"{ball}, {dom}{arithmetic}"


def _attack_line(a: dict, command: str) -> str:
    restarts = a["pgd_restarts"]
    text = (f"PGD on the margin, {a['pgd_steps']} steps of {_g(a['pgd_step_size'])}, {restarts} "
            f"restart{'s' if restarts != 1 else ''}, worst point kept")
    if command == "audit":
        text += f"; plus {a['samples']} sphere / corner samples per certified input"
    if a.get("paper_attack"):
        text += "; and the paper's PGD (cross-entropy, last iterate)"
    if a.get("apgd_steps"):
        text += f"; and APGD-CE + APGD-T, {a['apgd_steps']} steps each"
    return text


def _amount(v: float) -> str:
    """3 significant digits, without exponents: 0.334, 12.5, 210, 3,112."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _time_line(rt: dict) -> str:
    text = f"set-up {_amount(rt['setup_s'])} s (loading, compiling, guaranteed layer norms)"
    if "per_image_ms" in rt:
        text += (f", then {_amount(rt['per_image_ms'])} ms per input ({_amount(rt['images_per_s'])}/s, "
                 f"{_amount(rt['run_s'])} s)")
    elif rt.get("run_s"):
        text += f", then {_amount(rt['run_s'])} s"
    procs = rt["processes"]
    return text + f"; {rt['device']}, {rt['threads']} thread{'s' if rt['threads'] != 1 else ''}" + (
        f" x {procs} processes" if procs > 1 else "")


def _result_rows(r: dict) -> list:
    res, cmd = r["results"], r["command"]
    n = (r.get("data") or {}).get("n")
    rows = []
    if "clean_pct" in res:
        rows.append(("clean accuracy", _p(res["clean_pct"]), ""))
    if "pgd_pct" in res:
        rows.append(("PGD accuracy", _p(res["pgd_pct"]), "bcpc's attack: margin, worst point seen"))
    if "pgd_paper_attack_pct" in res:
        rows.append(("PGD accuracy, paper", _p(res["pgd_paper_attack_pct"]), "the BCP paper's attack"))
    if "apgd_pct" in res:
        rows.append(("APGD accuracy", _p(res["apgd_pct"]), "APGD-CE + APGD-T (torchattacks)"))
    if "robust_all_attacks_pct" in res:
        rows.append(("robust, all attacks", _p(res["robust_all_attacks_pct"]), "correct under every attack above"))
    if "certified_broken_by_apgd" in res:
        rows.append(("certified broken", f"{res['certified_broken_by_apgd']:,}", "certified inputs APGD broke: must be 0"))
    if "verified_pct" in res:
        of = f"{res['certified']:,} of {n:,} certified" if n else f"{res['certified']:,} certified"
        rows.append(("verified accuracy", _p(res["verified_pct"]), f"{of} (sound)"))
    for e, v in (res.get("verified_pct_vs_eps") or {}).items():
        rows.append((f"  at eps {e}", _p(v), ""))
    if cmd == "audit":
        rows.append(("attacked", f"{res['attacked']:,}", "certified inputs, each with every attack above"))
        rows.append(("violations", f"{res['violations']:,}", "must be 0"))
        if "min_gap" in res:
            rows.append(("min gap", _g(res["min_gap"]), "attacked margin - certified margin, >= 0"))
    if "tau_bcp" in res:
        note = f"over {res['tau_n']} inputs; " if "tau_n" in res else ""
        rows.append((f"tightness tau ({r['method']})", _g(res["tau_bcp"]), note + "lower is tighter"))
        if "tau_lipschitz" in res:
            rows.append(("tau, global Lipschitz", _g(res["tau_lipschitz"]),
                         f"{r['method']} is {res['tighter_than_lipschitz_pct']:.1f}% tighter"))
    if cmd == "inspect":
        rows.append(("nodes", str(res["nodes"]), f"{res['weight_layers']} with a weight"))
        if "lipschitz_gap_max_pct" in res:
            rows.append(("Lipschitz gap, max", f"{res['lipschitz_gap_max_pct']:.2f}%",
                         "guaranteed bound / estimate - 1"))
        if "margin_min_mean" in res:
            rows.append(("min margin, mean", _g(res["margin_min_mean"]), "certified lower bound; > 0 certifies"))
    return rows


def render_text(report: dict) -> str:
    """The aligned human summary of a report (what the commands print without ``--json``)."""
    r = report
    head = [("model", _model_line(r["model"]))]
    if "data" in r:
        head.append(("data", _data_line(r["data"])))
    head.append(("threat", _threat_line(r)))
    lip = "" if r["method"] == "ibp" else ", guaranteed Lipschitz bounds"
    head.append(("method", f"{r['method']}, sound (float64{lip})"))
    if "attack" in r:
        head.append(("attack", _attack_line(r["attack"], r["command"])))
    head.append(("time", _time_line(r["runtime"])))
    width = max(len(k) for k, _ in head)
    lines = [f"bcpc {r['command']} (bcpc {r['bcpc_version']})"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in head]
    rows = _result_rows(r)
    if rows:
        lines.append("")
        w0 = max(len(a) for a, _, _ in rows)
        w1 = max(len(b) for _, b, _ in rows)
        lines += [f"  {a.ljust(w0)}  {b.rjust(w1)}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines) + "\n"

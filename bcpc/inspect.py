"""``bcpc.inspect``: what the compiler did, node by node, and where a bound gets loose.

``inspect(cert)`` lists every node of the user's (canonicalized) graph with its canonical op, the
rule that bounds it, its output shape and the user's source line, and for weight-dependent affine
nodes the power-iteration *estimate* of the layer's Lipschitz constant next to the guaranteed
*upper* bound the certificates use (and their gap). ``inspect(cert, x, y, eps=...)`` adds, per
node, the bounds for that input: ball radius, mean and max box width, the mean box width the same
model gets with ``method="ibp"`` (how much the ball-derived box tightened the interval box: the
BCP effect), and how much the node widened the box of its input; at the output the certified
margins and the paper's tightness measure tau with BCP and with the global Lipschitz bound.

Everything is collected once into a :class:`Report` (one ordered list of :class:`NodeRecord`),
and every format is rendered from it:

* ``"table"`` – fixed-width text, for ``print``;
* ``"yaml"`` / ``"json"`` – deterministic (insertion order, floats rounded to
  :data:`SIGNIFICANT_DIGITS` significant digits, non-finite values as the strings ``"inf"``,
  ``"-inf"``, ``"nan"``); both load back to the same data;
* ``"dot"`` – graphviz source, nodes coloured by how much they loosen the bound
  (:func:`render_dot` turns it into PNG/SVG/PDF when graphviz is installed);
* ``"networkx"`` – a ``networkx.DiGraph`` with the same attributes as the YAML records;
* ``"code"`` – the emitted propagation module's source (``cert.code``).

The module attribute ``bcpc.inspect`` is the function; import helpers from here with
``from bcpc.inspect import render_dot, build_report``.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.fx as fx

from bcpc import registry, report
from bcpc.errors import ConfigError, InvalidEpsilonError, InvalidInputError, MissingToolError
from bcpc.meta import info, where

FORMATS = ("table", "yaml", "json", "dot", "networkx", "code")
RENDER_FORMATS = ("png", "svg", "pdf")
#: yaml/json floats are rounded to this many significant digits (deterministic text).
SIGNIFICANT_DIGITS = 6


# --- records ------------------------------------------------------------------------------

@dataclass
class NodeRecord:
    """One node of the user's graph (placeholders and calls; weights and the output are left out)."""

    name: str
    op: str  # canonical op, e.g. "torch.conv2d"
    rule: Optional[str]  # bound rule name; None for nodes computed plainly (not perturbed)
    family: Optional[str]  # rule family (affine, monotone, merge, reshape, pool, input)
    shape: Optional[list]  # per-sample output shape
    source: str  # the user's source line, or the module that produced the node
    perturbed: bool
    inputs: list  # names of the recorded nodes this one reads
    residual_merge: bool
    last_affine: bool
    #: weight-dependent affine nodes: {"estimate", "upper", "gap"} (gap = upper / estimate - 1)
    lipschitz: Optional[dict] = None
    #: with an input (means over the inputs): {"radius", "radius_growth", "width_mean", "width_max",
    #: "ibp_width_mean", "ibp_ratio", "width_growth"}; see docs/inspect.md
    bounds: Optional[dict] = None


@dataclass
class Report:
    model: str
    norm: str
    method: str
    input_shape: list
    input_domain: list
    num_classes: int
    margins_at: Optional[str]  # the last affine node (margins solved at its input), or None
    nodes: list = field(default_factory=list)  # NodeRecord, in graph order
    edges: list = field(default_factory=list)  # [src, dst] between recorded nodes
    run: Optional[dict] = None  # with an input: eps, sound, n_inputs, labels
    output: Optional[dict] = None  # with an input: per-input margins, tau

    def as_dict(self) -> dict:
        """Plain data (dicts, lists, str, int, float, bool, None) in a fixed key order."""
        return _plain(asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return num(value)
    return value


def num(value):
    """A float rounded to :data:`SIGNIFICANT_DIGITS` significant digits; non-finite as a string."""
    return report.num(value, SIGNIFICANT_DIGITS)


_norm_name = report.norm_name


# --- collecting ---------------------------------------------------------------------------

def _op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "call_function":
        return registry.describe_spelling(registry.Spelling(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return f"module {node.target}"


def _source(node: fx.Node) -> str:
    """The user's source line; for built-in modules called from nn.Sequential, the module path."""
    if node.op == "placeholder":
        return "input"
    line = where(node)
    if line != "<source unknown>":
        return line
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        entry = list(stack.values())[-1]  # (qualified path, class) in torch 2.x
        path, cls = entry if isinstance(entry, tuple) and len(entry) == 2 else (list(stack)[-1], entry)
        name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].rstrip("'>"))
        return f"module {path} ({name})"
    return line


def _recorded_nodes(cert) -> list:
    return [n for n in cert.canonical.graph.nodes if n.op not in ("get_attr", "output")]


def _lipschitz_rows(cert) -> dict:
    rows = {}
    for row in cert.lipschitz_table():
        est, upper = row["estimate"], row["upper"]
        gap = upper / est - 1 if est > 0 else math.inf
        rows[row["node"]] = {"estimate": est, "upper": upper, "gap": gap}
    return rows


def _width_stats(b) -> tuple:
    if b.lower is None or b.upper is None:
        return None, None
    w = (b.upper - b.lower).double()
    return float(w.mean()), float(w.max())


def _radius(b) -> Optional[float]:
    return None if b.radius is None else float(b.radius.double().mean())


def _ibp_bounds(cert, x, eps, sound) -> Optional[dict]:
    """Node bounds of the same model compiled with method="ibp" (box only), for comparison."""
    if cert.method != "bcp":
        return None
    from bcpc.api import compile as compile_model

    ibp = compile_model(cert.model, cert.norm, input_shape=cert.input_shape, input_domain=cert.input_domain,
                        method="ibp")
    with torch.no_grad():
        return ibp.node_bounds(x, eps, sound=sound)


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _node_bounds(records, bounds, ibp) -> None:
    by_name = {r.name: r for r in records}
    for rec in records:
        b = bounds.get(rec.name)
        if b is None:
            continue
        width_mean, width_max = _width_stats(b)
        ibp_width = _width_stats(ibp[rec.name])[0] if ibp is not None and rec.name in ibp else None
        radius = _radius(b)
        in_radii = [by_name[i].bounds["radius"] for i in rec.inputs
                    if by_name[i].bounds is not None and by_name[i].bounds["radius"] is not None]
        in_widths = [by_name[i].bounds["width_mean"] for i in rec.inputs
                     if by_name[i].bounds is not None and by_name[i].bounds["width_mean"] is not None]
        rec.bounds = {
            "radius": radius,
            "radius_growth": _ratio(radius, max(in_radii)) if in_radii else None,
            "width_mean": width_mean,
            "width_max": width_max,
            "ibp_width_mean": ibp_width,
            "ibp_ratio": _ratio(ibp_width, width_mean),
            "width_growth": _ratio(width_mean, max(in_widths)) if in_widths else None,
        }


def _output_section(cert, x, y, eps, sound) -> dict:
    from bcpc.evaluate import tightness

    with torch.no_grad():
        out = cert(x, eps, y, sound=sound)
    labels = out.labels
    pred = out.logits.argmax(1)
    certified = cert.certify(x, labels, eps).tolist() if sound else [None] * x.shape[0]
    inputs = []
    for i in range(x.shape[0]):
        m = out.margins[i].double()
        others = [float(v) for j, v in enumerate(m.tolist()) if j != int(labels[i])]
        inputs.append({
            "index": i,
            "label": int(labels[i]),
            "prediction": int(pred[i]),
            "certified": certified[i],
            "margin_min": min(others) if others else None,
            "margins": [None if j == int(labels[i]) else float(v) for j, v in enumerate(m.tolist())],
        })
    section = {"inputs": inputs, "tau_mean": None, "tau_per_input": None, "tau_lipschitz": None,
               "tighter_than_lipschitz": None}
    if cert.method == "ibp":  # tau's Lipschitz side needs the ball at the last layer, which ibp drops
        return section
    tau = tightness(cert, x, float(eps))
    tau_mean = sum(tau["tau_bcp"]) / len(tau["tau_bcp"])
    lip = tau["tau_lipschitz"]
    section.update(tau_mean=tau_mean, tau_per_input=list(tau["tau_bcp"]), tau_lipschitz=lip,
                   tighter_than_lipschitz=(1 - tau_mean / lip) if lip else None)
    return section


def _reuse_certification_bounds(cert) -> None:
    """Hand the guaranteed layer norms of the float64 certification copy to the model's own
    Lipschitz caches (which ``lipschitz_table`` reads), instead of computing each exact norm twice.
    Sound: a float32 weight converts to float64 exactly, and every guaranteed bound is computed in
    float64 from the float64 values (bcpc.lipschitz), so both computations get the same numbers;
    each handed-over bound stays keyed to the exact weight values it belongs to."""
    twin = cert._twin
    if twin is None:
        return
    for lip_name, weight_name in cert._lowered.lipschitz.values():
        if not weight_name:
            continue
        own, copy = cert.propagation.lip.get_submodule(lip_name), twin.lip.get_submodule(lip_name)
        weight, copy_weight = cert.model.get_parameter(weight_name), twin.model.get_parameter(weight_name)
        if not copy.has_upper(copy_weight):
            continue
        if torch.equal(weight.detach().to(copy_weight.dtype), copy_weight.detach()):
            own._bound_weight, own._bound = weight.detach().clone(), copy._bound


def _guaranteed_bounds(cert, progress: bool) -> None:
    """The guaranteed norm of every layer of the model itself, one progress step per layer."""
    from tqdm.auto import tqdm

    layers = [(origin, lip, cert.model.get_parameter(weight))
              for origin, (lip, weight) in cert.lipschitz_modules.items() if weight]
    layers = [(origin, lip, w) for origin, lip, w in layers if not lip.has_upper(w)]
    with tqdm(layers, disable=not progress or not layers, desc="guaranteed layer norms", unit="layer", leave=False,
              dynamic_ncols=True) as bar:
        for origin, lip, weight in bar:
            bar.set_postfix_str(f"{origin}: {lip.kind} {'x'.join(map(str, lip.in_shape))}", refresh=True)
            with torch.no_grad():
                lip.upper(weight)


def build_report(cert, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, eps=None,
                 sound: bool = True, progress: bool = False) -> Report:
    """Collect everything :func:`inspect` renders (see the module docstring); ``progress`` shows
    a bar while the guaranteed layer norms are computed (seconds per layer for large convolutions)."""
    if x is None and (y is not None or eps is not None):
        raise InvalidInputError("inspect: eps and y describe an input; pass the input too: "
                                "inspect(cert, x, y, eps=...)")
    if x is not None:
        if eps is None:
            raise InvalidEpsilonError("inspect: with an input, give the radius too: inspect(cert, x, y, eps=1.58)")
        if isinstance(eps, torch.Tensor):
            if eps.numel() != 1:
                raise InvalidEpsilonError("inspect takes one eps for the whole batch (a number)")
            eps = float(eps)
        cert._check_eps(eps, x.shape[0])
        cert._check(x, y)
        eps = float(eps)

    lo, hi = cert.input_domain
    an = cert.analysis
    report = Report(model=type(cert.model).__name__, norm=_norm_name(cert.norm), method=cert.method,
                    input_shape=list(cert.input_shape), input_domain=[lo, hi], num_classes=cert.num_classes,
                    margins_at=an.last_affine.name if an.last_affine is not None else None)
    nodes = _recorded_nodes(cert)
    names = {n.name for n in nodes}
    if x is not None and sound:  # the certification copy needs the exact norms anyway: compute them once
        cert.prepare(progress=progress)
        _reuse_certification_bounds(cert)
    _guaranteed_bounds(cert, progress)
    lip = _lipschitz_rows(cert)
    for n in nodes:
        rec = info(n)
        rule_name = cert.rules.get(rec.origin)
        rule = registry.rule_for(n.target) if n.op == "call_function" else None
        family = "input" if n.op == "placeholder" else (rule.family if rule is not None and rule_name else None)
        inputs = [a.name for a in n.all_input_nodes if a.name in names]
        report.nodes.append(NodeRecord(
            name=n.name, op=_op_name(n), rule=rule_name, family=family,
            shape=list(rec.shape[1:]) if rec.shape is not None else None,
            source=_source(n), perturbed=bool(rec.perturbed), inputs=inputs,
            residual_merge=bool(rec.residual_merge), last_affine=bool(rec.last_affine),
            lipschitz=lip.get(rec.origin)))
        report.edges.extend([a, n.name] for a in inputs)

    if x is not None:
        with torch.no_grad():
            bounds = cert.node_bounds(x, eps, sound=sound)
        _node_bounds(report.nodes, bounds, _ibp_bounds(cert, x, eps, sound))
        report.run = {"eps": eps, "sound": bool(sound), "n_inputs": int(x.shape[0]),
                      "labels": "given" if y is not None else "predicted"}
        report.output = _output_section(cert, x, y, eps, sound)
    return report


# --- rendering ----------------------------------------------------------------------------

def _g(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _shape_text(shape) -> str:
    return "-" if shape is None else ("x".join(str(s) for s in shape) or "scalar")


_FILE_LINE = re.compile(r'^File "(?P<path>[^"]*)", line (?P<line>\d+), in (?P<fn>[^:]+)(?:: (?P<code>.*))?$')


def _short_source(source: str, limit: int = 56) -> str:
    m = _FILE_LINE.match(source)
    if m:
        source = f"{Path(m['path']).name}:{m['line']} {m['code'] or m['fn']}"
    return source if len(source) <= limit else source[:limit - 3] + "..."


def _columns(rows: list, header: list, left: int = 1, text_last: bool = False) -> list:
    """Fixed-width columns: the first ``left`` columns (and the last with ``text_last``)
    left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    out = []
    for r in [header] + rows:
        cells = [str(c).ljust(w) if i < left or (text_last and i == len(header) - 1) else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def _short_op(op: str) -> str:
    return op.replace("torch.nn.functional.", "F.")


def _domain_text(domain) -> str:
    lo, hi = domain
    if lo is None and hi is None:
        return "unbounded"
    return f"[{_g(lo) if lo is not None else '-inf'}, {_g(hi) if hi is not None else 'inf'}]"


def render_table(report: Report) -> str:
    r = report
    lines = [f"bcpc.inspect: {r.model}, norm {r.norm}, method {r.method}, input "
             f"({', '.join(map(str, r.input_shape))}) in {_domain_text(r.input_domain)}, {r.num_classes} classes"]
    if r.margins_at:
        lines.append(f"margins are solved exactly at the input of {r.margins_at} (DESIGN.md §3)")
    if r.run:
        kind = "sound: float64, guaranteed Lipschitz bounds" if r.run["sound"] else "training path: estimates"
        lines.append(f"bounds for {r.run['n_inputs']} input(s) at eps {_g(r.run['eps'])} ({kind}); "
                     "values are means over the inputs")
    lines.append("")
    header = ["node", "op", "rule", "shape", "lip est", "lip upper", "gap"]
    if r.run:
        header += ["radius", "width", "width max", "ibp width", "ibp/width", "growth"]
    header.append("source")
    rows = []
    for n in r.nodes:
        lip = n.lipschitz or {}
        row = [n.name, _short_op(n.op), n.rule or "-", _shape_text(n.shape), _g(lip.get("estimate")),
               _g(lip.get("upper")), _pct(lip.get("gap")) if lip else "-"]
        if r.run:
            b = n.bounds or {}
            row += [_g(b.get("radius")), _g(b.get("width_mean")), _g(b.get("width_max")),
                    _g(b.get("ibp_width_mean")), _g(b.get("ibp_ratio")), _g(b.get("width_growth"), 3)]
        row.append(_short_source(n.source))
        rows.append(row)
    lines += _columns(rows, header, left=3, text_last=True)
    lines.append("")
    lines.append("lip est / lip upper: power-iteration estimate (training) / guaranteed bound (certificates); "
                 "gap = upper / est - 1")
    if r.run:
        lines.append("width = upper - lower (mean, max over inputs and elements); ibp width: same model compiled "
                     "with method='ibp'; growth = width / widest input's width")
    if r.output:
        o = r.output
        lines.append("")
        head = ["input", "label" if r.run["labels"] == "given" else "label (pred)", "prediction", "certified",
                "min margin"]
        rows = [[str(i["index"]), str(i["label"]), str(i["prediction"]),
                 {True: "yes", False: "no", None: "-"}[i["certified"]], _g(i["margin_min"])] for i in o["inputs"]]
        lines += _columns(rows, head)
        lines.append("")
        if o["tau_mean"] is None:
            lines.append("tau: not computed (method ibp keeps no ball at the last layer)")
        else:
            tau = f"tau (mean l1 translation, lower is tighter): {r.method} {_g(o['tau_mean'])}"
            if o["tau_lipschitz"] is not None:
                tau += (f", global Lipschitz {_g(o['tau_lipschitz'])}: {r.method} is "
                        f"{_pct(o['tighter_than_lipschitz'])} tighter")
            lines.append(tau)
    return "\n".join(lines) + "\n"


def render_yaml(report: Report) -> str:
    import yaml

    return yaml.safe_dump(report.as_dict(), sort_keys=False, default_flow_style=None, width=1000,
                          allow_unicode=True)


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


#: DOT fill colours by loosening factor (upper edge of each bucket); above the last: the reddest.
DOT_PALETTE = ((1.0, "#d9f0d3"), (1.5, "#fff7bc"), (2.0, "#fee391"), (4.0, "#fdae6b"), (math.inf, "#e6550d"))


def loosening(rec: NodeRecord) -> Optional[float]:
    """How much a node loosens the bound: with an input, the growth of the mean box width (or of
    the radius where there is no box) over its widest input; without one, the guaranteed
    Lipschitz bound of a weight-dependent affine node. None where nothing applies."""
    b = rec.bounds
    if b is not None:
        return b["width_growth"] if b["width_growth"] is not None else b["radius_growth"]
    if rec.lipschitz is not None:
        return rec.lipschitz["upper"]
    return None


def _dot_color(factor) -> str:
    if factor is None:
        return "#ffffff"
    for edge, color in DOT_PALETTE:
        if factor <= edge:
            return color
    return DOT_PALETTE[-1][1]


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_label(parts: list) -> str:
    """A multi-line DOT label: each part escaped, joined with DOT's centred line break."""
    return '"' + "\\n".join(_dot_str(p)[1:-1] for p in parts) + '"'


def check_render_path(path, fmt: Optional[str] = None) -> str:
    """The image format for ``path`` (png, svg, pdf); raises before any work is done if it is not
    supported or graphviz's ``dot`` is not installed."""
    fmt = (fmt or Path(path).suffix.lstrip(".") or "png").lower()
    if fmt not in RENDER_FORMATS:
        raise ConfigError(f"cannot render DOT to {fmt!r}; choose one of {', '.join(RENDER_FORMATS)}")
    if shutil.which("dot") is None:
        raise MissingToolError("rendering needs graphviz's `dot` program, which is not installed (apt-get install "
                               "graphviz, brew install graphviz or conda install graphviz); --format dot prints the "
                               "DOT text instead")
    return fmt


def render_dot(report_or_text, path=None, fmt: Optional[str] = None):
    """Graphviz: ``render_dot(report)`` returns DOT text; ``render_dot(text_or_report, "g.png")``
    writes an image with graphviz's ``dot`` (format from ``fmt`` or the suffix: png, svg, pdf) and
    returns the path. Raises :class:`~bcpc.errors.MissingToolError` when ``dot`` is not installed."""
    text = report_or_text if isinstance(report_or_text, str) else _dot_text(report_or_text)
    if path is None:
        return text
    path = Path(path)
    fmt = check_render_path(path, fmt)
    exe = shutil.which("dot")
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=text, text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"dot failed ({done.returncode}): {done.stderr.strip()}")
    return path


def _dot_text(report: Report) -> str:
    r = report
    title = f"{r.model}: norm {r.norm}, method {r.method}"
    if r.run:
        title += f", eps {_g(r.run['eps'])}, {r.run['n_inputs']} input(s)"
        if r.output and r.output["tau_lipschitz"] is not None:
            title += f", tau {_g(r.output['tau_mean'])} vs Lipschitz {_g(r.output['tau_lipschitz'])}"
    colour_by = "box width growth over the input" if r.run else "guaranteed Lipschitz bound"
    lines = ["digraph bcpc {",
             f"  graph [rankdir=TB, labelloc=t, fontname=Helvetica, fontsize=12, "
             f"label={_dot_str(title + ' (colour: ' + colour_by + ')')}];",
             "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
             "  edge [color=\"#555555\"];"]
    for n in r.nodes:
        label = [n.name, _short_op(n.op) + (f" [{n.rule}]" if n.rule and n.rule != n.op.rsplit('.', 1)[-1] else ""),
                 _shape_text(n.shape)]
        if n.lipschitz:
            label.append(f"lip est {_g(n.lipschitz['estimate'])} / upper {_g(n.lipschitz['upper'])}")
        if n.bounds:
            b = n.bounds
            label.append(f"radius {_g(b['radius'])}, width {_g(b['width_mean'])}")
            if b["ibp_width_mean"] is not None:
                label.append(f"ibp width {_g(b['ibp_width_mean'])} = {_g(b['ibp_ratio'])}x")
            if b["width_growth"] is not None:
                label.append(f"growth x{_g(b['width_growth'], 3)}")
        factor = loosening(n)
        lines.append(f"  {_dot_str(n.name)} [label={_dot_label(label)}, fillcolor={_dot_str(_dot_color(factor))}, "
                     f"tooltip={_dot_str(n.source)}];")
    for a, b in r.edges:
        lines.append(f"  {_dot_str(a)} -> {_dot_str(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_networkx(report: Report):
    import networkx as nx

    data = report.as_dict()
    nodes, edges = data.pop("nodes"), data.pop("edges")
    g = nx.DiGraph(**data)
    for rec in nodes:
        name = rec.pop("name")
        g.add_node(name, **rec)
    g.add_edges_from(tuple(e) for e in edges)
    return g


def render(report: Report, format: str = "table", cert=None):
    """Render a :class:`Report` in one of :data:`FORMATS` (``"code"`` needs ``cert``)."""
    if format == "table":
        return render_table(report)
    if format == "yaml":
        return render_yaml(report)
    if format == "json":
        return render_json(report)
    if format == "dot":
        return _dot_text(report)
    if format == "networkx":
        return render_networkx(report)
    if format == "code":
        return cert.code
    raise ConfigError(f"unknown inspect format {format!r}; choose one of {', '.join(FORMATS)}")


def inspect(cert, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None, eps=None,
            format: str = "table", sound: bool = True, progress: bool = False):
    """What the compiler did, per node, and (with an input) where the bound gets loose.

    Args:
        cert: a CertifiedModule from :func:`bcpc.compile`.
        x, y, eps: optional inputs ``(B, *input_shape)``, labels ``(B,)`` (default: the
            predictions) and one l_p radius; with them every node also gets its bound sizes and the
            output its certified margins and the tightness measure tau.
        format: ``"table"``, ``"yaml"``, ``"json"``, ``"dot"``, ``"code"`` (each a str) or
            ``"networkx"`` (a ``networkx.DiGraph``).
        sound: bounds on the certification path (float64, guaranteed Lipschitz bounds; default)
            or on the training path (model dtype, power-iteration estimates). tau is always sound.
        progress: a progress bar (stderr) while the guaranteed layer norms are computed.

    The Lipschitz estimates are read from the cache without advancing it; a cache never used
    before is warmed up once, as the first training step would.

    Returns:
        the rendering: a ``str`` for every format but ``"networkx"`` (a ``networkx.DiGraph``).

    Raises:
        ConfigError: an unknown ``format``.
        InvalidInputError: ``y`` or ``eps`` without ``x``; ``x`` of the wrong shape or dtype.
        InvalidEpsilonError: ``x`` without ``eps``, or an invalid ``eps``.
        InputDomainError, ModelModeError, GraphMismatchError: as ``cert.certify``.

    Example::

        cert = bcpc.compile(model, "l2", input_shape=(1, 28, 28), input_domain=(0.0, 1.0))
        print(bcpc.inspect(cert))                        # per node: op, rule, shape, Lipschitz
        print(bcpc.inspect(cert, x, y, eps=1.58))        # + bound sizes, certified margins, tau
        data = bcpc.inspect(cert, x, y, eps=1.58, format="yaml")
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown inspect format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "code":
        return cert.code
    return render(build_report(cert, x, y, eps, sound, progress=progress), format, cert)


def summary(report: Report) -> tuple:
    """``(results, details)`` of a :class:`Report` for the common report of ``bcpc inspect``
    (:mod:`bcpc.report`): counts, the largest Lipschitz gap, with inputs the certified share, the
    mean smallest margin and tau; ``details`` holds the full records (``report.as_dict()``)."""
    from bcpc.report import num, pct

    gaps = [n.lipschitz["gap"] for n in report.nodes if n.lipschitz and math.isfinite(n.lipschitz["gap"])]
    results = {"nodes": len(report.nodes), "weight_layers": sum(1 for n in report.nodes if n.lipschitz),
               "lipschitz_gap_max_pct": round(100 * max(gaps), 3) if gaps else None}
    o = report.output
    if o:
        inputs = o["inputs"]
        if all(i["certified"] is not None for i in inputs):
            certified = sum(bool(i["certified"]) for i in inputs)
            results.update(certified=certified, verified_pct=pct(certified, len(inputs)))
        margins = [i["margin_min"] for i in inputs if i["margin_min"] is not None]
        if margins:
            results["margin_min_mean"] = num(sum(margins) / len(margins))
        if o["tau_mean"] is not None:
            lip = o["tau_lipschitz"]
            results.update(tau_n=len(inputs), tau_bcp=num(o["tau_mean"]), tau_lipschitz=num(lip) if lip else None,
                           tighter_than_lipschitz_pct=round(100 * o["tighter_than_lipschitz"], 2) if lip else None)
    return results, report.as_dict()


# --- command-line helpers (``bcpc inspect``) -----------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_shape(text: str) -> tuple:
    """``"1,28,28"`` -> ``(1, 28, 28)``: the per-sample input shape (no batch dimension)."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise InvalidInputError(f"--input-shape {text!r} is not a shape: give positive sizes per sample without the "
                                "batch dimension, e.g. 1,28,28")
    return shape


def parse_domain(text: str):
    """``"0,1"`` -> ``(0.0, 1.0)``; ``"none"`` -> ``(None, None)``; either end may be ``none``."""
    if text.strip().lower() in ("none", ""):
        return (None, None)
    parts = [p.strip().lower() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (None if p in ("none", "") else float(p) for p in parts)
    except ValueError:
        raise InvalidInputError(f"--input-domain {text!r} is not LOW,HIGH (e.g. 0,1, or none)") from None
    return lo, hi


def load_factory(spec: str, seed: int = 0):
    """Import ``MODULE:FACTORY``, call it with no arguments (after ``torch.manual_seed(seed)``),
    and return the nn.Module it builds. Raises :class:`~bcpc.errors.ModelSpecError`."""
    import importlib
    import os
    import sys

    from torch import nn

    from bcpc.errors import ModelSpecError

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(f"model {spec!r} is not of the form MODULE:FACTORY (e.g. bcpc.models:conv_4c3f)")
    if os.getcwd() not in sys.path:  # like `python -m`: models in the current folder are importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ModelSpecError(f"cannot import {module_name!r} (from {spec!r}): {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(k for k, v in vars(module).items()
                            if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module_name)
            hint = f"; callables there: {', '.join(public[:12])}" if public else ""
            raise ModelSpecError(f"module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{spec!r} is a {type(obj).__name__}, not a function or class that builds a model")
    torch.manual_seed(seed)
    try:
        model = obj()
    except Exception as exc:
        raise ModelSpecError(f"calling {spec}() failed: {type(exc).__name__}: {_first_line(exc)}; the factory must "
                             "build the model with no arguments") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model, path) -> tuple:
    """Load a bcpc training checkpoint (``model_state``) or a plain state_dict into ``model``.

    Returns ``(config dict or None, lip_state or None)``. Raises
    :class:`~bcpc.errors.CheckpointError` for a missing, corrupted or mismatching file."""
    from bcpc import checkpoint
    from bcpc.errors import CheckpointError

    ckpt = checkpoint.load(path)
    if "model_state" in ckpt:
        state, cfg, lip = ckpt["model_state"], ckpt.get("config"), ckpt.get("lip_state")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, cfg, lip = ckpt, None, None
    else:
        raise CheckpointError(f"{path} is neither a bcpc training checkpoint (with 'model_state') nor a state_dict "
                              f"(top-level keys: {', '.join(sorted(map(str, ckpt))[:6]) or 'none'})")
    checkpoint.load_model_state(model, state, str(path))
    return cfg, lip


#: square image sides tried for a convolutional model whose input shape is not given (MNIST,
#: CIFAR, Tiny ImageNet, ImageNet): the first one the model runs on is taken
COMMON_SIDES = (28, 32, 64, 224)


def shape_text(shape) -> str:
    return ",".join(map(str, shape))


def _first_weight_layer(model):
    """``(name, module)`` of the first Linear or Conv layer in registration order, or ``(None, None)``."""
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            return name, m
    return None, None


def _fails(model, shape: tuple):
    """None where ``model`` runs on a batch of two zero inputs of ``shape``, else the exception."""
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else None
    try:
        with torch.no_grad():
            model(torch.zeros((2,) + tuple(shape), dtype=dtype, device=device))
    except Exception as exc:  # any error of the user's forward means "not this shape"
        return exc
    return None


def guess_input_shape(model) -> Optional[tuple]:
    """A per-sample input shape ``model`` runs on, read off its first layer: a Linear layer's
    ``in_features`` (also as a square 1- or 3-channel image of that size), or a convolution's
    input channels at the first side of :data:`COMMON_SIDES` that works. None if nothing fits."""
    from torch import nn

    _, layer = _first_weight_layer(model)
    if layer is None:
        return None
    if isinstance(layer, nn.Linear):
        f = layer.in_features
        candidates = [(f,)] + [(c, s, s) for c in (1, 3) for s in [math.isqrt(f // c)] if c * s * s == f]
    else:
        dims = layer.weight.dim() - 2
        candidates = [(layer.in_channels,) + (s,) * dims for s in COMMON_SIDES]
    return next((c for c in candidates if _fails(model, c) is None), None)


def _first_layer_note(model, shape: tuple) -> str:
    from torch import nn

    name, layer = _first_weight_layer(model)
    if isinstance(layer, nn.modules.conv._ConvNd) and shape[0] != layer.in_channels:
        return (f"; its first layer {name!r} ({type(layer).__name__}) takes {layer.in_channels} channel"
                f"{'s' if layer.in_channels != 1 else ''}, not {shape[0]}")
    if isinstance(layer, nn.Linear) and math.prod(shape) != layer.in_features and len(shape) == 1:
        return f"; its first layer {name!r} (Linear) takes {layer.in_features} features, not {shape[0]}"
    return ""


def check_input_shape(model, shape: tuple, spec: str = "the model", given: Optional[str] = None) -> None:
    """Run ``model`` once on zeros of ``shape`` so a wrong shape fails here, in one line that
    says which shape the model takes (:func:`guess_input_shape`) instead of torch's message.
    ``given`` names where the shape came from (default: ``--input-shape S``)."""
    exc = _fails(model, shape)
    if exc is None:
        return
    given = given or f"--input-shape {shape_text(shape)}"
    expected = guess_input_shape(model)
    if expected is not None:
        raise InvalidInputError(f"{given} does not fit {spec}: it expects {shape_text(expected)} per sample, got "
                                f"{shape_text(shape)}{_first_layer_note(model, shape)}")
    raise InvalidInputError(f"{given} does not fit {spec}, which fails on it ({type(exc).__name__}: "
                            f"{_first_line(exc)}); give the per-sample shape the model takes, without the batch "
                            "dimension")


def compile_checked(model, norm, shape: tuple, domain, lip_state=None, checkpoint=None, debug: bool = False):
    """``bcpc.compile`` for the command line: errors stay one line (fx and ShapeProp messages span
    many; ``debug`` keeps the original), and a checkpoint's Lipschitz cache is loaded."""
    from bcpc.api import compile as compile_model
    from bcpc.errors import BcpcError, CheckpointError

    try:
        cert = compile_model(model, norm, input_shape=shape, input_domain=domain)
    except BcpcError as exc:
        if debug:
            raise
        raise type(exc)(_first_line(exc)) from None
    if lip_state:
        try:
            cert.propagation.lip.load_state_dict(lip_state)
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-1].strip()
            raise CheckpointError(f"checkpoint {checkpoint}: its Lipschitz cache does not match the compiled model "
                                  f"(trained with another input shape?): {last}") from None
    return cert


def example_batch(shape: tuple, n: int, domain, seed: int = 0, data: str = "random", data_root="data",
                  split: str = "test"):
    """``(x, y)``: the first ``n`` MNIST images and labels of ``split`` (``data="mnist"``), or ``n``
    seeded uniform random inputs in ``domain`` (standard normal where it is unbounded) and
    ``y=None`` (the predictions serve as labels)."""
    if n < 1:
        raise InvalidInputError(f"--n must be at least 1, got {n}")
    if data == "mnist":
        from bcpc import data as datasets

        if tuple(shape) != (1, 28, 28):
            raise InvalidInputError(f"MNIST images have shape 1,28,28; the model takes {','.join(map(str, shape))}")
        x, y = datasets.mnist(data_root, split)
        return x[:n], y[:n]
    gen = torch.Generator().manual_seed(seed)
    lo, hi = domain
    if lo is not None and hi is not None:
        return lo + (hi - lo) * torch.rand((n,) + tuple(shape), generator=gen), None
    x = torch.randn((n,) + tuple(shape), generator=gen)
    if lo is not None:
        x = lo + x.abs()
    elif hi is not None:
        x = hi - x.abs()
    return x, None

"""The ``bcpc`` command line: train, evaluate, certify, audit, inspect, demo.

Errors caused by the user (a missing file, a bad config, a checkpoint that does not match) print
one line ``bcpc: error: ...`` and exit with status 2; ``--debug`` shows the traceback. A mistyped
option or command gets argparse's usage line and a "did you mean".

``evaluate``, ``certify``, ``audit`` and ``inspect`` describe their run in one report layout
(:mod:`bcpc.report`, docs/cli.md): stdout shows it as an aligned summary (``--json``: the JSON),
``--out FILE`` writes the JSON. Progress bars go to stderr (``--no-progress`` turns them off).
The model is a bcpc training checkpoint (``--checkpoint``) or the user's own
(``--model MODULE:FACTORY --weights state_dict.pt``); the data a built-in set or the user's own
(``--data FILE.npz`` or an image folder).
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = """examples:
  bcpc train --config configs/mnist_4c3f.yaml            # certified training (paper Algorithm 1)
  bcpc train --config configs/mnist_4c3f.yaml --resume   # continue a run from its last checkpoint
  bcpc evaluate --checkpoint models/mnist_4c3f.pt --eps 1.58   # clean / PGD / verified accuracy
  bcpc certify --checkpoint models/mnist_4c3f.pt --eps 1.58 --n 100
  bcpc audit --checkpoint models/mnist_4c3f.pt --eps 1.58 --n 500   # attack every certified input
  bcpc certify --model mypkg.nets:make --weights net.pt --data test.npz --eps 0.5   # your own model and data
  bcpc evaluate --plot-compare a.json b.json --out compare.png   # overlay the curves of two runs
  bcpc demo                                              # a few minutes: train a small model, certify it
  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28                 # per node: op, rule, shape, Lipschitz
  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28 --eps 1.58 --format yaml   # + bounds, margins, tau
"""

_T0 = time.perf_counter()  # set again by main(): the start of a command, for the set-up time


# --- argparse: defaults in the help, suggestions for typos ---------------------------------

class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; ``(default: X)`` after every option with a value default (flags
    are off by default; options without one say in their help what happens without them)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default:" in text or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "invalid choice" errors suggest the closest choice."""

    def error(self, message):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)), n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


def _unknown_arguments(parser: argparse.ArgumentParser, extra: list):
    """Exit like argparse does for unrecognized arguments, with "did you mean" for options."""
    options = [s for a in parser._actions for s in a.option_strings if a.help is not argparse.SUPPRESS]
    parts = []
    for arg in extra:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1, cutoff=0.6)
            parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    if not parts:
        parts = extra
    parser.error(f"unrecognized argument{'s' if len(parts) > 1 else ''}: {' '.join(parts)}")


# --- train ---------------------------------------------------------------------------------

def _parse_set(items):
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"bcpc: error: --set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_train(args) -> int:
    import json

    from bcpc import config
    from bcpc.train import fit

    cfg = config.load(args.config)
    if args.set:
        cfg = config.from_dict({**cfg.to_dict(), **_parse_set(args.set)}, args.config)
    res = fit(cfg, resume=args.resume, progress=not args.no_progress, max_steps=args.max_steps,
              log=lambda msg: print(msg, file=sys.stderr, flush=True))  # stdout: the JSON summary only
    if res.interrupted:
        return 130
    print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, "best": res.best,
                      "seconds": round(res.seconds, 1)}, indent=2))
    return 0


# --- model and data for evaluate / certify / audit -----------------------------------------

@dataclass
class Setup:
    """What evaluate / certify / audit run on, and the report sections describing it."""

    cert: object
    x: object
    y: object
    eps: float
    model: dict
    data: dict
    cfg: object = None  # the run's TrainConfig, for a bcpc checkpoint
    setup_s: float = 0.0


def _shape(shape) -> str:
    return ",".join(map(str, shape))


def _model_section(meta: dict, cert) -> dict:
    meta = dict(meta)
    meta.update(parameters=sum(p.numel() for p in cert.model.parameters()), input_shape=list(cert.input_shape),
                num_classes=cert.num_classes)
    return meta


def _load_model(args):
    """``(model, cert or None, run config or None, config dict or None, lip_state, meta)`` from
    ``--checkpoint`` or ``--model [--weights]``."""
    from bcpc import checkpoint, data
    from bcpc.errors import ConfigError
    from bcpc.inspect import load_factory, load_weights

    if args.checkpoint and args.model:
        raise ConfigError("give either --checkpoint (a bcpc training checkpoint) or --model MODULE:FACTORY "
                          "(with --weights), not both")
    if args.weights and not args.model:
        raise ConfigError(f"--weights {args.weights} needs the model it belongs to: --model pkg.module:factory "
                          "(a function or class that builds it with no arguments)")
    if args.checkpoint:
        from bcpc.train import load_trained

        path = Path(args.checkpoint)
        checkpoint.load_bcpc(path)  # a clear message for a folder, a state_dict, another kind of file
        model, cert, cfg, _ = load_trained(path)
        meta = {"name": cfg.model, "checkpoint": str(path), "sha256": data.file_sha256(path)}
        return model, cert, cfg, cfg.to_dict(), None, meta
    if not args.model:
        raise ConfigError("which model? Give --checkpoint FILE (a bcpc training checkpoint, e.g. "
                          "models/mnist_small_demo.pt) or --model pkg.module:factory --weights state_dict.pt")
    model = load_factory(args.model, seed=args.seed)
    meta = {"name": type(model).__name__, "factory": args.model}
    cfg_dict = lip = None
    if args.weights:
        cfg_dict, lip = load_weights(model, args.weights)
        meta.update(weights=str(args.weights), sha256=data.file_sha256(args.weights))
        if cfg_dict and cfg_dict.get("model"):
            meta["name"] = cfg_dict["model"]
    else:
        meta["seed"] = args.seed
    model.eval()
    return model, None, None, cfg_dict, lip, meta


def _threat_defaults(args, cfg_dict) -> tuple:
    from bcpc.inspect import parse_domain

    cfg_dict = cfg_dict or {}
    norm = args.norm or cfg_dict.get("norm") or "l2"
    if args.input_domain is not None:
        domain = parse_domain(args.input_domain)
    elif "input_domain" in cfg_dict:
        domain = tuple(cfg_dict["input_domain"]) if cfg_dict["input_domain"] else (None, None)
    else:
        domain = (0.0, 1.0)
    return norm, domain


def _check_domain(x, domain, source: str, explicit: bool) -> None:
    from bcpc.errors import InputDomainError

    lo, hi = domain
    below = lo is not None and bool((x < lo).any())
    above = hi is not None and bool((x > hi).any())
    if below or above:
        whose = "--input-domain" if explicit else "the input domain"
        raise InputDomainError(
            f"the inputs of {source} lie in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside {whose} "
            f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]; pass --input-domain LOW,HIGH "
            "(or none) matching how the data was preprocessed")


def _setup(args, progress: bool) -> Setup:
    """Load the model and the data, compile, and do the one-off guaranteed layer norms."""
    import torch

    from bcpc import data
    from bcpc.api import parse_norm
    from bcpc.errors import ConfigError, InvalidEpsilonError, InvalidInputError
    from bcpc.inspect import check_input_shape, compile_checked

    if args.threads:
        torch.set_num_threads(args.threads)
    model, cert, cfg, cfg_dict, lip, meta = _load_model(args)
    spec = args.data or (cfg_dict or {}).get("dataset")
    if spec is None:
        raise ConfigError(f"--model {args.model} needs data: --data FILE.npz (arrays x, y), an image folder (one "
                          "subfolder per class), or mnist / cifar10")
    root = args.data_root or (cfg_dict or {}).get("data_root") or "data"
    if args.n is not None and args.n < 1:
        raise InvalidInputError(f"--n must be at least 1, got {args.n}")
    x, y, dmeta = data.resolve(spec, root, args.split, n=args.n, progress=progress)
    dmeta["n"] = int(x.shape[0])
    source = dmeta.get("path", spec) if dmeta["source"] in ("npz", "image-folder") else f"{spec} ({args.split})"
    norm, domain = _threat_defaults(args, cfg_dict)
    if cert is None:  # the user's model: compile it for the data's shape
        shape = tuple(x.shape[1:])
        check_input_shape(model, shape, args.model, given=f"the inputs of {source} (shape {_shape(shape)})")
        _check_domain(x, domain, source, args.input_domain is not None)
        cert = compile_checked(model, norm, shape, domain, lip, args.weights, debug=args.debug)
    else:
        if tuple(x.shape[1:]) != cert.input_shape:
            raise InvalidInputError(f"the inputs of {source} have shape {_shape(x.shape[1:])}; the checkpoint's "
                                    f"model {cfg.model} takes {_shape(cert.input_shape)}")
        _check_domain(x, domain, source, args.input_domain is not None)
        if parse_norm(norm) != cert.norm or tuple(domain) != tuple(cert.input_domain):
            cert = compile_checked(model, norm, cert.input_shape, domain, debug=args.debug)
    if args.eps is not None:
        eps = args.eps
    elif cfg is not None:
        eps = cfg.target_eps_eval
    elif cfg_dict and cfg_dict.get("eps") is not None:
        eps = cfg_dict.get("eps_eval") or cfg_dict["eps"]
    else:
        raise InvalidEpsilonError("--eps is required with --model: a state_dict does not record the radius to "
                                  "certify (e.g. --eps 0.5 for an l2 ball of radius 0.5)")
    cert._check_eps(eps, 1)
    cert.model_rounding = bool(getattr(args, "model_rounding", False))
    cert.prepare(progress=progress)
    cert.certify(x[:1], y[:1], eps)  # the first call's one-off work (kernel compilation, the guard) is set-up too
    return Setup(cert=cert, x=x, y=y, eps=float(eps), model=_model_section(meta, cert), data=dmeta, cfg=cfg,
                 setup_s=time.perf_counter() - _T0)


def _threat(cert, eps) -> dict:
    from bcpc import report

    return {"norm": report.norm_name(cert.norm), "eps": None if eps is None else float(eps),
            "input_domain": report.domain(*cert.input_domain), "model_rounding": bool(cert.model_rounding)}


def _runtime(cert, setup_s: float, run_s: float, n: int, processes: int = 1) -> dict:
    import torch

    from bcpc import report

    param = next(cert.model.parameters(), None)
    device = str(param.device) if param is not None else "cpu"
    return report.runtime(setup_s, run_s, n, device, torch.get_num_threads(), processes)


def _emit(args, rep: dict, plots: bool = False) -> None:
    """The report: JSON to ``--out``, and the summary (or with ``--json`` the JSON) on stdout."""
    from bcpc import report

    if args.out:
        if plots:
            from bcpc.evaluate import plot_paths, write_plots

            path, prefix = plot_paths(args.out)
            written = [report.write(rep, path)] + write_plots(rep, prefix)
        else:
            written = [report.write(rep, args.out)]
        for p in written:
            print(f"wrote {p}", file=sys.stderr)
    print(report.to_json(rep) if args.json else report.render_text(rep), end="", flush=True)


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _radii(text: str) -> list:
    """``--eps-curve 0.5,1,1.58`` -> [0.5, 1.0, 1.58]."""
    try:
        radii = [float(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of radii, e.g. 0.5,1,1.58") from None
    if any(not math.isfinite(e) or e < 0 for e in radii):
        raise argparse.ArgumentTypeError(f"{text!r}: every radius must be a number >= 0")
    return radii


def _attack(steps: int, step_size: float, restarts: int, **extra) -> dict:
    return {"pgd_steps": steps, "pgd_step_size": step_size, "pgd_restarts": restarts, "pgd_loss": "margin",
            "pgd_keeps": "worst point seen", **extra}


# --- evaluate / certify / audit ------------------------------------------------------------

def cmd_evaluate(args) -> int:
    from bcpc import report
    from bcpc.evaluate import evaluate
    from bcpc.train import init_distributed

    if args.plot_compare:
        return _plot_compare(args)
    ctx = init_distributed()  # under torchrun: shard the batches, sum the counts
    progress = not args.no_progress and ctx.main
    s = _setup(args, progress)
    curve = args.eps_curve
    t0 = time.perf_counter()
    raw = evaluate(s.cert, s.x, s.y, s.eps, pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts, eps_curve=curve,
                   batch_size=args.batch_size, tightness_n=args.tightness_n if ctx.main else 0,
                   progress=progress, ctx=ctx, paper_attack=args.paper_attack, apgd_steps=args.apgd_steps)
    run_s = time.perf_counter() - t0
    ctx.close()
    if not ctx.main:
        return 0
    n, percent = raw["n"], report.percent
    results = {"clean_pct": percent(raw["clean_acc"]),
               "pgd_pct": percent(raw["pgd_acc"]) if raw["pgd_acc"] is not None else None,
               "pgd_paper_attack_pct": percent(raw["pgd_acc_paper_attack"]) if "pgd_acc_paper_attack" in raw else None,
               "apgd_pct": percent(raw["apgd_acc"]) if "apgd_acc" in raw else None,
               "robust_all_attacks_pct": (percent(raw["robust_acc_all_attacks"]) if "robust_acc_all_attacks" in raw
                                          else None),
               "certified_broken_by_apgd": raw.get("certified_broken_by_apgd"),
               "certified": round(raw["verified_acc"] * n), "verified_pct": percent(raw["verified_acc"]),
               "verified_pct_vs_eps": {e: percent(v) for e, v in raw["verified_acc_vs_eps"].items()}}
    details = None
    tight = raw.get("tightness")
    if tight:
        tau = sum(tight["tau_bcp"]) / len(tight["tau_bcp"])
        lip = tight["tau_lipschitz"]
        results.update(tau_n=len(tight["tau_bcp"]), tau_bcp=report.num(tau),
                       tau_lipschitz=report.num(lip) if lip else None,
                       tighter_than_lipschitz_pct=round(100 * (1 - tau / lip), 2) if lip else None)
        details = {"tau_bcp_per_input": [report.num(t) for t in tight["tau_bcp"]]}
    step = raw["pgd"]["step_size"]
    attack = _attack(args.pgd_steps, step, args.pgd_restarts, paper_attack=True if args.paper_attack else None,
                     apgd_steps=args.apgd_steps or None)
    rep = report.build("evaluate", model=s.model, data=s.data, threat=_threat(s.cert, s.eps), method=s.cert.method,
                       attack=attack if args.pgd_steps > 0 or args.apgd_steps > 0 else None,
                       runtime=_runtime(s.cert, s.setup_s, run_s, n, ctx.world), results=results, details=details)
    _emit(args, rep, plots=True)
    return 0


def _plot_compare(args) -> int:
    from bcpc import report
    from bcpc.errors import ConfigError
    from bcpc.evaluate import plot_compare

    reports = [report.read(p) for p in args.plot_compare]
    for path, rep in zip(args.plot_compare, reports):
        if rep["command"] != "evaluate":
            raise ConfigError(f"{path} is a {rep['command']} report; --plot-compare overlays evaluate reports")
    names = [Path(p).parent.name if Path(p).name == "report.json" else Path(p).stem for p in args.plot_compare]
    labels = [f"{name}{'' if name == r['model']['name'] else ' (' + r['model']['name'] + ')'}, "
              f"{r['data'].get('split', r['data']['source'])}, n={r['data']['n']:,}" for name, r in zip(names, reports)]
    out = Path(args.out or "compare.png")
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--out {out}: --plot-compare draws an image; give a .png, .svg or .pdf path")
    print(f"wrote {plot_compare(reports, labels, out)}", file=sys.stderr)
    return 0


def cmd_certify(args) -> int:
    from bcpc import report
    from bcpc.evaluate import certified_count
    from bcpc.train import init_distributed

    ctx = init_distributed()  # under torchrun: each rank certifies every world-th chunk
    progress = not args.no_progress and ctx.main
    s = _setup(args, progress)
    t0 = time.perf_counter()
    certified = certified_count(s.cert, s.x, s.y, s.eps, batch_size=args.batch_size, progress=progress, ctx=ctx)
    run_s = time.perf_counter() - t0
    ctx.close()
    if not ctx.main:
        return 0
    n = int(s.x.shape[0])
    rep = report.build("certify", model=s.model, data=s.data, threat=_threat(s.cert, s.eps), method=s.cert.method,
                       runtime=_runtime(s.cert, s.setup_s, run_s, n, ctx.world),
                       results={"certified": certified, "verified_pct": report.pct(certified, n)})
    _emit(args, rep)
    return 0


def cmd_audit(args) -> int:
    from bcpc import report
    from bcpc.evaluate import audit_all

    progress = not args.no_progress
    s = _setup(args, progress)
    t0 = time.perf_counter()
    rep = audit_all(s.cert, s.x, s.y, s.eps, pgd_steps=args.pgd_steps, restarts=args.pgd_restarts,
                    sphere_samples=args.samples, batch_size=args.batch_size, seed=args.seed, progress=progress)
    run_s = time.perf_counter() - t0
    n = int(s.x.shape[0])
    finite = (lambda v: None if math.isinf(v) else report.num(v))  # inf: nothing was attacked
    results = {"certified": rep.certified, "verified_pct": report.pct(rep.certified, n), "attacked": rep.attacked,
               "violations": rep.violations, "min_gap": finite(rep.min_gap),
               "min_attacked_margin": finite(rep.min_attacked_margin)}
    step = 2.5 * s.eps / args.pgd_steps if args.pgd_steps else 0.0  # bcpc.testing.pgd_margin's default
    out = report.build("audit", model=s.model, data=s.data, threat=_threat(s.cert, s.eps), method=s.cert.method,
                       attack=_attack(args.pgd_steps, report.num(step), args.pgd_restarts, samples=args.samples),
                       runtime=_runtime(s.cert, s.setup_s, run_s, n), results=results)
    _emit(args, out)
    return 1 if rep.violations else 0


# --- demo ----------------------------------------------------------------------------------

def demo_config(out_dir: str = "runs", quick: bool = False, epochs: int | None = None):
    """The demo run: a small MaxMin conv net on 20,000 MNIST images, certified at l2 eps 1.58, about a
    minute on 2 cores. The recipe of configs/mnist_4c3f_minmax_600.yaml cut down (GloRo's TRADES
    loss and eps ramp, the global bound in the loss, train eps 1.1x, exponential lr decay, batch
    128), 24 epochs: on the validation split it certified 46.2% (92.3% clean) against 43.8%
    (90.3%) for the 12 epochs of sessions 9-14, 40.2% (88.8%) with the
    TRADES-style loss and geometric ramp of session 7 and 29.0% for the ReLU/eq.-13 recipe of
    sessions 1-6 (docs/results.md). Typed as a loaded config file is, so its ``config.json`` resumes it
    (``bcpc train --resume``)."""
    from bcpc.config import TrainConfig, from_dict

    cfg = TrainConfig(name="demo", model="mnist_small_minmax", out_dir=out_dir, method="lipschitz", loss="gloro",
                      lam=1.5, lam_schedule="constant", eps=1.738, eps_eval=1.58, eps_schedule="gloro", epochs=24,
                      warmup_epochs=0, ramp_epochs=12, batch_size=128, lr=3e-3, lr_schedule="exp", lr_final=1e-5,
                      lipschitz_iters=5, train_subset=20000, val_subset=500, val_every=6, checkpoint_every=500)
    if quick:  # CI: the same pipeline, minutes -> seconds
        cfg.epochs, cfg.ramp_epochs, cfg.val_every = 2, 1, 1
        cfg.train_subset, cfg.val_subset = 2000, 200
    if epochs is not None:  # the lr decay and the eps ramp follow the length; the ramp at most half of it
        cfg.epochs, cfg.ramp_epochs = epochs, min(cfg.ramp_epochs, max(1, epochs // 2))
    return from_dict(cfg.to_dict(), "the demo's config")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_demo(args) -> int:
    """Train, then evaluate. Interrupted (Ctrl-C, SIGTERM) it says what was written and how to go
    on, and prints no result: an unfinished run has none."""
    from bcpc import data
    from bcpc.evaluate import evaluate
    from bcpc.train import fit, load_trained

    cfg = demo_config(args.out_dir, args.quick, args.epochs)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # SIGTERM as Ctrl-C, from here on
    config_path = cfg.run_dir / "config.json"
    resume = (f"`bcpc demo` starts again from scratch (it deletes {cfg.run_dir}); to continue this run instead: "
              f"bcpc train --config {config_path} --resume")
    stage = "setting up"
    try:
        if cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)
        print(f"bcpc demo: certified training of {cfg.model} on {cfg.train_subset} MNIST images, l2 eps={cfg.target_eps_eval}, "
              f"{cfg.epochs} epochs", flush=True)
        res = fit(cfg, progress=not args.no_progress, resume_hint=resume)
        if res.interrupted:  # fit wrote last.pt and said so
            print(f"bcpc demo: stopped after {res.step} training steps ({res.epochs_done} of {cfg.epochs} epochs); "
                  "no result, the run is unfinished", file=sys.stderr, flush=True)
            return 130
        stage = "evaluating"
        best = res.run_dir / "best.pt"
        _, cert, _, _ = load_trained(best)
        n = 200 if args.quick else 1000
        x, y = data.mnist(cfg.data_root, "test")
        rep = evaluate(cert, x[:n], y[:n], cfg.target_eps_eval, pgd_steps=20 if args.quick else 50,
                       progress=not args.no_progress)
    except KeyboardInterrupt:
        if stage == "setting up":
            print(f"bcpc demo: interrupted before training started; nothing to keep. {resume.split(';')[0]}",
                  file=sys.stderr, flush=True)
        else:
            print(f"bcpc demo: interrupted while evaluating; training finished and the model is in {best}: "
                  f"bcpc evaluate --checkpoint {best} --eps {cfg.target_eps_eval} --n {n}", file=sys.stderr, flush=True)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"\ntrained in {res.seconds:.0f} s; on the first {n} MNIST test images at l2 eps={cfg.target_eps_eval}:")
    print(f"  clean accuracy     {100 * rep['clean_acc']:.1f}%")
    print(f"  PGD accuracy       {100 * rep['pgd_acc']:.1f}%  ({rep['pgd']['steps']} steps)")
    print(f"  certified accuracy {100 * rep['verified_acc']:.1f}%  (sound: guaranteed Lipschitz bounds, float64)")
    print(f"  model: {best} (bcpc evaluate --checkpoint {best} for more)")
    return 0


# --- inspect -------------------------------------------------------------------------------

DATASET_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _inspect_model(args):
    """``(model, spec, config dict or None, lip_state, meta)`` for inspect: MODULE:FACTORY (with
    optional weights from --checkpoint / --weights), or a bcpc checkpoint alone."""
    from bcpc import checkpoint, data
    from bcpc.errors import ConfigError
    from bcpc.inspect import load_factory, load_weights

    spec = args.model or args.model_option
    if args.model and args.model_option and args.model != args.model_option:
        raise ConfigError(f"two models: {args.model} and --model {args.model_option}; give one")
    weights = args.weights or args.checkpoint
    if args.weights and args.checkpoint:
        raise ConfigError("give the weights once: --checkpoint FILE or --weights FILE")
    if spec is None:
        if not args.checkpoint:
            raise ConfigError("which model? Give MODULE:FACTORY (e.g. bcpc.models:conv_4c3f) or --checkpoint FILE "
                              "(a bcpc training checkpoint)")
        from bcpc.models import ARCHITECTURES

        ckpt = checkpoint.load_bcpc(args.checkpoint)
        name = ckpt["config"]["model"]
        if name not in ARCHITECTURES:
            raise ConfigError(f"{args.checkpoint} holds a {name!r} model, which bcpc.models does not know; pass "
                              "its factory: bcpc inspect pkg.module:factory --checkpoint FILE")
        import torch

        spec = f"the checkpoint's {name}"
        torch.manual_seed(args.seed)
        model = ARCHITECTURES[name]()
        meta = {"name": name, "checkpoint": str(args.checkpoint)}
    else:
        model = load_factory(spec, seed=args.seed)
        meta = {"name": type(model).__name__, "factory": spec}
    cfg, lip = load_weights(model, weights) if weights else (None, None)
    if weights:
        meta["sha256"] = data.file_sha256(weights)
        if "factory" in meta:
            meta["weights"] = str(weights)
    else:
        meta["seed"] = args.seed
    return model, spec, cfg, lip, meta


def _inspect_shape(args, model, spec, cfg) -> tuple:
    from bcpc.errors import InvalidInputError
    from bcpc.inspect import guess_input_shape, parse_shape

    if args.input_shape:
        return parse_shape(args.input_shape)
    if cfg and cfg.get("dataset") in DATASET_SHAPES:
        return DATASET_SHAPES[cfg["dataset"]]
    if args.data in DATASET_SHAPES:
        return DATASET_SHAPES[args.data]
    if args.data not in ("auto", "random") and Path(args.data).exists():  # the user's data: its first input
        from bcpc import data

        return tuple(data.resolve(args.data, split=args.split, n=1)[0].shape[1:])
    shape = guess_input_shape(model)
    if shape is None:
        raise InvalidInputError(f"--input-shape is needed: {spec} runs on none of the shapes bcpc tries (its first "
                                "layer's input with sides 28, 32, 64, 224); give the per-sample shape, e.g. 3,32,32")
    print(f"bcpc inspect: no --input-shape given; {spec} runs on {_shape(shape)}, read off its first layer "
          "(pass --input-shape to choose another)", file=sys.stderr)
    return shape


def _inspect_inputs(args, shape, domain, cfg):
    """``(x, y, data section)`` for ``--eps``."""
    from bcpc import data as datasets
    from bcpc.errors import InvalidInputError
    from bcpc.inspect import example_batch

    source = args.data if args.data != "auto" else ("mnist" if (cfg or {}).get("dataset") == "mnist" else "random")
    root = args.data_root or (cfg or {}).get("data_root") or "data"
    if source in ("random", "mnist"):
        x, y = example_batch(shape, args.n, domain, seed=args.seed, data=source, data_root=root, split=args.split)
        meta = {"source": source, "path": str(root) if source == "mnist" else None,
                "split": args.split if source == "mnist" else None}
    else:
        if args.n < 1:
            raise InvalidInputError(f"--n must be at least 1, got {args.n}")
        x, y, meta = datasets.resolve(source, root, args.split, n=args.n)
        if tuple(x.shape[1:]) != tuple(shape):
            raise InvalidInputError(f"the inputs of {args.data} have shape {_shape(x.shape[1:])}; the model takes "
                                    f"{_shape(shape)}")
        _check_domain(x, domain, args.data, args.input_domain is not None)
    meta["n"] = int(x.shape[0])
    return x, y, meta


def cmd_inspect(args) -> int:
    from bcpc import report
    from bcpc.inspect import (build_report, check_input_shape, check_render_path, compile_checked, parse_domain,
                              render, render_dot, summary)

    if args.render:
        check_render_path(args.render)
    if args.input_shape:  # a malformed shape fails before any import of the model
        from bcpc.inspect import parse_shape
        parse_shape(args.input_shape)
    progress = not args.no_progress
    model, spec, cfg, lip_state, meta = _inspect_model(args)
    cfg = cfg or {}
    model.eval()
    shape = _inspect_shape(args, model, spec, cfg)
    check_input_shape(model, shape, spec)
    norm = args.norm or cfg.get("norm") or "l2"
    if args.input_domain is not None:
        domain = parse_domain(args.input_domain)
    else:
        domain = tuple(cfg["input_domain"]) if cfg.get("input_domain") else (0.0, 1.0)
    cert = compile_checked(model, norm, shape, domain, lip_state, args.checkpoint or args.weights, debug=args.debug)
    x = y = dmeta = None
    if args.eps is not None:
        x, y, dmeta = _inspect_inputs(args, shape, domain, cfg)
        cert._check_eps(args.eps, x.shape[0])
    if args.format == "code" and not (args.out or args.json or args.render):
        print(cert.code, end="")
        return 0
    cert.prepare(progress=progress)  # the guaranteed layer norms, computed once for the table and the bounds
    setup_s = time.perf_counter() - _T0
    t0 = time.perf_counter()
    rep = build_report(cert, x, y, eps=args.eps, progress=progress)
    run_s = time.perf_counter() - t0
    if args.out or args.json:
        results, details = summary(rep)
        common = report.build("inspect", model=_model_section(meta, cert), data=dmeta, threat=_threat(cert, args.eps),
                              method=cert.method, runtime=_runtime(cert, setup_s, run_s, dmeta["n"] if dmeta else 0),
                              results=results, details=details)
        if args.out:
            print(f"wrote {report.write(common, args.out)}", file=sys.stderr)
    if args.json:
        print(report.to_json(common), end="")
    else:
        print(render(rep, args.format, cert), end="")
    if args.render:
        print(f"wrote {render_dot(rep, args.render)}", file=sys.stderr)
    return 0


# --- the parser ----------------------------------------------------------------------------

def _model_options(p, inspect: bool = False) -> None:
    g = p.add_argument_group("model (a bcpc checkpoint, or your own model and weights)")
    if inspect:
        g.add_argument("--checkpoint", metavar="FILE", help="with MODULE:FACTORY: the weights to load (a bcpc "
                       "training checkpoint, whose norm, input domain and dataset become the defaults, or a plain "
                       "state_dict); alone: a bcpc training checkpoint, its model from bcpc.models")
        g.add_argument("--model", dest="model_option", metavar="MODULE:FACTORY",
                       help="the same as the positional MODULE:FACTORY")
    else:
        g.add_argument("--checkpoint", metavar="FILE", help="a bcpc training checkpoint (best.pt / last.pt of a run): "
                       "model, weights, norm, input domain, eps and dataset")
        g.add_argument("--model", metavar="MODULE:FACTORY", help="your own model instead: a function or class that "
                       "builds it with no arguments (e.g. mypkg.nets:make_net), imported like python -m does")
    g.add_argument("--weights", metavar="FILE", help="the state_dict to load into the --model (torch.save("
                   "model.state_dict(), FILE)); without it, the factory's initialisation")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="torch seed before the factory runs" + (
        " and for the random inputs" if inspect else "; audit: of the random attack points"))


def _data_options(p, inspect: bool = False) -> None:
    g = p.add_argument_group("data")
    if inspect:
        g.add_argument("--data", default="auto", metavar="SOURCE",
                       help="inputs for --eps: random (seeded uniform inputs in the domain, the predictions as "
                            "labels), mnist, cifar10, an .npz file or an image folder; auto: MNIST when the "
                            "checkpoint was trained on it, else random")
        g.add_argument("--n", type=int, default=4, metavar="N", help="how many inputs with --eps")
    else:
        g.add_argument("--data", metavar="SOURCE", help="mnist, cifar10, an .npz file with arrays x (N,C,H,W floats, "
                       "or uint8 scaled to [0,1]) and y (N labels), or an image folder with one subfolder per class "
                       "(default: the checkpoint's dataset)")
        g.add_argument("--n", type=int, default=None, metavar="N", help="the first N inputs only (default: all)")
    g.add_argument("--data-root", metavar="DIR", default=None,
                   help="folder holding mnist / cifar10 (default: the checkpoint's data_root, else data)")
    g.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split of mnist / cifar10, of an .npz with <split>_x / <split>_y, or of a folder with a "
                        "<split> subfolder")


def _threat_options(p, inspect: bool = False) -> None:
    g = p.add_argument_group("threat model")
    if inspect:
        g.add_argument("--eps", type=float, default=None, metavar="E",
                       help="also bound inputs at this radius (per-node sizes, margins, tau); without it, the graph "
                            "and the Lipschitz bounds only")
    else:
        g.add_argument("--eps", type=float, default=None, metavar="E", help="radius of the perturbation ball "
                       "(default: the checkpoint's eps_eval, else its eps; required with --model)")
    g.add_argument("--norm", default=None, metavar="P", help="norm of the ball: l2, linf, l1 or a number p >= 1 "
                   "(default: the checkpoint's, else l2)")
    g.add_argument("--input-domain", default=None, metavar="LOW,HIGH",
                   help="range of valid inputs, or none (default: the checkpoint's, else 0,1)")
    if not inspect:
        g.add_argument("--model-rounding", action="store_true",
                       help="certify the float32 model's own arithmetic too (a worst-case bound on its rounding: "
                            "several points of verified accuracy lower; default: the model's function in float64)")


def _output_options(p, out_help: str = "also write the report as JSON to FILE") -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="FILE", help=out_help)
    g.add_argument("--json", action="store_true", help="print the report as JSON (docs/cli.md) instead of the "
                   "human summary")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")


def _run_options(p) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=_at_least(1), default=100, metavar="N",
                   help="inputs per chunk; the progress bar moves per chunk")
    g.add_argument("--threads", type=_at_least(1), default=None, metavar="N", help="torch CPU threads (default: torch's choice)")


def _attack_options(p, restarts: int) -> None:
    g = p.add_argument_group("attack")
    g.add_argument("--pgd-steps", type=_at_least(0), default=100, metavar="N", help="PGD steps on the margin; 0: no attack")
    g.add_argument("--pgd-restarts", type=_at_least(1), default=restarts, metavar="N",
                   help="PGD runs per input: the first from the input itself, the others from random points")
    g.add_argument("--restarts", dest="pgd_restarts", type=_at_least(1), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling of audit's --pgd-restarts
    return g


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bcpc", description="Certified robustness for PyTorch models (BCP).",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="certified training from a YAML config",
                       epilog="example: bcpc train --config configs/mnist_4c3f.yaml --resume",
                       formatter_class=_Formatter)
    t.add_argument("--config", required=True, metavar="FILE",
                   help="YAML training config (configs/*.yaml; every key in bcpc/config.py)")
    t.add_argument("--resume", action="store_true", help="continue from <out_dir>/<name>/last.pt")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after this global step (checkpointed; resumable; default: train to the end)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    t.set_defaults(func=cmd_train)

    commands = {}
    for name, func, helptext in (("evaluate", cmd_evaluate, "clean / PGD / verified accuracy, verified accuracy vs "
                                  "eps, tightness; plots"),
                                 ("certify", cmd_certify, "sound certification of a data set: verified accuracy"),
                                 ("audit", cmd_audit, "attack every certified input; violations must be 0")):
        example = (f"examples:\n  bcpc {name} --checkpoint models/mnist_small_demo.pt --eps 1.58 --n 500\n"
                   f"  bcpc {name} --model mypkg.nets:make --weights net.pt --data test.npz --eps 0.5\n")
        if name == "evaluate":
            example += "  bcpc evaluate --plot-compare runs/a.json runs/b.json --out compare.png\n"
        e = sub.add_parser(name, help=helptext, description=helptext, epilog=example, formatter_class=_Formatter)
        commands[name] = e
        _model_options(e)
        _data_options(e)
        _threat_options(e)
        if name == "evaluate":
            g = _attack_options(e, restarts=1)
            g.add_argument("--paper-attack", action="store_true",
                           help="also run the BCP paper's own (weaker) PGD: cross-entropy, last iterate")
            g.add_argument("--apgd-steps", type=_at_least(0), default=0, metavar="N",
                           help="also APGD-CE + APGD-T (AutoAttack's gradient attacks, torchattacks) with N steps "
                                "each; 0: not run")
            g = e.add_argument_group("evaluate")
            g.add_argument("--eps-curve", default=[], type=_radii, metavar="E1,E2,...",
                           help="also verified accuracy at these radii (default: none)")
            g.add_argument("--tightness-n", type=_at_least(0), default=0, metavar="N",
                           help="images for the tightness measure tau (paper Fig. 3); 0: none")
            g.add_argument("--plot-compare", nargs="+", metavar="REPORT",
                           help="instead of evaluating: draw the verified-accuracy curves of these evaluate reports "
                                "(JSON of --out) in one plot, written to --out (default: compare.png)")
        if name == "audit":
            g = _attack_options(e, restarts=3)
            g.add_argument("--samples", type=_at_least(0), default=64, metavar="N",
                           help="sphere / box-corner samples per certified input")
        _run_options(e)
        _output_options(e, "also write the report as JSON to FILE.json, with the plots next to it "
                           "(FILE_verified_vs_eps.png, FILE_tightness.png); a folder: report.json and the plots in it"
                        if name == "evaluate" else "also write the report as JSON to FILE")
        e.set_defaults(func=func)

    i = sub.add_parser("inspect", help="per-node view of a compiled model: ops, rules, Lipschitz, bound sizes, tau",
                       epilog="examples:\n"
                              "  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28\n"
                              "  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28 --eps 1.58 --n 4 "
                              "--data mnist\n"
                              "  bcpc inspect mypkg.models:make_4c3f --input-shape 1,28,28 --checkpoint ckpt.pt "
                              "--eps 1.58 --format yaml\n"
                              "  bcpc inspect --checkpoint models/mnist_small_demo.pt --eps 1.58 --json\n"
                              "  bcpc inspect bcpc.models:conv_small --input-shape 1,28,28 --eps 1.58 "
                              "--render net.png\n",
                       formatter_class=_Formatter)
    i.add_argument("model", nargs="?", metavar="MODULE:FACTORY",
                   help="a function or class building the model with no arguments (or --checkpoint alone)")
    i.add_argument("--input-shape", default=None, metavar="C,H,W", help="per-sample input shape, e.g. 1,28,28 "
                   "(default: the checkpoint's dataset, the data's, else read off the model's first layer)")
    _model_options(i, inspect=True)
    _data_options(i, inspect=True)
    _threat_options(i, inspect=True)
    g = i.add_argument_group("output")
    g.add_argument("--format", default="table", choices=("table", "yaml", "json", "dot", "code"),
                   help="what stdout shows: the node table, its records as YAML / JSON, graphviz DOT, or the "
                        "generated code")
    g.add_argument("--render", default=None, metavar="PATH",
                   help="also draw the graph with graphviz (.png/.svg/.pdf)")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="also write the common report (docs/cli.md) as JSON to FILE")
    g.add_argument("--json", action="store_true", help="print the common report as JSON instead of --format")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    i.set_defaults(func=cmd_inspect)
    commands["inspect"] = i

    d = sub.add_parser("demo", help="train a small model on MNIST and certify it (minutes on a CPU)",
                       formatter_class=_Formatter)
    d.add_argument("--quick", action="store_true", help="a reduced run (seconds), as CI runs it")
    d.add_argument("--epochs", type=_at_least(1), default=None, metavar="N",
                   help="train N epochs instead of the recipe's (24; 2 with --quick)")
    d.add_argument("--out-dir", default="runs", metavar="DIR", help="the run goes to OUT_DIR/demo (deleted first)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")
    d.set_defaults(func=cmd_demo)
    commands.update(train=t, demo=d)
    p.commands = commands
    return p


def main(argv=None) -> int:
    global _T0
    _T0 = time.perf_counter()
    from bcpc.errors import BcpcError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown_arguments(parser.commands.get(args.command, parser), extra)
    try:
        code = args.func(args)
    except BcpcError as exc:
        if args.debug:
            raise
        print(f"bcpc: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose work is done and whose process group is destroyed: leave without
        # interpreter finalization, where gloo's worker threads can still abort the process
        # (SIGABRT, "terminate called without an active exception": seen once in 2 ranks here) and
        # turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

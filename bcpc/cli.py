"""The ``bcpc`` command line: train, evaluate, certify, audit, inspect, demo.

Errors caused by the user (a missing file, a bad config, a checkpoint that does not match) print
one line ``bcpc: error: ...`` and exit with status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

EXAMPLES = """examples:
  bcpc train --config configs/mnist_4c3f.yaml            # certified training (paper Algorithm 1)
  bcpc train --config configs/mnist_4c3f.yaml --resume   # continue a run from its last checkpoint
  bcpc evaluate --checkpoint models/mnist_4c3f.pt --eps 1.58   # clean / PGD / verified accuracy
  bcpc certify --checkpoint models/mnist_4c3f.pt --eps 1.58 --n 100
  bcpc audit --checkpoint models/mnist_4c3f.pt --eps 1.58 --n 500   # attack every certified input
  bcpc demo                                              # a few minutes: train a small model, certify it
  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28                 # per node: op, rule, shape, Lipschitz
  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28 --eps 1.58 --format yaml   # + bounds, margins, tau
"""


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


def _load_for_eval(args):
    """``(cert, cfg, x, y, eps)`` for the evaluate / certify / audit commands."""
    from bcpc import data
    from bcpc.train import load_trained

    _, cert, cfg, _ = load_trained(args.checkpoint)
    if args.data_root:
        cfg.data_root = args.data_root
    x, y = data.load(cfg.dataset, cfg.data_root, args.split)
    if args.n:
        x, y = x[:args.n], y[:args.n]
    eps = cfg.target_eps_eval if args.eps is None else args.eps
    return cert, cfg, x, y, eps


def cmd_evaluate(args) -> int:
    from bcpc.evaluate import evaluate, write_report

    from bcpc.train import init_distributed

    ctx = init_distributed()  # under torchrun: shard the batches, sum the counts
    cert, cfg, x, y, eps = _load_for_eval(args)
    curve = [float(e) for e in args.eps_curve.split(",")] if args.eps_curve else []
    rep = evaluate(cert, x, y, eps, pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts, eps_curve=curve,
                   batch_size=args.batch_size, tightness_n=args.tightness_n if ctx.main else 0,
                   progress=not args.no_progress, ctx=ctx, paper_attack=args.paper_attack)
    ctx.close()
    if not ctx.main:
        return 0
    rep.update({"checkpoint": str(args.checkpoint), "split": args.split, "model": cfg.model})
    if args.out:
        for p in write_report(rep, args.out):
            print(f"wrote {p}", file=sys.stderr)
    print(json.dumps({k: v for k, v in rep.items() if k != "tightness"}, indent=2, sort_keys=True))
    return 0


def cmd_certify(args) -> int:
    from bcpc.train import init_distributed

    ctx = init_distributed()  # under torchrun: each rank certifies every world-th batch
    cert, cfg, x, y, eps = _load_for_eval(args)
    t0 = time.time()
    starts = range(ctx.rank * 500, len(x), 500 * ctx.world)
    ok = sum(int(cert.certify(x[i:i + 500], y[i:i + 500], eps).sum()) for i in starts)
    (certified,) = ctx.sum([ok])
    dt = time.time() - t0
    ctx.close()
    if ctx.main:
        print(json.dumps({"n": len(x), "eps": eps, "certified": int(certified), "verified_acc": certified / len(x),
                          "processes": ctx.world, "seconds": round(dt, 2),
                          "images_per_second": round(len(x) / dt, 1)}, indent=2))
    return 0


def cmd_audit(args) -> int:
    from bcpc.testing import audit

    cert, cfg, x, y, eps = _load_for_eval(args)
    rep = audit(cert, x, y, eps, pgd_steps=args.pgd_steps, restarts=args.restarts, sphere_samples=args.samples,
                progress=not args.no_progress)
    print(json.dumps({"checkpoint": str(args.checkpoint), "eps": eps, **rep.to_dict()}, indent=2))
    return 1 if rep.violations else 0


def demo_config(out_dir: str = "runs", quick: bool = False):
    """The demo run: a small conv net on 20,000 MNIST images, l2 eps 1.58, a few minutes on 2 cores."""
    from bcpc.config import TrainConfig

    cfg = TrainConfig(name="demo", model="mnist_small", out_dir=out_dir, eps=1.58, epochs=6, warmup_epochs=1,
                      ramp_epochs=3, batch_size=50, lr=1e-3, lr_decay_epochs=[5], lr_decay_factor=0.3,
                      train_subset=20000, val_subset=500, checkpoint_every=200)
    if quick:  # CI: the same pipeline, minutes -> seconds
        cfg.epochs, cfg.warmup_epochs, cfg.ramp_epochs, cfg.lr_decay_epochs = 2, 0.5, 1, []
        cfg.train_subset, cfg.val_subset = 2000, 200
    return cfg


def cmd_demo(args) -> int:
    from bcpc.evaluate import evaluate
    from bcpc import data
    from bcpc.train import fit, load_trained

    cfg = demo_config(args.out_dir, args.quick)
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    print(f"bcpc demo: certified training of {cfg.model} on {cfg.train_subset} MNIST images, l2 eps={cfg.eps}, "
          f"{cfg.epochs} epochs", flush=True)
    res = fit(cfg, progress=not args.no_progress)
    model, cert, _, _ = load_trained(res.run_dir / "best.pt")
    n = 200 if args.quick else 1000
    x, y = data.mnist(cfg.data_root, "test")
    rep = evaluate(cert, x[:n], y[:n], cfg.eps, pgd_steps=20 if args.quick else 50, progress=not args.no_progress)
    print(f"\ntrained in {res.seconds:.0f} s; on the first {n} MNIST test images at l2 eps={cfg.eps}:")
    print(f"  clean accuracy     {100 * rep['clean_acc']:.1f}%")
    print(f"  PGD accuracy       {100 * rep['pgd_acc']:.1f}%  ({rep['pgd']['steps']} steps)")
    print(f"  certified accuracy {100 * rep['verified_acc']:.1f}%  (sound: guaranteed Lipschitz bounds, float64)")
    return 0


def cmd_inspect(args) -> int:
    from bcpc.inspect import (build_report, check_input_shape, check_render_path, compile_checked, example_batch,
                              load_factory, load_weights, parse_domain, parse_shape, render, render_dot)

    shape = parse_shape(args.input_shape)
    if args.render:
        check_render_path(args.render)
    model = load_factory(args.model, seed=args.seed)
    cfg, lip_state = load_weights(model, args.checkpoint) if args.checkpoint else (None, None)
    cfg = cfg or {}
    model.eval()
    check_input_shape(model, shape, args.model)
    norm = args.norm or cfg.get("norm") or "l2"
    if args.input_domain is not None:
        domain = parse_domain(args.input_domain)
    else:
        domain = tuple(cfg["input_domain"]) if cfg.get("input_domain") else (0.0, 1.0)
    cert = compile_checked(model, norm, shape, domain, lip_state, args.checkpoint, debug=args.debug)
    x = y = None
    if args.eps is not None:
        data = args.data if args.data != "auto" else ("mnist" if cfg.get("dataset") == "mnist" else "random")
        x, y = example_batch(shape, args.n, domain, seed=args.seed, data=data, data_root=args.data_root)
    report = build_report(cert, x, y, eps=args.eps)
    print(render(report, args.format, cert), end="")
    if args.render:
        print(f"wrote {render_dot(report, args.render)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bcpc", description="Certified robustness for PyTorch models (BCP).",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="certified training from a YAML config",
                       epilog="example: bcpc train --config configs/mnist_4c3f.yaml --resume",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", required=True)
    t.add_argument("--resume", action="store_true", help="continue from <out_dir>/<name>/last.pt")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this global step (checkpointed; resumable)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    for name, func, helptext in (("evaluate", cmd_evaluate, "clean / PGD / verified accuracy of a checkpoint"),
                                 ("certify", cmd_certify, "sound certification of a data split"),
                                 ("audit", cmd_audit, "attack every certified input; violations must be 0")):
        e = sub.add_parser(name, help=helptext,
                           epilog=f"example: bcpc {name} --checkpoint models/mnist_4c3f.pt --eps 1.58",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        e.add_argument("--checkpoint", required=True)
        e.add_argument("--eps", type=float, default=None, help="radius (default: the run's eps_eval / eps)")
        e.add_argument("--split", default="test", choices=("train", "val", "test"))
        e.add_argument("--n", type=int, default=None, help="first N images only")
        e.add_argument("--data-root", default=None)
        e.set_defaults(func=func)
        if name == "audit":
            e.add_argument("--pgd-steps", type=int, default=100)
            e.add_argument("--restarts", type=int, default=3)
            e.add_argument("--samples", type=int, default=64, help="sphere / corner samples per input")
            e.add_argument("--no-progress", action="store_true")
        if name == "evaluate":
            e.add_argument("--pgd-steps", type=int, default=100)
            e.add_argument("--pgd-restarts", type=int, default=1)
            e.add_argument("--paper-attack", action="store_true",
                           help="also run the BCP paper's own (weaker) PGD: cross-entropy, last iterate")
            e.add_argument("--eps-curve", default="", help="comma-separated radii for verified accuracy vs eps")
            e.add_argument("--tightness-n", type=int, default=0, help="images for the tightness measure tau")
            e.add_argument("--batch-size", type=int, default=500)
            e.add_argument("--out", default=None, help="folder for report.json and plots")
            e.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("inspect", help="per-node view of a compiled model: ops, rules, Lipschitz, bound sizes, tau",
                       epilog="examples:\n"
                              "  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28\n"
                              "  bcpc inspect bcpc.models:conv_4c3f --input-shape 1,28,28 --eps 1.58 --n 4 "
                              "--data mnist\n"
                              "  bcpc inspect mypkg.models:make_4c3f --input-shape 1,28,28 --checkpoint ckpt.pt "
                              "--eps 1.58 --format yaml\n"
                              "  bcpc inspect bcpc.models:conv_small --input-shape 1,28,28 --eps 1.58 "
                              "--render net.png\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("model", metavar="MODULE:FACTORY", help="a function or class building the model with no arguments")
    i.add_argument("--input-shape", required=True, help="per-sample input shape, e.g. 1,28,28")
    i.add_argument("--checkpoint", default=None, help="a bcpc training checkpoint or a plain state_dict")
    i.add_argument("--eps", type=float, default=None, help="also bound inputs at this radius (per-node sizes, tau)")
    i.add_argument("--n", type=int, default=4, help="how many inputs with --eps (default 4)")
    i.add_argument("--data", default="auto", choices=("auto", "random", "mnist"),
                   help="inputs for --eps: MNIST test images, or seeded random inputs in the domain (auto: MNIST "
                        "when the checkpoint was trained on it)")
    i.add_argument("--data-root", default="data")
    i.add_argument("--norm", default=None, help="threat model (default: the checkpoint's, else l2)")
    i.add_argument("--input-domain", default=None, help="LOW,HIGH or none (default: the checkpoint's, else 0,1)")
    i.add_argument("--format", default="table", choices=("table", "yaml", "json", "dot", "code"))
    i.add_argument("--render", default=None, metavar="PATH", help="also draw the graph with graphviz (.png/.svg/.pdf)")
    i.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the random inputs")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="train a small model on MNIST and certify it (minutes on a CPU)")
    d.add_argument("--quick", action="store_true", help="a reduced run (seconds), as CI runs it")
    d.add_argument("--out-dir", default="runs")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    from bcpc.errors import BcpcError

    parser = build_parser()
    args = parser.parse_args(argv)
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

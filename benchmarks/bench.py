"""Cost of certification relative to plain training, measured in one process and one run.

    python benchmarks/bench.py [--models mnist_4c3f,cifar_6c2f,resnet_small,mnist_4c3f_minmax] [--batches 50,128,512]
                               [--threads 1,2] [--reps 10] [--steps-only] [--inductor] [--peers] [--bf16]

For each model and batch: plain forward, plain training step, bcpc forward (bcp, ibp, lipschitz;
training mode, estimates), certified training step (bcp) and its ratio to the floor (a plain step
at batch 2B plus one at batch B: the passes a BCP step cannot avoid), the training step with the
global bound (``method="lipschitz"``), certification throughput (sound path:
float64, guaranteed Lipschitz bounds, computed once per weight version), compile time, and the
memory a certified and a plain training step keep for backward (activations; the step's memory
peak). Every time is the median of --reps repetitions
after warm-up, and is printed as a ratio to the plain training step of the same model and batch.

``--inductor`` adds the certified step of ``bcpc.compile(..., backend="inductor")`` (torch.compile;
its one-off compile time is printed separately). ``--peers`` adds auto_LiRPA's IBP and CROWN-IBP
training steps on the same model and batch (benchmarks/peers.py; auto-lirpa needs its own
environment, ``.venv-peers``: see that file), so one run gives every ratio. ``--bf16`` adds the
global-bound step with ``precision: bfloat16`` (the convolutions in bfloat16, linear layers in
float32: ``bcpc.train.step_precision``) and with every product in bfloat16 (plain autocast).
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import bcpc
from bcpc import models
from bcpc.train import step_precision

SHAPES = {"mnist": (1, 28, 28), "cifar": (3, 32, 32), "resnet": (3, 32, 32)}


def shape_of(name):
    return SHAPES[name.split("_")[0]]


def median_time(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def training_step(loss_fn, opt):
    """A closure running one training step: ``loss_fn()`` forward, backward, ``opt.step()``."""
    def step():
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def saved_for_backward_mib(loss_fn, params=()) -> float:
    """MiB of distinct tensor storage autograd keeps for the backward pass of ``loss_fn()``.

    The activations saved for backward are what makes a training step's memory peak; counting
    them through ``torch.autograd.graph.saved_tensors_hooks`` (each storage once) is exact and
    deterministic, unlike the process RSS on CPU. The storage of ``params`` is excluded (shared by
    both steps), views of it included (``F.linear`` saves ``W.t()``, a view of the parameter).
    """
    own = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values()) / 2**20


def setup(name, batch, method="bcp"):
    torch.manual_seed(0)
    model = models.ARCHITECTURES[name]()
    x = torch.rand((batch,) + shape_of(name))
    y = torch.randint(0, 10, (batch,))
    t = time.perf_counter()
    cert = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), method=method)
    return model, cert, x, y, time.perf_counter() - t


def measure(name, batch, reps, inductor=False, peers=False, steps_only=False, bf16=False):
    model, cert, x, y, compile_s = setup(name, batch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # tiny steps: weights change, bounds stay finite
    model.train()

    plain_step = training_step(lambda: F.cross_entropy(model(x), y), opt)
    cert_step = training_step(lambda: cert.loss(x, y, 36 / 255, 1.0), opt)

    out = {"model": name, "batch": batch, "compile_s": compile_s}
    out["plain_step"] = median_time(plain_step, reps)
    certs = {"bcp": cert}
    for m in ("ibp", "lipschitz"):
        certs[m] = setup(name, batch, m)[1]
    if not steps_only:
        with torch.no_grad():
            out["plain_forward"] = median_time(lambda: model(x), reps)
            for m, c in certs.items():
                c.train()
                out[f"bcpc_forward_{m}"] = median_time(lambda c=c: c(x, 36 / 255, y, sound=False), reps)
    out["certified_step"] = median_time(cert_step, reps)
    lip = certs["lipschitz"]
    lip.train()
    out["lipschitz_step"] = median_time(training_step(lambda: lip.loss(x, y, 36 / 255, 1.0), opt), reps)
    if bf16:
        def lip_loss_in(context):
            def loss():
                with context():
                    return lip.loss(x, y, 36 / 255, 1.0)
            return loss
        mixed = lambda: step_precision("bfloat16", x.device)  # noqa: E731
        every = lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)  # noqa: E731
        out["lipschitz_step_bf16"] = median_time(training_step(lip_loss_in(mixed), opt), reps)
        out["lipschitz_step_all_bf16"] = median_time(training_step(lip_loss_in(every), opt), reps)
    # the floor of a BCP step: the box's two passes (A on u + l and |A| on u - l, batch 2B) and the
    # centre's (batch B) through the same model, forward and backward, without any bound work
    x2, y2 = torch.cat([x, x]), torch.cat([y, y])
    floor_step = training_step(lambda: F.cross_entropy(model(x2), y2) + F.cross_entropy(model(x), y), opt)
    out["floor_step"] = median_time(floor_step, reps)
    if inductor:
        fast = bcpc.compile(model, "l2", example_input=x[:1], input_domain=(0.0, 1.0), backend="inductor")
        fast_step = training_step(lambda: fast.loss(x, y, 36 / 255, 1.0), opt)
        t = time.perf_counter()
        fast_step()  # torch.compile's one-off code generation
        out["inductor_compile_s"] = time.perf_counter() - t
        out["inductor_step"] = median_time(fast_step, reps)
    out["saved_mib_plain"] = saved_for_backward_mib(lambda: F.cross_entropy(model(x), y), model.parameters())
    # the Lipschitz cache's power-iteration step (torch.func.vjp, under no_grad) cannot run under
    # saved-tensor hooks and saves nothing for backward: hold it still while counting
    cert.propagation.lip.eval()
    out["saved_mib_certified"] = saved_for_backward_mib(lambda: cert.loss(x, y, 36 / 255, 1.0), model.parameters())
    cert.propagation.lip.train()
    if steps_only:
        return out
    model.eval()
    n_cert = max(batch, 200)
    xc = torch.rand((n_cert,) + shape_of(name))
    yc = torch.randint(0, 10, (n_cert,))
    cert.certify(xc[:2], yc[:2], 36 / 255)  # bounds + float64 twin for this weight version
    t = time.perf_counter()
    cert.certify(xc, yc, 36 / 255)
    out["certify_images_per_s"] = n_cert / (time.perf_counter() - t)
    if peers:
        import peers as peers_mod  # benchmarks/peers.py: needs auto-lirpa (.venv-peers)
        r = peers_mod.measure_auto_lirpa(model, x, y, 36 / 255, reps)
        for key in ("ibp", "crown_ibp"):
            # the ratio to this run's own plain step measured inside measure_auto_lirpa
            out[f"lirpa_{key}"] = r.get(f"{key}_ratio", float("nan"))
    return out


def memory_table(args) -> None:
    """Only what a training step keeps for backward, certified / plain: exact and independent of
    the machine's load and thread count, so it can be measured beside other work."""
    print("saved for backward (one training step, storage of the parameters excluded), certified / plain")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            model, cert, x, y, _ = setup(name, batch)
            model.train()
            cert.loss(x, y, 36 / 255, 1.0).backward()  # the first step's one-off work
            plain = saved_for_backward_mib(lambda: F.cross_entropy(model(x), y), model.parameters())
            cert.propagation.lip.eval()  # its power iteration cannot run under saved-tensor hooks
            certified = saved_for_backward_mib(lambda: cert.loss(x, y, 36 / 255, 1.0), model.parameters())
            print(f"{name:>17} {batch:>5} {certified / plain:5.2f}x ({certified:.1f} / {plain:.1f} MiB)", flush=True)


def table(args, threads) -> list:
    """One table: every model and batch at ``threads`` threads."""
    rows = []
    print(f"torch {torch.__version__}, {threads} thread(s), median of {args.reps}; ratios are to the plain "
          "training step of the same model and batch")
    head = (f"{'model':>17} {'batch':>5} {'plain step':>10} | {'fwd':>5} {'bcp fwd':>7} {'ibp fwd':>7} {'lip fwd':>7} "
            f"{'CERT STEP':>9} {'/ floor':>7} {'lip step':>8} | {'certify img/s':>13} {'compile s':>9} | {'saved for backward':>24}"
            + (f" | {'inductor':>8} {'its compile s':>13}" if args.inductor else "")
            + (f" | {'LiRPA IBP':>9} {'CROWN-IBP':>9}" if args.peers else "")
            + (f" | {'lip bf16':>8} {'lip all-bf16':>12}" if args.bf16 else ""))
    print(head)
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(name, batch, args.reps, inductor=args.inductor, peers=args.peers, steps_only=args.steps_only,
                        bf16=args.bf16)
            r["threads"] = threads
            rows.append(r)
            p = r["plain_step"]
            fwd = ("  " + "    -   " * 4 if args.steps_only else
                   f"{r['plain_forward'] / p:5.2f} {r['bcpc_forward_bcp'] / p:7.2f} {r['bcpc_forward_ibp'] / p:7.2f} "
                   f"{r['bcpc_forward_lipschitz'] / p:7.2f}")
            certify = f"{'-':>13}" if args.steps_only else f"{r['certify_images_per_s']:13.0f}"
            line = (f"{name:>17} {batch:>5} {1000 * p:8.1f}ms | {fwd} {r['certified_step'] / p:8.2f}x "
                    f"{r['certified_step'] / r['floor_step']:6.2f}x {r['lipschitz_step'] / p:7.2f}x | "
                    f"{certify} {r['compile_s']:9.2f} | "
                    f"{r['saved_mib_certified'] / r['saved_mib_plain']:5.2f}x "
                    f"({r['saved_mib_certified']:.1f}/{r['saved_mib_plain']:.1f} MiB)")
            if args.inductor:
                line += f" | {r['inductor_step'] / p:7.2f}x {r['inductor_compile_s']:13.1f}"
            if args.peers:
                line += f" | {r['lirpa_ibp']:8.2f}x {r['lirpa_crown_ibp']:8.2f}x"
            if args.bf16:
                line += f" | {r['lipschitz_step_bf16'] / p:7.2f}x {r['lipschitz_step_all_bf16'] / p:11.2f}x"
            print(line, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist_4c3f,cifar_6c2f,resnet_small,mnist_4c3f_minmax")
    ap.add_argument("--batches", default="50,128,512")
    ap.add_argument("--threads", default="1", help="thread counts, one table each (e.g. 1,2)")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the training steps and their memory (no forward-only timings, certification)")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the saved-for-backward memory of the training steps (exact: no idle machine needed)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    ap.add_argument("--inductor", action="store_true", help="also time backend='inductor' (torch.compile)")
    ap.add_argument("--peers", action="store_true", help="also time auto_LiRPA IBP / CROWN-IBP (needs auto-lirpa)")
    ap.add_argument("--bf16", action="store_true", help="also time the global-bound step in bfloat16 (precision: "
                    "bfloat16, and every product in bfloat16)")
    args = ap.parse_args()
    if args.memory_only:
        memory_table(args)
        return
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        rows += table(args, threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

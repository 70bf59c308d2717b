"""A 4C3F certified training epoch on an accelerator: eager, inductor, inductor + CUDA graphs.

    python benchmarks/gpu.py [--device cuda] [--batches 50,512] [--modes eager,inductor,cudagraphs]
                             [--steps N] [--images 50000] [--certify 200]

One prepared run (under 10 minutes on an H100-class GPU). For each batch size and each mode it
trains MNIST 4C3F (``cert.loss``, method ``bcp``, eps 1.58, lam 0.5; Adam) from the same
initial weights for one epoch of ``--images`` images (MNIST's 50,000 training images when
``data/mnist.npz`` is there, else random MNIST-shaped data and labels), and prints

* the seconds of the first steps (``--warmup``, where torch.compile compiles) and the seconds of
  the epoch after them, as measured (``--steps`` cuts the epoch short: then only ms/step is a
  measurement and the epoch column is empty);
* the GPU utilisation during the epoch, sampled every 50 ms with ``torch.cuda.utilization()``
  (needs pynvml; otherwise "not available");
* the loss at the end, the same model and data in every mode;
* for ``cudagraphs`` on CUDA, how often inductor declined CUDA graphs (0: the step was captured).

The Lipschitz cache of every run is warmed eagerly first (its first call's 50 power-iteration
steps per layer would otherwise be compiled into a graph of its own).

Modes: ``eager`` (``bcpc.compile(...)``: the emitted module as it is), ``inductor``
(``bcpc.compile(..., backend="inductor")``: the propagation module compiled) and ``cudagraphs``
(the whole loss, ``cert.loss``, under ``torch.compile(mode="reduce-overhead", fullgraph=True)``:
inductor, and CUDA graphs on a CUDA device; its backward is compiled with it). ``--backend``
replaces inductor in both compiled modes (e.g. ``aot_eager``, to check the plumbing quickly).

Then the certificates: the model trained by the first run is certified (the sound path, float64)
on ``--certify`` test images at four radii on the device and on the CPU; the certify booleans
must be the same and the margin bounds equal within 1e-7 (relative to their scale); the exit
status is 1 otherwise, or when a mode failed. On the CPU (``--device cpu``, the reduced form
``--device cpu --steps 3 --batches 8`` that tests/test_benchmarks.py runs) every figure is a CPU
figure, the certificates are compared with themselves, and the script says so.

On a machine without bcpc installed, install it first (offline:
``python3 -m pip install --no-deps --no-build-isolation -e .``) so that ``bcpc.passes`` and
``bcpc.rules`` resolve.
"""
import argparse
import contextlib
import copy
import threading
import time
from pathlib import Path

import torch

import bcpc
from bcpc import data, models

EPS, LAM = 1.58, 0.5
CERTIFY_EPS = (0.001, 0.01, 0.1, 1.58)  # from "most certified" to "none", for random data too
MARGIN_RTOL = 1e-7


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dataset(choice, split, n, seed):
    """(x, y, description): MNIST from data/mnist.npz (never downloaded here), or random."""
    if choice in ("auto", "mnist") and Path("data/mnist.npz").exists():
        x, y = data.load("mnist", "data", split)
        return x[:n], y[:n], f"MNIST {split}"
    if choice == "mnist":
        raise SystemExit("--data mnist: data/mnist.npz not found (bcpc.data.load('mnist', 'data', ...) makes it)")
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "random MNIST-shaped"


class Utilisation:
    """GPU utilisation (%), sampled by a background thread while the block runs."""

    def __init__(self, device):
        self.device, self.samples, self.note = device, [], None
        if device.type != "cuda":
            self.note = "n/a (CPU)"
        else:
            try:
                torch.cuda.utilization(device)
            except Exception as e:  # pynvml missing, or no NVML on this machine
                self.note = f"not available ({type(e).__name__})"

    @contextlib.contextmanager
    def sampling(self):
        if self.note is not None:
            yield
            return
        stop = threading.Event()

        def run():
            while not stop.wait(0.05):
                self.samples.append(torch.cuda.utilization(self.device))
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def __str__(self):
        if self.note is not None:
            return self.note
        if not self.samples:
            return "no samples"
        mean = sum(self.samples) / len(self.samples)
        return f"{mean:.0f}% mean, {max(self.samples)}% max ({len(self.samples)} samples)"


def build(mode, device, backend, initial, xb, yb):
    """(model, cert, loss function, optimizer) for one mode, from the initial weights, with the
    Lipschitz cache warmed eagerly on ``xb`` (its first call's 50 power-iteration steps per layer
    would otherwise be compiled into a one-off graph)."""
    model = models.ARCHITECTURES["mnist_4c3f"]()
    model.load_state_dict(initial)
    model.to(device).train()
    example = torch.zeros(1, 1, 28, 28, device=device)
    cert = bcpc.compile(model, "l2", example_input=example, input_domain=(0.0, 1.0), method="bcp",
                        backend=backend if mode == "inductor" else None)
    with torch.no_grad():
        cert.propagation(xb, EPS, yb, False)  # the uncompiled module, in every mode

    def loss_fn(xb, yb):
        return cert.loss(xb, yb, EPS, LAM)
    if mode == "cudagraphs":
        loss_fn = torch.compile(loss_fn, backend=backend, mode="reduce-overhead" if backend == "inductor" else None,
                                fullgraph=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cuda", "cpu"))
    return model, cert, loss_fn, opt


def cudagraph_skips():
    """How often inductor declined to use CUDA graphs so far (its own counter; None if absent)."""
    try:
        from torch._dynamo.utils import counters  # a private counter, read for this report only
        return counters["inductor"]["cudagraph_skips"]
    except Exception:
        return None


def epoch_run(mode, batch, args, device, x, y, initial):
    model, cert, loss_fn, opt = build(mode, device, args.backend, initial, x[:batch], y[:batch])
    steps_epoch = len(x) // batch  # the last partial batch is dropped: one shape, no recompiles
    steps = steps_epoch if args.steps is None else min(args.steps, steps_epoch)
    g = torch.Generator(device=device).manual_seed(1)
    order = torch.randperm(len(x), generator=g, device=device)

    def step(i):
        idx = order[(i * batch) % (steps_epoch * batch):][:batch]
        loss = loss_fn(x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    skips = cudagraph_skips()
    sync(device)
    t = time.perf_counter()
    for i in range(args.warmup):  # compiles (and records the CUDA graphs)
        step(i)
    sync(device)
    warm_s = time.perf_counter() - t
    util = Utilisation(device)
    with util.sampling():
        t = time.perf_counter()
        for i in range(steps):
            loss = step(i)
        sync(device)
        run_s = time.perf_counter() - t
    note = str(util)
    if mode == "cudagraphs" and device.type == "cuda" and skips is not None:
        note += f"; CUDA graphs skipped {cudagraph_skips() - skips} time(s)"
    return dict(mode=mode, batch=batch, warm_s=warm_s, run_s=run_s, steps=steps, steps_epoch=steps_epoch,
                util=note, loss=float(loss.detach()), model=model)


def certificates(model, device, x, y):
    """certify booleans and margins (float64, sound) on ``device`` and on the CPU, for each radius."""
    out = {}
    for dev in dict.fromkeys((device, torch.device("cpu"))):  # the CPU once when it is the device
        m = copy.deepcopy(model).to(dev).eval()
        cert = bcpc.compile(m, "l2", example_input=x[:1].to(dev), input_domain=(0.0, 1.0), method="bcp")
        xd, yd = x.to(dev), y.to(dev)
        out[dev.type] = [(cert.certify(xd, yd, e).cpu(), cert.margins(xd, yd, e).double().cpu()) for e in CERTIFY_EPS]
    return out[device.type], out["cpu"]  # (on the CPU: the CPU against itself)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="50,512")
    ap.add_argument("--modes", default="eager,inductor,cudagraphs")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled modes")
    ap.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch (default: all)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed epoch (compilation)")
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--certify", type=int, default=200, help="images for the certificate check")
    ap.add_argument("--data", choices=("auto", "mnist", "random"), default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch (and bcpc kernel) threads on the CPU")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    unknown = set(modes) - {"eager", "inductor", "cudagraphs"}
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from eager, inductor, cudagraphs")

    x, y, source = dataset(args.data, "train", args.images, seed=0)
    xc, yc, _ = dataset(args.data, "test", args.certify, seed=1)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__}, {device} ({name}); 4C3F, method bcp, eps {EPS}, {len(x)} {source} images")
    if device.type != "cuda":
        print("NOTE: not a GPU measurement (device is the CPU): these figures only show that the script runs")
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    initial = models.ARCHITECTURES["mnist_4c3f"]().state_dict()

    print(f"{'batch':>5} {'mode':>10} {'warm-up s':>9} {'ms/step':>8} {'s/epoch':>8} {'loss':>8}  GPU utilisation")
    first_model, failed = None, False
    for batch in batches:
        for mode in modes:
            try:
                r = epoch_run(mode, batch, args, device, x, y, initial)
            except Exception as e:  # report and go on: one broken mode must not cost the others
                print(f"{batch:5d} {mode:>10} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                failed = True
                continue
            if first_model is None:
                first_model = r["model"]
            epoch = f"{r['run_s']:8.2f}" if r["steps"] == r["steps_epoch"] else f"{'-':>8}"
            note = "" if r["steps"] == r["steps_epoch"] else f"  [{r['steps']} of {r['steps_epoch']} steps]"
            print(f"{batch:5d} {mode:>10} {r['warm_s']:9.2f} {1000 * r['run_s'] / r['steps']:8.2f} {epoch} "
                  f"{r['loss']:8.4f}  {r['util']}{note}", flush=True)
            torch.compiler.reset()  # free the compiled graphs (and CUDA graph pools) of this run
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if first_model is None:
        print("no run finished: no certificate check")
        return 1
    dev_runs, cpu_runs = certificates(first_model, device, xc, yc)
    against = "the cpu against itself" if device.type == "cpu" else f"{device} against cpu"
    print(f"certificates on {len(xc)} images, {against} (sound path, float64):")
    bad = False
    for e, (ok_d, m_d), (ok_c, m_c) in zip(CERTIFY_EPS, dev_runs, cpu_runs):
        finite = torch.isfinite(m_c)
        same_inf = torch.equal(finite, torch.isfinite(m_d))
        diff = float((m_d - m_c)[finite].abs().max()) if finite.any() else 0.0
        scale = float(m_c[finite].abs().max()) if finite.any() else 1.0
        within = same_inf and diff <= MARGIN_RTOL * max(scale, 1.0)
        differ = int((ok_d != ok_c).sum())
        bad |= differ > 0 or not within
        print(f"  eps {e:<5g}: certified {int(ok_d.sum()):4d} / {int(ok_c.sum()):4d} (device / cpu), "
              f"certificates that differ: {differ}, largest |margin difference| {diff:.3g} "
              f"(scale {scale:.3g}): {'within' if within else 'OUTSIDE'} tolerance")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

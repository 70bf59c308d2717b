"""Certification on an accelerator against the CPU: same certificates, still sound, and how fast.

    python benchmarks/device_parity.py [--checkpoint models/mnist_4c3f.pt] [--n 2000] [--device cuda]

Loads a bcpc checkpoint twice, on the CPU and on ``--device`` (default: cuda when there is one,
else the CPU again, which only checks that the script runs), and on the first ``--n`` MNIST test
images at the checkpoint's radius prints, one line per device:

* the time of the first certify call (the guaranteed Lipschitz bounds of every layer, computed
  once per weight version) and the throughput of certification with those bounds cached;
* the verified accuracy;

then the number of inputs whose certificate differs between the two devices, the largest
difference of a certified margin bound, and a soundness check on the device: PGD (margin loss,
``--pgd-steps`` steps of eps/4, worst point kept) on the first 500 images, counting attacked
margins that fall below the device's certified bound (must be 0).
"""
import argparse
import copy
import time

import torch

from bcpc import data
from bcpc.testing import pgd_margin
from bcpc.train import load_trained


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(path, device, x, y, eps, batch):
    _, cert, cfg, _ = load_trained(path, map_location=device)
    cert.to(device)
    x, y = x.to(device), y.to(device)
    t = time.perf_counter()
    cert.certify(x[:1], y[:1], eps)  # computes and caches the guaranteed bounds
    sync(device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    ok = torch.cat([cert.certify(x[i:i + batch], y[i:i + batch], eps) for i in range(0, len(x), batch)])
    sync(device)
    rate = len(x) / (time.perf_counter() - t)
    bounds = torch.cat([cert.margins(x[i:i + batch], y[i:i + batch], eps) for i in range(0, len(x), batch)])
    return cert, x, y, ok.cpu(), bounds.double().cpu(), first, rate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="models/mnist_4c3f.pt")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--eps", type=float, default=None, help="radius (default: the checkpoint's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--pgd-steps", type=int, default=100)
    args = ap.parse_args()

    _, _, cfg, _ = load_trained(args.checkpoint)
    eps = cfg.target_eps_eval if args.eps is None else args.eps
    x, y = data.load(cfg.dataset, args.data_root, "test")
    x, y = x[:args.n], y[:args.n]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.checkpoint}: {len(x)} test images, eps {eps:g}; devices cpu ({torch.get_num_threads()} threads) "
          f"and {device} ({name})")
    runs = []
    for label, dev in (("cpu", torch.device("cpu")), (str(device), device)):
        runs.append(measure(args.checkpoint, dev, x, y, eps, args.batch))
        _, _, _, ok, _, first, rate = runs[-1]
        print(f"  {label:>8}: bounds {first:7.2f} s | certify {rate:10.1f} img/s | verified {ok.float().mean():.4f}")
    (_, _, _, ok_c, m_c, _, rate_c), (cert, xd, yd, ok_d, m_d, _, rate_d) = runs
    finite = torch.isfinite(m_c) & torch.isfinite(m_d)
    print(f"  throughput ratio {device}/cpu: {rate_d / rate_c:.1f}x")
    print(f"  certificates that differ: {int((ok_c != ok_d).sum())} of {len(x)}; "
          f"largest |bound(cpu) - bound({device})|: {float((m_c - m_d)[finite].abs().max()):.3g}")

    k = min(500, len(x))
    model = cert.model.eval()
    adv = pgd_margin(model, xd[:k], yd[:k], eps, cert.norm, steps=args.pgd_steps, step_size=eps / 4,
                     restarts=1, domain=cert.input_domain, random_start=False)
    with torch.no_grad():  # the network in float64: the certificate bounds the exact function
        logits = copy.deepcopy(model).double()(adv.double())
    attacked = logits.gather(1, yd[:k, None]) - logits  # z_y - z_j at the attacked points
    bound = m_d[:k].to(attacked.device)
    checked = torch.isfinite(bound)
    below = (attacked < bound) & checked
    print(f"  soundness on {device}: attacked margins below the certified bound: {int(below.sum())} "
          f"of {int(checked.sum())} (images {k}, PGD {args.pgd_steps} steps)")
    return 1 if below.any() else 0


if __name__ == "__main__":
    raise SystemExit(main())

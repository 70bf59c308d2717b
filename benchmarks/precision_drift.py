"""Does a low-precision training step still follow float32? Continue a run's checkpoint in
bfloat16 and, every --every steps, compare its gradient with float32's on the same batch.

    bcpc train --config configs/experiments/minmax_800_bf16.yaml --set out_dir=runs/drift --max-steps 1200
    python benchmarks/precision_drift.py --checkpoint runs/drift/minmax_800_bf16/last.pt --steps 300
    python benchmarks/precision_drift.py --checkpoint runs/drift/minmax_800_bf16/last.pt --steps 300 --all-bf16

The run continues as ``bcpc train`` would (same data order, eps/lam/lr schedule, optimizer state),
with each step's forward under ``bcpc.train.step_precision("bfloat16")`` (convolutions in bfloat16,
linear layers and matrix products in float32), or with ``--all-bf16`` under plain ``torch.autocast``
(every product in bfloat16). Every --every steps it prints the loss, the same batch's loss in
float32 from the same weights and power-iteration vectors, the largest float32 logit, the product
of the layer-norm estimates, and the cosine between the low-precision and the float32 gradient of
each weight. Nothing is written.
"""
import argparse
import math

import torch
import torch.nn.functional as F

from bcpc import checkpoint, config, data
from bcpc import train as T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's last.pt (best.pt: a fresh optimizer)")
    ap.add_argument("--steps", type=int, default=300, help="steps to continue (default 300)")
    ap.add_argument("--every", type=int, default=20, help="compare with float32 every this many steps (default 20)")
    ap.add_argument("--all-bf16", action="store_true", help="every product in bfloat16 (plain torch.autocast)")
    args = ap.parse_args()
    ckpt = checkpoint.load(args.checkpoint)
    cfg = config.from_dict(ckpt["config"], args.checkpoint)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    x_train, y_train = data.load(cfg.dataset, cfg.data_root, "train")
    if cfg.train_subset:
        x_train, y_train = x_train[:cfg.train_subset], y_train[:cfg.train_subset]
    model, cert = T.build(cfg, x_train)
    certs = T.training_certs(cfg, model, cert, x_train)
    lip_owner = certs[cfg.method]
    checkpoint.load_model_state(model, ckpt["model_state"], args.checkpoint)
    lip_owner.propagation.lip.load_state_dict(ckpt["lip_state"])
    objective = T.CertifiedLoss(certs, cfg.loss, **T.loss_options(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if "optimizer" in ckpt:  # last.pt; a best.pt continues with a fresh optimizer
        opt.load_state_dict(ckpt["optimizer"])
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"].cpu())
    step, spe = int(ckpt.get("step", 0)), len(x_train) // cfg.batch_size
    pairs = [(lip, model.get_parameter(w)) for lip, w in lip_owner.lipschitz_modules.values() if w]
    lips = [lip for lip, _ in pairs]
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    low = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.all_bf16
           else (lambda: T.step_precision("bfloat16", torch.device("cpu"))))
    print(f"{args.checkpoint}: step {step}, {'every product' if args.all_bf16 else 'convolutions'} in bfloat16; "
          f"gradient cosines for {', '.join(names)}")
    model.train()
    lip_owner.train()
    for step in range(step, step + args.steps):
        epoch = step // spe
        order = T.epoch_order(cfg, epoch, len(x_train))
        for g in opt.param_groups:
            g["lr"] = T.lr_at(cfg, epoch)
        idx = order[(step % spe) * cfg.batch_size:(step % spe + 1) * cfg.batch_size]
        xb, yb = x_train[idx], y_train[idx]
        eps, lam = T.schedule(cfg, step, spe)
        method = T.method_at(cfg, epoch)
        with low():
            loss = objective(xb, yb, eps, lam, method)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step % args.every == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            vectors = [lip.u.clone() for lip in lips]
            iters = [lip.n_iter for lip in lips]
            for lip in lips:  # the same power-iteration vectors: no step of their own
                lip.n_iter = 0
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                logits = model(xb)
            loss32 = objective(xb, yb, eps, lam, method)
            loss32.backward()
            for lip, u, n in zip(lips, vectors, iters):
                lip.n_iter = n
                lip.u.copy_(u)
            cos = [F.cosine_similarity(grads[n].flatten(), p.grad.flatten(), dim=0).item()
                   for n, p in model.named_parameters() if n in names]
            with torch.no_grad():
                k = math.prod(float(lip.estimate(w, n_iter=0)) for lip, w in pairs)
            print(f"step {step:>6} eps {eps:.3f} loss {loss.item():10.4g} (float32 {loss32.item():10.4g}) "
                  f"max logit {logits.abs().max().item():8.1f} norm product {k:9.3g} | cosines "
                  + " ".join(f"{c:5.2f}" for c in cos), flush=True)
            for n, p in model.named_parameters():
                p.grad = grads[n]
        opt.step()


if __name__ == "__main__":
    main()

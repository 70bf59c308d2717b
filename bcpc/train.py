"""Certified training (paper Algorithm 1) with resumable, atomic checkpoints.

``fit(cfg)`` trains ``cfg.model`` on ``cfg.dataset`` with the certified loss (eq. 13): one or more
warm-up epochs of plain training, then ``eps`` ramped linearly from 0 to the target and ``lam``
from 0 to 1 over ``ramp_epochs``, Adam. After every epoch it certifies a validation subset (sound
path) and keeps the best model by verified validation accuracy in ``best.pt``; ``last.pt`` is
written every ``checkpoint_every`` steps and at every epoch end. A killed run resumes with
``resume=True`` from ``last.pt`` and produces the same parameters as an uninterrupted run (data
order is a function of (seed, epoch) only). Ctrl-C or SIGTERM writes ``last.pt`` and returns.

Users who want their own loop only need ``cert.loss(x, y, eps, lam)`` and :func:`schedule`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

import bcpc
from bcpc import checkpoint, data
from bcpc.config import TrainConfig
from bcpc.errors import CheckpointError, ConfigError, NonFiniteTrainingError
from bcpc.models import ARCHITECTURES

FORMAT = "bcpc-checkpoint-v1"


def schedule(cfg: TrainConfig, step: int, steps_per_epoch: int) -> tuple:
    """``(eps, lam)`` at a global step: 0 during warm-up, then a ramp to ``(cfg.eps, cfg.lam)``.

    The eps ramp is linear (the paper's); with ``eps_schedule: log``, geometric from
    ``eps_start * eps`` (slow at first: it stays below a tenth of eps for half the ramp); with
    ``eps_schedule: gloro``, GloRo's "log" ramp, ``log`` of the linear interpolation of ``exp(eps)``
    from ``exp(eps_start * eps)`` (fast at first: above half of eps after 30% of the ramp, for
    eps 1.738). lam ramps linearly with it, or is ``cfg.lam`` from the first certified step on
    (``lam_schedule: constant``)."""
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return 0.0, 0.0
    frac = 1.0 if cfg.ramp_epochs == 0 else min(1.0, (epoch - cfg.warmup_epochs) / cfg.ramp_epochs)
    if cfg.eps_schedule == "log":
        eps = cfg.eps * cfg.eps_start ** (1.0 - frac)
    elif cfg.eps_schedule == "gloro":
        start = math.exp(cfg.eps_start * cfg.eps)
        eps = math.log(start + (math.exp(cfg.eps) - start) * frac)
    else:
        eps = cfg.eps * frac
    lam = cfg.lam if cfg.lam_schedule == "constant" else cfg.lam * frac
    return eps, lam


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of a (0-indexed) epoch: step decays, or (``lr_schedule: exp``) constant
    until ``lr_decay_start`` (default: half-way) and then geometric down to ``lr_final`` at the
    last epoch (GloRo: 1e-3 -> 1e-6 over the second half)."""
    if cfg.lr_schedule == "exp":
        start = cfg.epochs / 2 if cfg.lr_decay_start is None else cfg.lr_decay_start
        if epoch < start:
            return cfg.lr
        span = cfg.epochs - 1 - start
        t = 1.0 if span <= 0 else min(1.0, (epoch - start) / span)
        return cfg.lr * (cfg.lr_final / cfg.lr) ** t
    return cfg.lr * cfg.lr_decay_factor ** sum(1 for e in cfg.lr_decay_epochs if epoch >= e)


def method_at(cfg: TrainConfig, epoch: int) -> str:
    """The bound the training loss uses in a (0-indexed) epoch (``late_method`` from its epoch on)."""
    if cfg.late_method is not None and epoch >= cfg.late_method_epoch:
        return cfg.late_method
    return cfg.method


def epoch_order(cfg: TrainConfig, epoch: int, n: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's data order for an epoch: ``DistributedSampler`` (shuffled with ``cfg.seed``,
    ``set_epoch(epoch)``), a function of (seed, epoch) only, so a resumed run repeats it. With
    ``world`` ranks each takes every ``world``-th index of the same permutation, so the union of
    the ranks' k-th local batches is the k-th global batch of a single-process run."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)), dtype=torch.long)


#: the matrix products a bfloat16 training step keeps in float32 (every spelling of them)
_FLOAT32_PRODUCTS = frozenset((F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                               torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.addmm, torch.Tensor.addmm,
                               torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.einsum))


class _Float32Linear(TorchFunctionMode):
    """Under autocast, linear layers and matrix products in float32: inputs cast up, autocast off
    for the call.

    A 4C3F-MinMax with its linear layers in bfloat16 too diverged at epoch 14 of the long recipe,
    reproducibly: its first layers' gradients drifted from float32's as the logits grew
    (benchmarks/precision_drift.py, docs/results.md); with only the convolutions in bfloat16 it
    trains as in float32, and the convolutions are where the time goes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FLOAT32_PRODUCTS and torch.is_autocast_enabled(_tensor_device(args)):
            with torch.autocast(_tensor_device(args), enabled=False):
                return func(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


def _up(a):
    """A bfloat16 (or float16) tensor as float32, also inside a list or tuple (``einsum``'s
    operand list); anything else as it is."""
    if isinstance(a, (list, tuple)):
        return type(a)(_up(v) for v in a)
    return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a


def _tensor_device(args) -> str:
    """The device type of the first tensor in ``args`` (looking inside lists and tuples)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in a):
            return _tensor_device(a)
    return "cpu"


def step_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context of a training step's forward: ``"float32"`` nothing; ``"bfloat16"`` the
    convolutions in bfloat16 under ``torch.autocast``, linear layers and matrix products in
    float32 (so the logits, margins and loss are float32 too)."""
    if precision == "float32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    stack.enter_context(_Float32Linear())
    return stack


class CertifiedLoss(nn.Module):
    """The training objective as a module, so DistributedDataParallel can wrap it: ``cfg.loss``
    through the certifying module of the current method, or plain cross-entropy while
    ``lam == 0`` (warm-up). ``certs`` maps each method the run trains with to its certifying
    module (all share the model's parameters)."""

    def __init__(self, certs: dict, kind: str = "bcp", **options):
        super().__init__()
        self.certs = nn.ModuleDict(certs)
        self.kind, self.options = kind, options  # hinge_margin, slack, temperature (bcpc.losses)
        self.model = next(iter(certs.values())).model

    def forward(self, x, y, eps: float, lam: float, method: str):
        if lam == 0.0:
            return F.cross_entropy(self.model(x), y)
        return self.certs[method].loss(x, y, eps, lam, kind=self.kind, **self.options)


def loss_options(cfg) -> dict:
    """The keyword options of :func:`bcpc.losses.certified_loss` a config sets."""
    return dict(hinge_margin=cfg.hinge_margin, slack=cfg.cll_slack, temperature=cfg.loss_temperature)


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def sum(self, values: list) -> list:
        """All-reduce a list of numbers (sum over ranks)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed() -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1): nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend)
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


def build(cfg: TrainConfig, example: torch.Tensor, method: Optional[str] = None):
    """Model (seeded init) and its certifying module for ``method`` (default: the evaluation
    certificate, ``cfg.eval_method``)."""
    torch.manual_seed(cfg.seed)
    model = ARCHITECTURES[cfg.model]()
    if cfg.init == "orthogonal":
        orthogonal_init(model)
    return model, compile_for(cfg, model, example, method or cfg.eval_method)


def orthogonal_init(model: nn.Module) -> None:
    """Every convolution and linear weight orthogonal (flattened to ``(out, in * kernel)``), every
    bias zero: Keras' ``orthogonal`` initializer, which GloRo's Lipschitz nets start from. Each
    layer then starts with spectral norm 1 on its flattened weight, so the product of the layer
    bounds starts near 1 instead of shrinking or growing with depth."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def compile_for(cfg: TrainConfig, model: nn.Module, example: torch.Tensor, method: str):
    """A certifying module of ``model`` with ``method`` and the run's norm, domain and iterations."""
    return bcpc.compile(model, cfg.norm, example_input=example[:1],
                        input_domain=tuple(cfg.input_domain) if cfg.input_domain else None,
                        method=method, lipschitz_iters=cfg.lipschitz_iters)


def training_certs(cfg: TrainConfig, model: nn.Module, eval_cert, example: torch.Tensor) -> dict:
    """One certifying module per method the training loss uses (the evaluation one reused), with
    the Lipschitz caches (power-iteration vectors) of all of them tied to the first's buffers, so
    a late method switch continues the same iteration and the checkpoint holds one state."""
    methods = [cfg.method] + ([cfg.late_method] if cfg.late_method not in (None, cfg.method) else [])
    certs = {m: eval_cert if m == cfg.eval_method else compile_for(cfg, model, example, m) for m in methods}
    first = certs[cfg.method].propagation.lip
    for m in methods[1:]:
        for name, module in certs[m].propagation.lip.named_children():
            if hasattr(first, name):  # ibp has no ball, so no caches of its own
                module.u = getattr(first, name).u
                module._warm = True  # the vector is warmed (and checkpointed) by the first method's caches
    return certs


def load_lip_state(cert, state: dict) -> None:
    """The Lipschitz caches of a checkpoint into ``cert`` (its keys; a cache the checkpoint's
    training method did not have, e.g. after ibp, keeps its fresh vector)."""
    own = cert.propagation.lip.state_dict()
    own.update({k: v for k, v in state.items() if k in own})
    cert.propagation.lip.load_state_dict(own)


@torch.no_grad()
def accuracy(cert, x: torch.Tensor, y: torch.Tensor, eps: Optional[float], batch: int = 500,
             ctx: Optional[Dist] = None) -> dict:
    """Clean accuracy and (if eps is given) sound verified accuracy; sharded over ranks and summed."""
    ctx = ctx or Dist()
    model = cert.model
    was_training = model.training
    model.eval()
    clean = verified = 0
    shard = range(ctx.rank * batch, len(x), batch * ctx.world)
    device = next(model.parameters()).device
    for i in shard:
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        clean += (model(xb).argmax(1) == yb).sum().item()
        if eps is not None:
            verified += cert.certify(xb, yb, eps).sum().item()
    model.train(was_training)
    clean, verified = ctx.sum([clean, verified])
    n = max(1, len(x))
    out = {"clean_acc": clean / n}
    if eps is not None:
        out["verified_acc"] = verified / n
    return out


@dataclass
class FitResult:
    run_dir: Path
    step: int
    epochs_done: int
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0  # wall time of the whole run, over all its sessions (resumes included)


def _state(cfg, model, lip_owner, opt, step, epoch, best, history, elapsed_s: float = 0.0,
           lr_scale: float = 1.0) -> dict:
    return {
        "lr_scale": lr_scale,  # halved by each collapse rollback (collapse_rollback)
        "elapsed_s": elapsed_s,  # wall time of the run so far, over all its sessions
        "format": FORMAT,
        "model_state": model.state_dict(),
        "lip_state": lip_owner.propagation.lip.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "epoch": epoch,
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "best": best,
        "history": history,
        "rng": torch.get_rng_state(),
    }


def check_compatible(ckpt: dict, cfg: TrainConfig, source: str) -> None:
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a bcpc training checkpoint (format {ckpt.get('format')!r})")
    if ckpt.get("fingerprint") != cfg.fingerprint():
        old = ckpt.get("config", {})
        diff = [f"{k}: checkpoint {old.get(k)!r} vs config {v!r}" for k, v in cfg.to_dict().items()
                if k in old and old.get(k) != v and k not in ("name", "out_dir", "data_root", "val_subset",
                                                                "checkpoint_every", "threads", "eps_eval", "val_every",
                                                                "eval_method")]
        raise CheckpointError(f"{source} was written by a different run configuration: {'; '.join(diff) or 'unknown'}."
                              " Resume with the config it was trained with, or start a new run (another name)")
    # collapse_rollback acts only at a collapse: a run may take it up (or change it) later, from a checkpoint
    # whose history has no validation it would have acted on, as if it had been set from the start
    if cfg.collapse_rollback is not None:
        for i, row in enumerate(ckpt.get("history", [])):
            if not row.get("rolled_back") and _collapsed(row, ckpt["history"][:i], cfg.collapse_rollback):
                raise CheckpointError(
                    f"{source}: collapse_rollback {cfg.collapse_rollback} would have acted on the validation of "
                    f"epoch {row['epoch']} (clean accuracy {row['val_clean_acc']:.3f}), which this run went past: "
                    "resume from a checkpoint written before it, or start a new run")


def _collapsed(row: dict, before: list, fraction: Optional[float]) -> bool:
    """A validation whose clean accuracy fell below ``fraction`` of the best before it (the model
    collapsed to a constant answer: 10.7% on MNIST, every input in one class)."""
    healthy = [r["val_clean_acc"] for r in before if not r.get("rolled_back")]
    return bool(fraction) and bool(healthy) and row["val_clean_acc"] < fraction * max(healthy)


#: collapse rollbacks (collapse_rollback) after which training stops with an error
MAX_ROLLBACKS = 4


#: consecutive non-finite steps (each skipped) after which training stops with an error
MAX_BAD_STEPS = 20


class _Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, ``kill``) stop training as KeyboardInterrupt, but
    never inside a checkpoint write: a signal arriving there is held until the write is done (an
    exception raised inside ``torch.save`` can surface as a zip-writer error instead of the
    interrupt). Installed from the main thread only; elsewhere a no-op."""

    def __init__(self):
        self.deferring = False
        self.pending = False
        self.previous = {}

    def _handle(self, signum, frame):
        if self.deferring:
            self.pending = True
            return
        raise KeyboardInterrupt

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    @contextlib.contextmanager
    def deferred(self, reraise: bool = True):
        """Hold signals during the block; raise the held one after it (or drop it: ``reraise=False``,
        for the final write after an interrupt)."""
        self.deferring, self.pending = True, False
        try:
            yield
        finally:
            self.deferring = False
        if self.pending and reraise:
            self.pending = False
            raise KeyboardInterrupt


def _init_weights(cfg: TrainConfig, model, cert, device) -> None:
    """Fine-tuning: the weights and Lipschitz cache of another run's checkpoint (same architecture)."""
    cfg.init_sha256()  # a clear error if the file is missing
    ckpt = checkpoint.load(cfg.init_from, map_location=device)
    source = ckpt.get("config", {}).get("model")
    if source != cfg.model:
        raise ConfigError(f"init_from: {cfg.init_from} holds a {source!r} model, this run trains {cfg.model!r}")
    checkpoint.load_model_state(model, ckpt["model_state"], str(cfg.init_from))
    load_lip_state(cert, ckpt["lip_state"])


def fit(cfg: TrainConfig, resume: bool = False, progress: bool = True, max_steps: Optional[int] = None,
        log=print, resume_hint: str = "resume with --resume") -> FitResult:
    """Train per ``cfg``; ``max_steps`` stops early (after checkpointing) — for tests and time slicing.
    ``resume_hint`` is what an interrupted run tells the user about continuing it.

    Under ``torchrun`` (WORLD_SIZE > 1) this is data-parallel: DistributedDataParallel all-reduces
    the gradients and broadcasts buffers (the Lipschitz cache's power-iteration vectors, BatchNorm
    statistics) from rank 0 before every forward, each rank takes ``batch_size / world`` samples of
    every global batch, the eps/lam schedule follows the global step, validation is sharded and
    summed, and only rank 0 writes checkpoints (which any number of processes can resume).
    """
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = init_distributed()
    if cfg.batch_size % ctx.world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {ctx.world} processes")
    local_bs = cfg.batch_size // ctx.world
    if not ctx.main:
        progress, log = False, (lambda *a, **k: None)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if ctx.main:  # the one writer of this folder: leftovers of a killed write are garbage
        checkpoint.remove_stale_temporaries(run_dir)
    x_train, y_train = data.load(cfg.dataset, cfg.data_root, "train")
    if cfg.train_subset:
        x_train, y_train = x_train[:cfg.train_subset], y_train[:cfg.train_subset]
    x_val, y_val = data.load(cfg.dataset, cfg.data_root, "val")
    if cfg.val_subset:
        x_val, y_val = x_val[:cfg.val_subset], y_val[:cfg.val_subset]
    model, cert = build(cfg, x_train)  # cert: the sound evaluation certificate (cfg.eval_method)
    certs = training_certs(cfg, model, cert, x_train)
    lip_owner = certs[cfg.method]  # its Lipschitz caches are the ones checkpointed
    for c in certs.values():
        c.to(ctx.device)
    cert.to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    spe = len(x_train) // cfg.batch_size
    if spe == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set ({len(x_train)})")
    step, best, history, lr_scale = 0, {}, [], 1.0
    last, good = run_dir / "last.pt", run_dir / "good.pt"

    def restore(ckpt):
        checkpoint.load_model_state(model, ckpt["model_state"], str(last))
        lip_owner.propagation.lip.load_state_dict(ckpt["lip_state"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"].cpu())
        return (int(ckpt["step"]), dict(ckpt["best"]), list(ckpt["history"]),
                float(ckpt.get("lr_scale", 1.0)))

    if resume and last.exists():
        ckpt = checkpoint.load(last, map_location=ctx.device)
        check_compatible(ckpt, cfg, str(last))
        step, best, history, lr_scale = restore(ckpt)
        # the log's elapsed_s counts the whole run's wall time, across resumes (older checkpoints
        # carry no total: their last validation's figure, which misses the time after it)
        t0 -= float(ckpt.get("elapsed_s", history[-1]["elapsed_s"] if history else 0.0))
        log(f"resumed {last} at step {step} (epoch {step / spe:.2f}) with {ctx.world} process(es)")
    elif not resume and last.exists():
        raise CheckpointError(f"{last} exists: pass --resume to continue that run, or choose another run name")
    elif cfg.init_from is not None:
        _init_weights(cfg, model, lip_owner, ctx.device)
        log(f"initialised from {cfg.init_from} (sha256 {cfg.init_sha256()[:16]}...)")
    if ctx.main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    objective = CertifiedLoss(certs, cfg.loss, **loss_options(cfg))
    if ctx.world > 1:
        objective = DistributedDataParallel(objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                            else None, broadcast_buffers=True)
    total = cfg.epochs * spe
    stop_at = total if max_steps is None else min(total, max_steps)
    log_path = run_dir / "log.jsonl"
    interrupted = False
    skipped = bad_steps = 0

    interrupts = _Interrupts()

    def save_last(epoch, reraise=True):
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteTrainingError(f"the weights are no longer finite at step {step}; {last} is left as it "
                                         "was (finite), not overwritten")
        if ctx.main:
            with interrupts.deferred(reraise):
                checkpoint.save(_state(cfg, model, lip_owner, opt, step, epoch, best, history,
                                       round(time.time() - t0, 1), lr_scale), last)

    def _roll_back(row):
        """Back to ``good.pt`` with the learning rate halved; the collapsed validation is logged and
        kept in the history (marked), so that the log says what happened."""
        if not good.exists():
            raise NonFiniteTrainingError(f"training collapsed at epoch {row['epoch']} (clean accuracy "
                                         f"{row['val_clean_acc']:.3f}) and {good} is missing: lower lr")
        ckpt = checkpoint.load(good, map_location=ctx.device)
        restored = restore(ckpt)
        rolled = sum(1 for r in restored[2] if r.get("rolled_back")) + 1
        if rolled > MAX_ROLLBACKS:
            raise NonFiniteTrainingError(f"training collapsed {rolled} times (the last at epoch {row['epoch']}, "
                                         f"clean accuracy {row['val_clean_acc']:.3f}); lower lr or the training eps")
        row = dict(row, rolled_back=True, lr_scale=restored[3] * 0.5)
        if ctx.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        log(f"epoch {row['epoch']}: clean accuracy {row['val_clean_acc']:.4f} is below {cfg.collapse_rollback} of the "
            f"best so far (a collapse): back to step {restored[0]} ({good}) with the learning rate x{row['lr_scale']:g}")
        return restored[0], restored[1], restored[2] + [row], row["lr_scale"]

    bar = tqdm(total=total, initial=step, disable=not progress, desc=cfg.name, unit="step", dynamic_ncols=True)
    model.train()
    for c in certs.values():
        c.train()
    interrupts.install()
    val_note = {}  # the last validation figures, shown on the bar
    try:
        while step < stop_at:
            epoch = step // spe
            order = epoch_order(cfg, epoch, len(x_train), ctx.rank, ctx.world)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch) * lr_scale
            method = method_at(cfg, epoch)
            run_loss, run_n = 0.0, 0
            while step < stop_at and step // spe == epoch:
                b = step % spe
                idx = order[b * local_bs:(b + 1) * local_bs]
                xb, yb = x_train[idx].to(ctx.device), y_train[idx].to(ctx.device)
                eps, lam = schedule(cfg, step, spe)
                with step_precision(cfg.precision, ctx.device):
                    loss = objective(xb, yb, eps, lam, method)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # the gradient norm (clipped to grad_clip if set) decides, on every rank alike (the
                # gradients are all-reduced), whether the step is taken: one NaN/Inf gradient would
                # poison Adam's moments and every weight after it. One scalar sync per step.
                if cfg.grad_clip:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:  # the norm alone: no rescaling pass over the gradients
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)):
                    opt.step()
                    bad_steps = 0
                else:
                    skipped += 1
                    bad_steps += 1
                    log(f"step {step}: non-finite loss or gradient (loss {float(loss.detach()):.4g}, gradient norm "
                        f"{float(grad_norm):.4g}); step skipped ({skipped} so far)")
                    if bad_steps >= MAX_BAD_STEPS:
                        raise NonFiniteTrainingError(
                            f"{bad_steps} steps in a row gave a non-finite loss or gradient (steps "
                            f"{step - bad_steps + 1}-{step}); stopped without writing them. The last "
                            f"checkpoint {last} holds finite weights: lower lr, set grad_clip, or resume")
                    loss = loss.detach().nan_to_num(0.0, 0.0, 0.0)
                step += 1
                run_loss += loss.detach()  # a tensor: no device synchronisation per step
                run_n += 1
                bar.update(1)
                if step % 20 == 0 and progress:
                    bar.set_postfix(loss=f"{float(run_loss) / run_n:.3f}", eps=f"{eps:.3f}", lam=f"{lam:.2f}",
                                    **val_note)
                if step % cfg.checkpoint_every == 0:
                    save_last(epoch)
            finished = step // spe > epoch or step == total
            if finished and ((epoch + 1) % cfg.val_every == 0 or step == total):  # validate, checkpoint
                metrics = accuracy(cert, x_val, y_val, cfg.target_eps_eval, ctx=ctx)
                (mean_loss,) = ctx.sum([float(run_loss) / max(1, run_n) / ctx.world])
                eps, lam = schedule(cfg, step - 1, spe)
                row = {"epoch": epoch + 1, "step": step, "loss": mean_loss, "eps": eps, "lam": lam,
                       "val_clean_acc": metrics["clean_acc"], "val_verified_acc": metrics["verified_acc"],
                       "skipped_steps": skipped,
                       "elapsed_s": round(time.time() - t0, 1)}
                if _collapsed(row, history, cfg.collapse_rollback):
                    step, best, history, lr_scale = _roll_back(row)
                    bar.n = step
                    bar.refresh()
                    continue
                history.append(row)
                val_note = {"val": f"{100 * row['val_clean_acc']:.1f}/{100 * row['val_verified_acc']:.1f}%"}
                key = (row["val_verified_acc"], row["val_clean_acc"])
                improved = not best or key > (best["val_verified_acc"], best["val_clean_acc"])
                if improved:
                    best = dict(row)
                if ctx.main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if improved:
                        with interrupts.deferred():
                            checkpoint.save({"format": FORMAT, "model_state": model.state_dict(),
                                             "lip_state": lip_owner.propagation.lip.state_dict(),
                                             "config": cfg.to_dict(), "fingerprint": cfg.fingerprint(),
                                             "metrics": row}, run_dir / "best.pt")
                log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} eps {eps:.3f} lam {lam:.2f} | "
                    f"val clean {row['val_clean_acc']:.4f} verified@{cfg.target_eps_eval} {row['val_verified_acc']:.4f}")
                save_last(epoch + 1)
                if cfg.collapse_rollback and ctx.main:  # the healthy state a collapse goes back to
                    with interrupts.deferred():
                        checkpoint.save(_state(cfg, model, lip_owner, opt, step, epoch + 1, best, history,
                                               round(time.time() - t0, 1), lr_scale), good)
            else:
                save_last(epoch)
    except KeyboardInterrupt:
        interrupted = True
        save_last(step // spe, reraise=False)  # a second Ctrl-C must not cut this last write short
        log(f"interrupted: checkpoint written to {last} at step {step}; {resume_hint}")
    finally:
        bar.close()
        interrupts.restore()
        ctx.close()
    return FitResult(run_dir=run_dir, step=step, epochs_done=step // spe, best=best, history=history,
                     interrupted=interrupted, seconds=time.time() - t0)


def load_trained(path, map_location="cpu"):
    """``(model, cert, cfg, ckpt)`` from a ``best.pt`` / ``last.pt`` checkpoint."""
    from bcpc.config import from_dict

    ckpt = checkpoint.load(path, map_location)
    if ckpt.get("format") != FORMAT or "model_state" not in ckpt:
        raise CheckpointError(f"{path} is not a bcpc checkpoint")
    cfg = from_dict(ckpt["config"], f"{path} (embedded config)")
    shape = {"mnist": (1, 1, 28, 28), "cifar10": (1, 3, 32, 32)}[cfg.dataset]
    model, cert = build(cfg, torch.zeros(shape))
    checkpoint.load_model_state(model, ckpt["model_state"], str(path))
    load_lip_state(cert, ckpt["lip_state"])
    model.eval()
    return model, cert, cfg, ckpt

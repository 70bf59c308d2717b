"""Training configuration: a typed dataclass loaded from YAML (safe load, unknown keys rejected)."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from bcpc.errors import ConfigError
from bcpc.losses import LOSSES


@dataclass
class TrainConfig:
    """Every hyper-parameter of a certified training run (paper Algorithm 1)."""

    name: str = "run"  # the run's folder name under out_dir
    model: str = "mnist_4c3f"  # a key of bcpc.models.ARCHITECTURES
    dataset: str = "mnist"  # mnist | cifar10
    data_root: str = "data"  # where the dataset is cached (MNIST is fetched there once)
    out_dir: str = "runs"  # the run writes to <out_dir>/<name>/
    norm: str = "l2"  # the perturbation norm: l2 | linf | l1 | a number p
    method: str = "bcp"  # bcp | ibp | lipschitz
    eps: float = 1.58  # target training radius
    eps_eval: Optional[float] = None  # radius for validation/evaluation (default: eps)
    input_domain: Optional[list] = field(default_factory=lambda: [0.0, 1.0])  # [low, high] of valid inputs, or null
    epochs: int = 60  # training epochs
    warmup_epochs: float = 1.0  # plain training (eps = 0, lam = 0)
    ramp_epochs: float = 20.0  # eps 0 -> eps and lam 0 -> 1, linearly
    batch_size: int = 50  # images per step (over all processes under torchrun)
    lr: float = 3e-4  # Adam learning rate
    lr_decay_epochs: list = field(default_factory=list)  # step: the (0-indexed) epochs from which lr is multiplied by lr_decay_factor
    lr_decay_factor: float = 0.1  # step: the factor of each decay
    weight_decay: float = 0.0  # Adam weight decay
    grad_clip: Optional[float] = None  # clip the gradient norm to this (null: no clipping)
    collapse_rollback: Optional[float] = None  # a validation whose clean accuracy falls below this fraction of the best so far (a collapse: one class for every input) takes the run back to the last healthy validation's checkpoint with the learning rate halved for the rest of the run (null: off)
    lipschitz_iters: int = 1  # power-iteration steps per training step (Lipschitz cache)
    seed: int = 0  # initialisation and data order
    train_subset: Optional[int] = None  # use the first N training images (demo / tests)
    val_subset: Optional[int] = 1000  # validation images certified after each epoch
    val_every: int = 1  # validate (and update best.pt) every this many epochs, and after the last
    checkpoint_every: int = 500  # steps between checkpoints (plus one at every epoch end)
    threads: Optional[int] = None  # torch.set_num_threads
    init: str = "default"  # default (PyTorch's layer init) | orthogonal (every conv/linear weight orthogonal, biases 0; GloRo's)
    init_from: Optional[str] = None  # start from this checkpoint's weights (fine-tuning); optimizer and schedule start fresh
    # --- the recipe beyond the paper (defaults: the paper's) ---
    loss: str = "bcp"  # bcp (eq. 13) | trades (CE + lam KL) | gloro (CE + lam KL with a bottom class, GloRo's exact form) | emma (eq. 13 with each class translated at most to a tie, EMMA's) | hinge (BCOP) | cll (CE over the certified radii, calibrated by cll_slack; Losch et al.'s CLL)
    lam: float = 1.0  # the final lam (trades: the KL weight, may exceed 1)
    lam_schedule: str = "ramp"  # ramp (0 -> lam with the eps ramp) | constant (lam from the first certified step)
    eps_schedule: str = "linear"  # linear | log (geometric, from eps_start * eps to eps) | gloro (GloRo's "log": log of a linear ramp of exp(eps); fast at first)
    eps_start: float = 0.01  # log and gloro ramps: the first certified step's eps, as a fraction of eps
    hinge_margin: float = 1.0  # hinge: the margin kappa each certified margin is pushed above
    loss_temperature: float = 1.0  # every loss: the logits and margins are scaled by this before the loss (as if the last layer were scaled by it)
    cll_slack: float = 0.1  # cll: the slack p in (0, 1); the calibrated logistic rises from p/2 at radius 0 to 1 - p/2 at twice the training eps
    lr_schedule: str = "step"  # step (x lr_decay_factor at lr_decay_epochs) | exp (geometric lr -> lr_final)
    lr_final: float = 1e-6  # exp: the learning rate of the last epoch
    lr_decay_start: Optional[float] = None  # exp: the epoch the decay starts (default: half of epochs)
    eval_method: str = "bcp"  # the sound certificate of validation, best.pt selection and evaluation
    late_method: Optional[str] = None  # switch the training bound to this method ...
    late_method_epoch: Optional[int] = None  # ... from this (0-indexed) epoch on
    precision: str = "float32"  # float32 | bfloat16: the training step's convolutions in bfloat16 under torch.autocast, linear layers and matrix products in float32 (weights stay float32; validation and certificates are float64 and sound either way)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def target_eps_eval(self) -> float:
        return self.eps if self.eps_eval is None else self.eps_eval

    def init_sha256(self) -> str:
        """SHA-256 of the ``init_from`` checkpoint (ConfigError if it is missing)."""
        path = Path(self.init_from)
        if not path.is_file():
            raise ConfigError(f"init_from: checkpoint {path} does not exist (train the run it comes from first, "
                              "or point init_from at another bcpc checkpoint)")
        return _file_sha256(path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the settings that define the trained function (not paths or logging)."""
        keys = ("model", "dataset", "norm", "method", "eps", "input_domain", "epochs", "warmup_epochs",
                "ramp_epochs", "batch_size", "lr", "lr_decay_epochs", "lr_decay_factor", "weight_decay",
                "grad_clip", "lipschitz_iters", "seed", "train_subset")
        values = {k: getattr(self, k) for k in keys}
        defaults = TrainConfig()
        for k in RECIPE_KEYS:  # only where set: fingerprints of runs older than these keys stay valid
            if getattr(self, k) != getattr(defaults, k):
                values[k] = getattr(self, k)
        if self.init_from is not None:  # the starting weights are part of the trained function
            values["init_from_sha256"] = self.init_sha256()
        blob = json.dumps(values, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: settings added after the paper's recipe (they enter the fingerprint only when not at the default)
RECIPE_KEYS = ("init", "loss", "lam", "lam_schedule", "eps_schedule", "eps_start", "hinge_margin", "cll_slack",
               "loss_temperature", "lr_schedule", "lr_final", "lr_decay_start", "late_method", "late_method_epoch", "precision")

#: the choices of the string-valued settings
CHOICES = {"init": ("default", "orthogonal"), "loss": LOSSES, "lam_schedule": ("ramp", "constant"),
           "eps_schedule": ("linear", "log", "gloro"), "lr_schedule": ("step", "exp"),
           "precision": ("float32", "bfloat16")}

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def keys_table() -> str:
    """Every config key with its type, default and the comment it has in :class:`TrainConfig`
    (Markdown; docs/training.md is generated from it)."""
    import inspect

    source = inspect.getsource(TrainConfig)
    comments = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.*)$", source, re.M))
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(args) == 1:
            kind = f"{getattr(args[0], '__name__', args[0])} or null"
        else:
            kind = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        text = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | {kind} | `{getattr(defaults, f.name)!r}` | {text} |")
    return "\n".join(rows) + "\n"


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """Cached per (path, size, mtime): fingerprint() runs at every checkpoint write."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_type(name: str, value, hint) -> object:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = [a for a in args if a is not type(None)][0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; every user writes it
    if hint in (float, int, str, bool):
        if isinstance(value, bool) and hint is not bool:
            raise ConfigError(f"config key {name!r} must be {hint.__name__}, got a boolean")
        if not isinstance(value, hint):
            raise ConfigError(f"config key {name!r} must be {hint.__name__}, got {type(value).__name__} ({value!r})")
        return value
    if hint is list or typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {name!r} must be a list, got {type(value).__name__}")
        return value
    return value


def from_dict(data: dict, source: str = "config") -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level")
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        hints_ = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hints_.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints_)}; valid keys: {', '.join(sorted(known))}")
    values = {k: _check_type(k, v, hints[k]) for k, v in data.items()}
    cfg = TrainConfig(**values)
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    from bcpc.models import ARCHITECTURES
    from bcpc.passes.lower import METHODS

    if cfg.model not in ARCHITECTURES:
        raise ConfigError(f"{source}: unknown model {cfg.model!r}; available: {', '.join(ARCHITECTURES)}")
    for key in ("method", "eval_method", "late_method"):
        value = getattr(cfg, key)
        if value is not None and value not in METHODS:
            raise ConfigError(f"{source}: unknown {key} {value!r}; choose one of {', '.join(METHODS)}")
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{source}: unknown {key} {getattr(cfg, key)!r}; choose one of {', '.join(choices)}")
    if (cfg.late_method is None) != (cfg.late_method_epoch is None):
        raise ConfigError(f"{source}: late_method and late_method_epoch go together (set both or neither)")
    if cfg.late_method_epoch is not None and cfg.late_method_epoch < 1:
        raise ConfigError(f"{source}: late_method_epoch must be >= 1 (to train with one method throughout, set method)")
    if not 0 < cfg.eps_start <= 1:
        raise ConfigError(f"{source}: eps_start must be in (0, 1] (a fraction of eps), got {cfg.eps_start}")
    if not 0 < cfg.loss_temperature < math.inf:
        raise ConfigError(f"{source}: loss_temperature must be positive and finite, got {cfg.loss_temperature}")
    if not 0 < cfg.cll_slack < 1:
        raise ConfigError(f"{source}: cll_slack must be in (0, 1), got {cfg.cll_slack}")
    if cfg.collapse_rollback is not None and not 0 < cfg.collapse_rollback < 1:
        raise ConfigError(f"{source}: collapse_rollback must be in (0, 1) (a fraction of the best clean accuracy) or "
                          f"null, got {cfg.collapse_rollback}")
    if cfg.lr_schedule == "exp" and not 0 < cfg.lr_final <= cfg.lr:
        raise ConfigError(f"{source}: lr_final must be in (0, lr] for lr_schedule exp, got {cfg.lr_final}")
    for key in ("epochs", "batch_size", "checkpoint_every", "lipschitz_iters", "val_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: {key} must be >= 1")
    for key in ("eps", "lr", "warmup_epochs", "ramp_epochs", "weight_decay", "lam", "hinge_margin"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{source}: {key} must be >= 0")
    if cfg.input_domain is not None and len(cfg.input_domain) != 2:
        raise ConfigError(f"{source}: input_domain must be [low, high] or null")


def load(path) -> TrainConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return from_dict(data, str(path))

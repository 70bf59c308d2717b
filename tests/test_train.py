"""Training: schedule, config validation, data loading, checkpoints, resume equivalence, PGD."""
import argparse
import gzip
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from bcpc import checkpoint, config, data
from bcpc.errors import CheckpointError, ConfigError, DatasetError
from bcpc.testing import margin_of, pgd_ce_last, pgd_margin
from bcpc.train import fit, load_trained, schedule
from tests.fixtures import tiny_mnist


def test_schedule_warmup_then_linear_ramp_then_constant():
    cfg = config.TrainConfig(eps=2.0, warmup_epochs=1, ramp_epochs=2)
    spe = 10
    assert schedule(cfg, 0, spe) == (0.0, 0.0)
    assert schedule(cfg, 9, spe) == (0.0, 0.0)
    assert schedule(cfg, 10, spe) == (0.0, 0.0)
    assert schedule(cfg, 20, spe) == pytest.approx((1.0, 0.5))
    assert schedule(cfg, 30, spe) == pytest.approx((2.0, 1.0))
    assert schedule(cfg, 500, spe) == pytest.approx((2.0, 1.0))
    eps = [schedule(cfg, s, spe)[0] for s in range(40)]
    assert eps == sorted(eps)  # nondecreasing


def test_config_rejects_unknown_and_ill_typed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: mnist_small\nepocs: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*epocs"):
        config.load(p)
    p.write_text("model: mnist_small\nepochs: three\n")
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        config.load(p)
    p.write_text("model: nope\n")
    with pytest.raises(ConfigError, match="unknown model"):
        config.load(p)
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)
    p.write_text("model: mnist_small\nlr: 1\n")
    assert config.load(p).lr == 1.0  # ints are accepted where floats are expected


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")):
        config.load(path)


def test_idx_loader_and_val_split(tmp_path):
    root = tiny_mnist(tmp_path / "d")
    x, y = data.mnist(root, "train")
    xv, yv = data.mnist(root, "val")
    xt, yt = data.mnist(root, "test")
    assert x.shape == (500, 1, 28, 28) and xv.shape == (100, 1, 28, 28) and xt.shape == (100, 1, 28, 28)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    assert (root / "mnist.npz").exists()  # cached


def test_missing_dataset_and_bad_hash_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        data.cifar10(tmp_path, "train")
    fake = gzip.compress(pickle.dumps(((np.zeros((1, 784)), np.zeros(1)),) * 3))
    with pytest.raises(DatasetError, match="SHA-256"):
        data.mnist_from_pickle_bytes(fake)


def test_array_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.load_array_pickle(pickle.dumps(Evil()))


def small_cfg(tmp_path, **kw):
    base = dict(name="t", model="mnist_small", out_dir=str(tmp_path / "runs"), data_root=str(tmp_path / "d"),
                epochs=2, warmup_epochs=0.5, ramp_epochs=1, batch_size=50, lr=1e-3, val_subset=50,
                checkpoint_every=3, eps=0.5)
    base.update(kw)
    return config.from_dict(base)


def test_resume_equivalence(tmp_path):
    """An interrupted and resumed run ends with exactly the parameters of an uninterrupted one."""
    tiny_mnist(tmp_path / "d")
    full = fit(small_cfg(tmp_path, name="full"), progress=False, log=lambda *_: None)
    part = small_cfg(tmp_path, name="part")
    first = fit(part, progress=False, max_steps=7, log=lambda *_: None)  # stops mid-epoch
    assert first.step == 7
    with pytest.raises(CheckpointError, match="--resume"):
        fit(part, progress=False, log=lambda *_: None)
    state = checkpoint.load(first.run_dir / "last.pt")
    assert 0 < state["elapsed_s"] <= first.seconds + 1
    state["elapsed_s"] = 1000.0  # as if the first session had trained for 1000 s
    checkpoint.save(state, first.run_dir / "last.pt")
    second = fit(part, resume=True, progress=False, log=lambda *_: None)
    assert second.step == full.step == 20
    # wall time counts the whole run: the resumed session adds to the first one's
    assert second.seconds > 1000 and all(row["elapsed_s"] > 1000 for row in second.history)
    a = checkpoint.load(full.run_dir / "last.pt")["model_state"]
    b = checkpoint.load(second.run_dir / "last.pt")["model_state"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    again = fit(part, resume=True, progress=False, log=lambda *_: None)  # resuming a finished run is harmless
    assert again.step == 20
    assert len(again.history) == 2


def test_resume_refuses_another_config(tmp_path):
    tiny_mnist(tmp_path / "d")
    fit(small_cfg(tmp_path), progress=False, max_steps=3, log=lambda *_: None)
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.001 vs config 0.01"):
        fit(small_cfg(tmp_path, lr=1e-2), resume=True, progress=False, log=lambda *_: None)


def test_a_collapse_rolls_back_to_the_last_healthy_validation_with_half_the_learning_rate(tmp_path, monkeypatch):
    """collapse_rollback: a validation whose clean accuracy falls below the fraction of the best so far
    (the sixth long run of issue 15 collapsed to one class at epoch 100 of 400) takes the run back to
    the previous validation's state, halves the learning rate, logs the collapsed row, and goes on."""
    import json

    import bcpc.train as train

    tiny_mnist(tmp_path / "d")
    seen = []

    def fake_accuracy(cert, x, y, eps, ctx=None):  # the third validation collapses, once
        seen.append(1)
        clean = 0.1 if len(seen) == 3 else 0.9
        return {"clean_acc": clean, "verified_acc": clean / 2}

    monkeypatch.setattr(train, "accuracy", fake_accuracy)
    cfg = small_cfg(tmp_path, epochs=4, val_every=1, collapse_rollback=0.5)
    res = fit(cfg, progress=False, log=lambda *_: None)
    assert res.step == 4 * 10 and len(seen) == 5  # epochs 1, 2, 3 (collapsed), 3 again, 4
    rows = [json.loads(line) for line in (res.run_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r.get("rolled_back", False)) for r in rows] == [(1, False), (2, False), (3, True), (3, False),
                                                                        (4, False)]
    assert rows[2]["lr_scale"] == 0.5
    state = checkpoint.load(res.run_dir / "last.pt")
    assert state["lr_scale"] == 0.5 and state["history"][2]["rolled_back"]
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.5 * train.lr_at(cfg, 3))
    # a run that went past a collapse without the rollback cannot take it up later
    plain = small_cfg(tmp_path, name="plain", epochs=4, val_every=1)
    seen.clear()
    fit(plain, progress=False, log=lambda *_: None)
    later = small_cfg(tmp_path, name="plain", epochs=4, val_every=1, collapse_rollback=0.5)
    with pytest.raises(CheckpointError, match="would have acted on the validation of epoch 3"):
        fit(later, resume=True, progress=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match="collapse_rollback must be in"):
        small_cfg(tmp_path, collapse_rollback=1.5)


def test_init_from_fine_tunes_another_runs_weights(tmp_path):
    """init_from starts from another run's weights (and Lipschitz cache) with a fresh optimizer and
    schedule; the file's hash is part of the fingerprint; a missing file or another architecture is
    a clear error."""
    tiny_mnist(tmp_path / "d")
    base = fit(small_cfg(tmp_path, name="base"), progress=False, log=lambda *_: None)
    source = base.run_dir / "last.pt"
    tune = small_cfg(tmp_path, name="tune", init_from=str(source), warmup_epochs=0, ramp_epochs=0, lr=1e-4)
    lines = []
    first = fit(tune, progress=False, max_steps=1, log=lines.append)
    assert any("initialised from" in ln for ln in lines)
    start = checkpoint.load(source)["model_state"]
    after = checkpoint.load(first.run_dir / "last.pt")["model_state"]
    moved = [k for k in start if not torch.equal(start[k], after[k])]
    assert moved and all((start[k] - after[k]).abs().max() < 1e-2 for k in start)  # one small step away
    fresh = fit(small_cfg(tmp_path, name="fresh", warmup_epochs=0, ramp_epochs=0, lr=1e-4), progress=False,
                max_steps=1, log=lambda *_: None)
    far = checkpoint.load(fresh.run_dir / "last.pt")["model_state"]
    assert any((far[k] - after[k]).abs().max() > 1e-2 for k in far)  # not the seeded initialisation
    assert tune.fingerprint() != small_cfg(tmp_path, name="tune", warmup_epochs=0, ramp_epochs=0,
                                           lr=1e-4).fingerprint()
    resumed = fit(tune, resume=True, progress=False, max_steps=2, log=lambda *_: None)
    assert resumed.step == 2
    with pytest.raises(ConfigError, match="does not exist"):
        fit(small_cfg(tmp_path, name="x", init_from=str(tmp_path / "nope.pt")), progress=False,
            log=lambda *_: None)
    with pytest.raises(ConfigError, match="holds a 'mnist_small' model, this run trains 'mnist_mlp'"):
        fit(small_cfg(tmp_path, name="y", model="mnist_mlp", init_from=str(source)), progress=False,
            log=lambda *_: None)


def test_checkpoint_errors(tmp_path):
    tiny_mnist(tmp_path / "d")
    res = fit(small_cfg(tmp_path), progress=False, log=lambda *_: None)
    best = res.run_dir / "best.pt"
    model, cert, cfg, ckpt = load_trained(best)
    assert cfg.model == "mnist_small" and not model.training
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        checkpoint.load(truncated)

    evil = tmp_path / "evil.pt"
    torch.save({"format": "bcpc-checkpoint-v1", "x": argparse.Namespace(code="anything")}, evil)
    with pytest.raises(CheckpointError, match="refuses to load code"):
        checkpoint.load(evil)
    wrong = nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="does not match the model"):
        checkpoint.load_model_state(wrong, ckpt["model_state"], "best.pt")


def test_atomic_save_never_leaves_partial_files(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"a": torch.zeros(3)}, path)
    checkpoint.save({"a": torch.ones(3)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_pgd_finds_adversarial_examples_on_an_undefended_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x = torch.rand(64, 10, dtype=torch.float64)
    y = model(x).argmax(1)
    adv = pgd_margin(model, x, y, 1.0, 2.0, steps=50)
    assert ((adv - x).flatten(1).norm(dim=1) <= 1.0 + 1e-9).all()
    flipped = (margin_of(model(adv), y) < 0).float().mean().item()
    assert flipped > 0.5


def test_paper_attack_stays_in_the_ball_and_domain_and_finds_adversarial_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x = torch.rand(64, 10, dtype=torch.float64)
    y = model(x).argmax(1)
    adv = pgd_ce_last(model, x, y, 1.0, steps=50, domain=(0.0, 1.0))
    assert ((adv - x).flatten(1).norm(dim=1) <= 1.0 + 1e-9).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    flipped = (model(adv).argmax(1) != y).float().mean().item()
    assert flipped > 0.3
    # the margin attack keeping its worst point is at least as strong on this model
    strong = pgd_margin(model, x, y, 1.0, 2.0, steps=50, step_size=0.25, domain=(0.0, 1.0), random_start=False)
    assert (margin_of(model(strong), y) < 0).float().mean().item() >= flipped


def test_cifar10_loader_reads_a_torchvision_style_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 1200) for i in range(1, 6)] + [("test_batch", 300)]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    x, y = data.cifar10(tmp_path, "train")
    xv, yv = data.cifar10(tmp_path, "val")
    xt, yt = data.cifar10(tmp_path, "test")
    assert x.shape == (1000, 3, 32, 32) and xv.shape == (5000, 3, 32, 32) and xt.shape == (300, 3, 32, 32)
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    labels = sum((pickle.loads((folder / f"data_batch_{i}").read_bytes())["labels"] for i in range(1, 6)), [])
    assert torch.equal(yv, torch.tensor(labels[-5000:]))  # the last 5,000 training images are the validation split
    assert torch.equal(y, torch.tensor(labels[:-5000]))

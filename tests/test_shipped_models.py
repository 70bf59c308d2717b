"""Every checkpoint shipped in models/ matches its SHA-256, loads, and certifies test images."""
import hashlib
from pathlib import Path

import pytest
import torch

from bcpc import data
from bcpc.train import load_trained

MODELS = Path(__file__).resolve().parents[1] / "models"
ENTRIES = [line.split() for line in (MODELS / "SHA256SUMS").read_text().splitlines() if line.strip()]


def test_every_shipped_checkpoint_is_listed():
    listed = {name for _, name in ENTRIES}
    assert {p.name for p in MODELS.glob("*.pt")} == listed and listed


@pytest.mark.parametrize("digest,name", ENTRIES, ids=[n for _, n in ENTRIES])
def test_shipped_checkpoint_loads_and_certifies(digest, name):
    path = MODELS / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    model, cert, cfg, _ = load_trained(path)
    x, y = data.load(cfg.dataset, "data", "test")
    x, y = x[:100], y[:100]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    ok = cert.certify(x, y, cfg.target_eps_eval)
    assert clean > 0.7
    assert 0.1 < ok.float().mean().item() <= clean  # a certified input is always classified correctly

"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked against the run.

A checkpoint is a plain dict of tensors and Python scalars/lists/dicts (no pickled code), written
to a temporary file in the same folder, flushed and fsync'ed, then renamed over the target: a run
killed at any moment leaves either the old or the new file, never half of one.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from bcpc.errors import CheckpointError


def save(obj: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder) -> list:
    """Delete the ``<name>.pt.*.tmp`` files a writer killed mid-write (SIGKILL, power loss) left in
    ``folder``; the checkpoints themselves are untouched. Call it only where no other process is
    writing checkpoints into ``folder``. Returns the removed paths."""
    removed = []
    for tmp in Path(folder).glob("*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def load(path, map_location="cpu") -> dict:
    """The dict a checkpoint file holds, loaded with ``weights_only=True`` (plain data only).

    Raises :class:`~bcpc.errors.CheckpointError` for a missing file, a folder, a file that is not
    a complete ``torch.save`` archive, pickled code, or a top level that is not a dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        example = path / ("best.pt" if "best.pt" in inside or not inside else inside[0])
        found = f" (it holds {', '.join(inside[:4])})" if inside else " (it holds no .pt file)"
        raise CheckpointError(f"checkpoint {path} is a directory{found}; pass the .pt file inside, e.g. {example}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index sits at the end
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (not a complete torch.save archive); "
                              "use an earlier checkpoint")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} contains pickled objects that are not plain data ({str(exc).splitlines()[0]}); "
            "bcpc refuses to load code from a checkpoint. Re-save it as a state_dict") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); use an earlier checkpoint") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} is not a bcpc checkpoint (top level is {type(obj).__name__})")
    return obj


def kind(obj: dict) -> str:
    """What a loaded checkpoint dict is: ``"bcpc"`` (written by ``bcpc train``: ``format`` and
    ``model_state``), ``"state_dict"`` (a plain ``model.state_dict()``: tensors only) or ``"other"``."""
    from bcpc.train import FORMAT

    if obj.get("format") == FORMAT and "model_state" in obj:
        return "bcpc"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict"
    return "other"


def load_bcpc(path, map_location="cpu") -> dict:
    """:func:`load`, then insist on a bcpc training checkpoint; a plain state_dict gets a message
    that says how to certify it anyway (``--model MODULE:FACTORY --weights FILE``)."""
    obj = load(path, map_location)
    what = kind(obj)
    if what == "state_dict":
        raise CheckpointError(
            f"{path} is a plain state_dict, not a bcpc checkpoint (no model, no config): pass the model that builds "
            f"it too, --model pkg.module:factory --weights {path}")
    if what == "other":
        keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
        raise CheckpointError(f"{path} is not a bcpc checkpoint (no 'format'/'model_state'; top-level keys: {keys}); "
                              "for a state_dict inside another dict, save that state_dict on its own and pass "
                              "--model pkg.module:factory --weights FILE")
    return obj


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict with a message naming the mismatch instead of torch's long dump."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise CheckpointError(f"checkpoint {source} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state)

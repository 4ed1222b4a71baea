"""Real data that needs no network: scikit-learn's digits, or MNIST from a local folder.

Both return float tensors shaped ``(N, 1, H, W)`` in [0, 1] and int64 labels,
split deterministically into train / validation / test.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import NamedTuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Splits", "digits", "mnist", "loaders"]


class Splits(NamedTuple):
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def digits(*, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Splits:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped in its wheel), split at random with ``seed``.

    >>> s = digits()
    >>> s.train[0].shape[1:], len(s.train[0]) + len(s.val[0]) + len(s.test[0])
    (torch.Size([1, 8, 8]), 1797)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a demo dependency
        raise ImportError("trainkit.data.digits needs scikit-learn: pip install 'trainkit[demo]'") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test, n_val = int(len(x) * test_fraction), int(len(x) * val_fraction)
    n_train = len(x) - n_val - n_test
    return Splits(
        (x[:n_train], y[:n_train]),
        (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        (x[n_train + n_val :], y[n_train + n_val :]),
    )


def _read_idx(path: Path) -> Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (the MNIST format).")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        for base in (root, root / "raw", root / "MNIST" / "raw"):
            if (base / name).is_file():
                return base / name
    raise FileNotFoundError(
        f"mnist: no {stem}[.gz] under {root} (looked in ., raw/, MNIST/raw/). Point --mnist at the folder "
        "holding the four IDX files (the layout torchvision.datasets.MNIST downloads)."
    )


def mnist(root: Union[str, os.PathLike], *, val_size: int = 5000, seed: int = 0) -> Splits:
    """MNIST from a local folder of the four IDX files (as torchvision downloads them); no network.

    The last ``val_size`` of a seeded shuffle of the 60k training images is the validation set.
    """
    root = Path(root)
    xtr = _read_idx(_find(root, "train-images-idx3-ubyte")).float().div_(255).unsqueeze(1)
    ytr = _read_idx(_find(root, "train-labels-idx1-ubyte")).long()
    xte = _read_idx(_find(root, "t10k-images-idx3-ubyte")).float().div_(255).unsqueeze(1)
    yte = _read_idx(_find(root, "t10k-labels-idx1-ubyte")).long()
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
    xtr, ytr = xtr[perm], ytr[perm]
    return Splits((xtr[:-val_size], ytr[:-val_size]), (xtr[-val_size:], ytr[-val_size:]), (xte, yte))


def loaders(splits: Splits, batch_size: int = 64, *, eval_batch_size: int | None = 512) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (shuffled), validation and test ``DataLoader`` s over in-memory splits.

    >>> train, val, test = loaders(digits(), batch_size=32)
    >>> next(iter(train))[0].shape
    torch.Size([32, 1, 8, 8])
    """
    ebs = eval_batch_size or batch_size
    return (
        DataLoader(TensorDataset(*splits.train), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(*splits.val), batch_size=ebs),
        DataLoader(TensorDataset(*splits.test), batch_size=ebs),
    )

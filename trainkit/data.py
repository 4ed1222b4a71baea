"""Real data that needs no network: scikit-learn's digits, MNIST from a local folder, or any
folder of images (one subfolder per class) through torchvision.

:func:`digits` and :func:`mnist` return float tensors shaped ``(N, 1, H, W)`` in [0, 1] and int64
labels, split deterministically into train / validation / test. :func:`image_folder` reads a
folder the user points at with ``torchvision.datasets.ImageFolder`` and splits it, seeded, into
train / validation. torchvision is imported only there, so ``trainkit`` imports without it.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, NamedTuple, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "Splits", "digits", "mnist", "loaders", "FolderSplits", "require_torchvision", "image_transform", "image_folder",
    "folder_loaders",
]


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


# ---------------------------------------------------------------------------- image folders (torchvision)

# torchvision is built against one torch: beside any other it fails at import (beside the 2.13.0 CPU
# wheel: "operator torchvision::nms does not exist"), so the pairs that work are named in the error.
_TORCHVISION_PAIRS = "torch 2.9.0 + torchvision 0.24.0, or torch 2.14.1 + torchvision 0.29.1"

# The ImageNet statistics that torchvision's models are trained with: the usual choice for them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def require_torchvision(who: str = "trainkit.data") -> ModuleType:
    """Import torchvision, or raise an ``ImportError`` saying which torch/torchvision pairs work.

    torchvision only imports beside the torch it was built for, so a missing torchvision and
    one that fails at import get the same clear error, naming this torch's version and the install
    command. Called by :func:`image_folder` and the demo's ``--data-dir``; ``who`` opens the message.
    (The example is skipped as a doctest: the main test venv's torch 2.13 CPU wheel has no torchvision.)

    >>> tv = require_torchvision()  # doctest: +SKIP
    >>> tv.__version__  # doctest: +SKIP
    '0.24.0+cu128'
    """
    try:
        import torchvision
        import torchvision.datasets
        import torchvision.models
        import torchvision.transforms
    except Exception as e:  # ModuleNotFoundError, or RuntimeError/ImportError from a mismatched build
        reason = "is not installed" if isinstance(e, ModuleNotFoundError) and e.name == "torchvision" else f"does not import ({e})"
        raise ImportError(
            f"{who}: needs torchvision, which {reason} beside torch {torch.__version__}. torchvision imports only "
            f"beside the torch it was built for: {_TORCHVISION_PAIRS}. Install a matching pair, e.g. "
            "pip install torch==2.9.0 torchvision==0.24.0 (the Makefile's .venv-xla has it: make xla-venv)."
        ) from e
    return torchvision


def image_transform(
    image_size: int | tuple[int, int] = 32, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Any], Tensor]:
    """torchvision's resize, to-tensor and normalize, composed: a PIL image to a ``(3, H, W)`` float tensor.

    ``image_size`` is the side of the square (or ``(H, W)``); every image is resized to it, so
    images of any size batch together. ``mean``/``std`` default to ImageNet's, as torchvision's
    models expect. Use it as the ``transform`` of any torchvision dataset. (The lines that need
    torchvision are skipped as doctests: the main test venv's torch 2.13 CPU wheel has none.)

    >>> t = image_transform(32)  # doctest: +SKIP
    >>> from PIL import Image; t(Image.new("RGB", (50, 40))).shape  # doctest: +SKIP
    torch.Size([3, 32, 32])
    >>> image_transform(0)
    Traceback (most recent call last):
    ...
    ValueError: image_transform: image_size must be a positive int or an (H, W) tuple, got 0.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, tuple)) or (isinstance(image_size, int) and image_size < 1):
        raise ValueError(f"image_transform: image_size must be a positive int or an (H, W) tuple, got {image_size!r}.")
    transforms = require_torchvision("image_transform").transforms
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return transforms.Compose([transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(mean, std)])


class FolderSplits(NamedTuple):
    """What :func:`image_folder` returns: train and validation datasets of ``(image, label)``, and the class names."""

    train: Dataset
    val: Dataset
    classes: list[str]


def _stratified_split(targets: Sequence[int], n_classes: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split: each class gives ``round(val_fraction * n)`` images (at least 1 of 2 or more) to val."""
    g = torch.Generator().manual_seed(seed)
    by_class: list[list[int]] = [[] for _ in range(n_classes)]
    for i, t in enumerate(targets):
        by_class[t].append(i)
    train: list[int] = []
    val: list[int] = []
    for idx in by_class:
        order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_val = 0 if val_fraction == 0 else min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val += order[:n_val]
        train += order[n_val:]
    return sorted(train), sorted(val)


def _visible_image_folder(datasets: ModuleType) -> type:
    """``ImageFolder`` that skips hidden subfolders: Jupyter's ``.ipynb_checkpoints`` is no class."""

    class VisibleImageFolder(datasets.ImageFolder):  # type: ignore[name-defined, misc]
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {c: i for i, c in enumerate(classes)}

    return VisibleImageFolder


def image_folder(
    root: Union[str, os.PathLike],
    *,
    image_size: int | tuple[int, int] = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    transform: Callable[[Any], Any] | None = None,
    train_transform: Callable[[Any], Any] | None = None,
) -> FolderSplits:
    """A folder of images, one subfolder per class (``root/cat/1.png``, ``root/dog/7.jpg``), split into train / val.

    Read with ``torchvision.datasets.ImageFolder`` (images become RGB, labels are the subfolders
    in sorted order; hidden ones such as ``.ipynb_checkpoints`` are skipped). Each class gives
    ``val_fraction`` of its images to validation, chosen by ``seed``, so every class is in both
    sets and the split is the same on every run. ``transform``
    (default :func:`image_transform` of ``image_size``: resize, to-tensor, ImageNet normalize) is
    applied to both sets; ``train_transform`` replaces it for training (add augmentation there).
    Images are decoded lazily, per batch: wrap the datasets in ``DataLoader`` s (:func:`folder_loaders`).
    (The lines that need torchvision and a folder are skipped as doctests: the main test venv's
    torch 2.13 CPU wheel has no torchvision; tests/vision runs them for real.)

    >>> s = image_folder("path/to/photos", image_size=64)  # doctest: +SKIP
    >>> s.classes, s.train[0][0].shape  # doctest: +SKIP
    (['cat', 'dog'], torch.Size([3, 64, 64]))
    >>> image_folder("no/such/folder")
    Traceback (most recent call last):
    ...
    FileNotFoundError: image_folder: 'no/such/folder' is not a folder. Point it at a folder with one subfolder of images per class.
    """
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"image_folder: val_fraction must be in [0, 1), got {val_fraction!r}.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"image_folder: {str(root)!r} is not a folder. Point it at a folder with one subfolder of images per class."
        )
    folder_class = _visible_image_folder(require_torchvision("image_folder").datasets)
    transform = transform if transform is not None else image_transform(image_size)
    try:
        full = folder_class(str(path), transform=transform)
    except FileNotFoundError as e:  # no class subfolders, or no image files in them
        raise FileNotFoundError(
            f"image_folder: no images found as {path}/<class>/<image> ({e}). Put one subfolder per class in {path}, "
            "holding .png/.jpg/.jpeg/.bmp/.ppm/.pgm/.tif/.webp files."
        ) from e
    train_idx, val_idx = _stratified_split(full.targets, len(full.classes), float(val_fraction), seed)
    train_set = full if train_transform is None else folder_class(str(path), transform=train_transform)
    return FolderSplits(Subset(train_set, train_idx), Subset(full, val_idx), list(full.classes))


def folder_loaders(
    splits: FolderSplits, batch_size: int = 64, *, eval_batch_size: int | None = None, num_workers: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled) and validation ``DataLoader`` s over :func:`image_folder`'s splits.

    ``num_workers`` decode images in worker processes (worth it for large photos; 0 decodes in
    this process, the best choice for small images on few cores). (The lines that need torchvision
    are skipped as doctests: the main test venv's torch 2.13 CPU wheel has none.)

    >>> train, val = folder_loaders(image_folder("path/to/photos"), 32)  # doctest: +SKIP
    >>> next(iter(train))[0].shape  # doctest: +SKIP
    torch.Size([32, 3, 32, 32])
    >>> folder_loaders(digits())
    Traceback (most recent call last):
    ...
    TypeError: folder_loaders: splits must be image_folder(...)'s FolderSplits, got Splits.
    """
    if not isinstance(splits, FolderSplits):
        raise TypeError(f"folder_loaders: splits must be image_folder(...)'s FolderSplits, got {type(splits).__name__}.")
    ebs = eval_batch_size or batch_size
    return (
        DataLoader(splits.train, batch_size=batch_size, shuffle=True, num_workers=num_workers),
        DataLoader(splits.val, batch_size=ebs, num_workers=num_workers),
    )

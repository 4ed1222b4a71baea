"""The torchvision tests run in the XLA venv (torch 2.9.0 + torchvision 0.24.0): `make test` does it, as

    PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests/vision -o addopts=""

torchvision imports only beside the torch it was built for: beside the main venv's 2.13.0 CPU wheel
it is absent (and would not import), so there this folder is skipped at collection, doctests included.
The folder is a process of its own, apart from tests/xla: torch_xla's SPMD mode is process-wide, and
a CPU backward pass run before XLA steps breaks them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:  # a torchvision built for another torch is found, then fails at import
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


if not _torchvision_imports():
    collect_ignore_glob = ["*.py"]

# scikit-learn's real 8x8 digits, upscaled to 32x32 RGB PNGs: PER_CLASS of each of the 10 classes
# (100 images: resnet18 trains 2 epochs on 80 of them in a few seconds on 2 cores).
PER_CLASS = 10


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory):
    """An ImageFolder on disk, root/<digit>/<n>.png, from real handwritten digits (no network)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path_factory.mktemp("digits_folder")
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    rgb = (big.squeeze(1) * 255).round().to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, 3)
    for c in range(10):
        (root / str(c)).mkdir()
        idx = (torch.tensor(d.target) == c).nonzero().flatten()[:PER_CLASS]
        for j, i in enumerate(idx.tolist()):
            Image.fromarray(rgb[i].numpy(), mode="RGB").save(root / str(c) / f"{j}.png")
    return root

"""trainkit.data.image_folder + a torchvision model, trained with tk.fit on real digits written as PNGs."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

import trainkit as tk
from trainkit.demo import eval_step, train_step


def test_image_folder_splits_seeded_and_stratified(digits_folder):
    per_class = len(list((digits_folder / "0").iterdir()))
    s = tk.data.image_folder(digits_folder, image_size=24, val_fraction=0.2, seed=0)
    assert s.classes == [str(c) for c in range(10)]
    assert len(s.train) == 10 * (per_class - 2) and len(s.val) == 10 * 2  # 20% of every class in val
    x, y = s.train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(y, int)
    assert {s.val[i][1] for i in range(len(s.val))} == set(range(10))
    assert s.val.indices == tk.data.image_folder(digits_folder, seed=0).val.indices  # same seed, same split
    assert s.val.indices != tk.data.image_folder(digits_folder, seed=1).val.indices
    assert not set(s.train.indices) & set(s.val.indices)


def test_hidden_subfolders_are_no_classes(digits_folder, tmp_path):
    import shutil

    root = shutil.copytree(digits_folder, tmp_path / "copy")
    shutil.copytree(root / "3", root / ".ipynb_checkpoints")  # what Jupyter leaves beside a user's images
    assert tk.data.image_folder(root).classes == [str(c) for c in range(10)]


def test_resnet18_trains_on_the_folder_and_round_trips_through_save_load(digits_folder, tmp_path):
    train, val = tk.data.folder_loaders(tk.data.image_folder(digits_folder, image_size=32, seed=0), batch_size=20)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    state = tk.TrainState.create(model, tk.optim.adam(1e-3))
    new, history = tk.fit(train_step, state, train, epochs=2, eval_step=eval_step, val_loader=val, progress=False)
    assert new.step == 2 * len(train) and state.step == 0
    losses = [h["train_loss"] for h in history]
    print("resnet18 on the folder:", history)
    assert losses[-1] < losses[0], losses
    loaded = tk.load(tk.save(new, tmp_path / "resnet18.pt"), like=state)
    tk.testing.assert_trees_equal(loaded.params, new.params)
    tk.testing.assert_trees_equal(loaded.buffers, new.buffers)  # BatchNorm running stats too
    assert loaded.step == new.step
    assert tk.evaluate(eval_step, loaded, val) == tk.evaluate(eval_step, new, val)


def test_image_folder_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        tk.data.image_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="one subfolder per class"):
        tk.data.image_folder(tmp_path)  # a folder with no class subfolders
    with pytest.raises(ValueError, match="val_fraction must be in"):
        tk.data.image_folder(tmp_path, val_fraction=1.0)

    monkeypatch.setitem(sys.modules, "torchvision", None)  # as where torchvision is not installed
    with pytest.raises(ImportError, match=r"is not installed .*torch 2\.9\.0 \+ torchvision 0\.24\.0.*pip install"):
        tk.data.image_folder(tmp_path)


def test_a_torchvision_that_fails_at_import_gets_the_same_advice(tmp_path, monkeypatch):
    class Mismatched:  # what a torchvision built for another torch does at import
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision":
                raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setattr(sys, "meta_path", [Mismatched(), *sys.meta_path])
    with pytest.raises(ImportError, match=r"does not import \(operator torchvision::nms does not exist\).*torch 2\.14\.1"):
        tk.data.require_torchvision("image_folder")


def test_image_transform_resizes_any_image_and_normalizes():
    from PIL import Image

    t = tk.data.image_transform((20, 28), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = t(Image.new("RGB", (50, 40), color=(255, 0, 255)))
    assert x.shape == (3, 20, 28)
    assert torch.allclose(x[:, 5, 5], torch.tensor([1.0, -1.0, 1.0]))

"""The demo's --data-dir/--model option, end to end on an ImageFolder of real digits, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import trainkit as tk


def test_demo_trains_a_torchvision_model_on_the_folder(digits_folder, tmp_path):
    cmd = [sys.executable, "-m", "trainkit.demo", "--data-dir", str(digits_folder), "--model", "resnet18",
           "--image-size", "24", "--epochs", "1", "--batch-size", "32", "--logdir", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "trained 3 steps" in out.stdout  # 80 training images in batches of 32
    assert f"resnet18 on {digits_folder}: val accuracy" in out.stdout
    (log_dir,) = (tmp_path / "demo").iterdir()
    scalars = tk.read_scalars(log_dir)
    assert len(scalars["epoch/val_acc"]) == 1 and "test/acc" not in scalars  # a folder has train/val only


def test_demo_names_the_models_it_knows(digits_folder, tmp_path):
    from trainkit.demo import main

    with pytest.raises(ValueError, match=r"--model must name a torchvision.models classifier, got 'resnet'.*resnet18"):
        main(["--data-dir", str(digits_folder), "--model", "resnet", "--logdir", str(tmp_path)])


def test_demo_model_needs_a_data_dir(capsys):
    from trainkit.demo import main

    with pytest.raises(SystemExit):
        main(["--model", "resnet18"])
    assert "give --data-dir too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--mnist", "x", "--data-dir", "y"])
    assert "not allowed with argument" in capsys.readouterr().err

"""The demo, as README runs it: real digits, held-out test accuracy >= 0.95."""

import subprocess
import sys

import pytest

import trainkit as tk


@pytest.mark.slow
def test_demo_reaches_95_percent_on_held_out_digits(tmp_path):
    from trainkit.demo import main

    result = main(["--logdir", str(tmp_path), "--no-progress"])
    assert result["test_acc"] >= 0.95
    print(f"demo: test_acc {result['test_acc']:.4f} in {result['seconds']:.1f}s")
    scalars = tk.read_scalars(result["log_dir"])
    assert len(scalars["epoch/val_acc"]) == len(result["history"])
    assert "test/acc" in scalars


def test_demo_cli_rejects_a_missing_mnist_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainkit.demo", "--mnist", str(tmp_path), "--logdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "no train-images-idx3-ubyte[.gz]" in out.stderr


def test_mnist_loader_reads_idx_files(tmp_path):
    import gzip
    import struct

    import torch

    def write(name, arr):
        header = struct.pack(">HBB", 0, 8, arr.dim()) + struct.pack(">" + "I" * arr.dim(), *arr.shape)
        with gzip.open(tmp_path / (name + ".gz"), "wb") as f:
            f.write(header + arr.to(torch.uint8).numpy().tobytes())

    g = torch.Generator().manual_seed(0)
    write("train-images-idx3-ubyte", torch.randint(0, 256, (30, 28, 28), generator=g))
    write("train-labels-idx1-ubyte", torch.randint(0, 10, (30,), generator=g))
    write("t10k-images-idx3-ubyte", torch.randint(0, 256, (7, 28, 28), generator=g))
    write("t10k-labels-idx1-ubyte", torch.randint(0, 10, (7,), generator=g))
    s = tk.data.mnist(tmp_path, val_size=10)
    assert s.train[0].shape == (20, 1, 28, 28) and s.val[0].shape[0] == 10 and s.test[0].shape[0] == 7
    assert 0.0 <= s.train[0].min() and s.train[0].max() <= 1.0

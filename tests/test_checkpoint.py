"""Checkpoints: atomic, safe to load, clear about mismatches, exact on resume."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainkit as tk
from trainkit.demo import CNN

WORKER = Path(__file__).parent / "workers" / "resume_run.py"


def _state(width=8, tx=None):
    torch.manual_seed(0)
    return tk.TrainState.create(CNN(width=width), tx or tk.optim.adam(1e-3), seed=3)


def _trained(state, n=3):
    from trainkit.demo import train_step

    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        state, _ = train_step(state, (torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)))
    return state.replace(slots={"t": {"best": 1.5, "stop": False, "hist": [torch.ones(2)]}})


def test_roundtrip_is_bit_identical(tmp_path):
    s = _trained(_state())
    tk.save(s, tmp_path / "a.pt")
    loaded = tk.load(tmp_path / "a.pt", like=_state())
    tk.testing.assert_trees_equal(loaded, s)
    assert loaded.params["head.2.weight"].requires_grad
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"], "no temp files left behind"


def test_loading_another_model_lists_the_differences(tmp_path):
    tk.save(_state(width=8), tmp_path / "a.pt")
    with pytest.raises(tk.CheckpointError) as e:
        tk.load(tmp_path / "a.pt", like=_state(width=4))
    msg = str(e.value)
    assert "saved from another model" in msg
    assert "param 'features.0.weight': file has (8, 1, 3, 3) torch.float32, model has (4, 1, 3, 3)" in msg
    torch.manual_seed(0)
    other = tk.TrainState.create(torch.nn.Sequential(torch.nn.Linear(2, 2)), tk.optim.adam(1e-3))
    with pytest.raises(tk.CheckpointError, match=r"param missing from the file: \['0.weight', '0.bias'\]"):
        tk.load(tmp_path / "a.pt", like=other)


def test_other_optimizer_is_rejected(tmp_path):
    tk.save(_state(), tmp_path / "a.pt")
    with pytest.raises(tk.CheckpointError, match="different optimizer state"):
        tk.load(tmp_path / "a.pt", like=_state(tx=tk.optim.sgd(0.1, momentum=0.9)))


def test_truncated_and_corrupt_files(tmp_path):
    tk.save(_state(), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pt").write_bytes(os.urandom(2000))
    for name in ("trunc.pt", "noise.pt"):
        with pytest.raises(tk.CheckpointError, match="truncated, corrupt or not a checkpoint"):
            tk.load(tmp_path / name, like=_state())
    torch.save({"weight": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(tk.CheckpointError, match="not a trainkit checkpoint"):
        tk.load(tmp_path / "plain.pt", like=_state())
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        tk.load(tmp_path / "missing.pt", like=_state())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/trainkit_pwned_marker",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_file_with_code_in_it_does_not_run(tmp_path):
    marker = Path("/tmp/trainkit_pwned_marker")
    marker.unlink(missing_ok=True)
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"format": "trainkit.checkpoint", "evil": _Evil()}, f)
    with pytest.raises(tk.CheckpointError):
        tk.load(tmp_path / "evil.pt", like=_state())
    assert not marker.exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(tk.CheckpointError):
        tk.load(tmp_path / "evil.pkl", like=_state())
    assert not marker.exists()


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    s = _state()
    path = tk.save(s, tmp_path / "c.pt")
    good = path.read_bytes()
    with pytest.raises(TypeError, match="checkpoints hold only tensors"):
        tk.save(s.replace(slots={"x": object()}), path)
    # A real write failure mid-file: a file-size limit makes the OS refuse the bytes (EFBIG).
    code = (
        "import resource, signal, sys, torch, trainkit as tk\n"
        "from trainkit.demo import CNN\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "s = tk.TrainState.create(CNN(width=64), tk.optim.adam(1e-3))\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "try:\n    tk.save(s, sys.argv[1])\nexcept Exception as e:\n    print('failed', type(e).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert "failed" in out.stdout, out.stderr
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    tk.load(path, like=s)


def test_checkpointer_keeps_last_n(tmp_path):
    ck = tk.Checkpointer(tmp_path, every_n_steps=2, keep_last=2)
    s = _state()
    for step in (2, 4, 6):
        ck.save(s.replace(step=step))
    assert [p.name for p in ck.checkpoints()] == ["step-000000004.pt", "step-000000006.pt"]
    assert ck.latest().name == "step-000000006.pt"
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        tk.Checkpointer(tmp_path, keep_last=0)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300)

    full = run("--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "full.pt"))
    assert full.returncode == 0, full.stderr
    # 10 batches per epoch: step 23 is mid-epoch 3; the last checkpoints before it are the end of
    # epoch 2 (step 20) and step 21 (every 7 steps), so the resume starts mid-epoch.
    killed = run("--ckpt", str(tmp_path / "b"), "--out", str(tmp_path / "never.pt"), "--die-at", "23")
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert not (tmp_path / "never.pt").exists()
    assert [p.name for p in sorted((tmp_path / "b").iterdir())] == ["step-000000020.pt", "step-000000021.pt"]
    resumed = run("--ckpt", str(tmp_path / "b"), "--out", str(tmp_path / "resumed.pt"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    like = tk.TrainState.create(CNN(width=8), tk.optim.adamw(tk.optim.cosine_decay_schedule(3e-3, 40)), seed=7)
    a = tk.load(tmp_path / "full.pt", like=like)
    b = tk.load(tmp_path / "resumed.pt", like=like)
    assert a.step == b.step == 40
    tk.testing.assert_trees_equal(b, a)
    meta = lambda name: torch.load(tmp_path / name, weights_only=True)["meta"]["history"]
    assert meta("resumed.pt") == meta("full.pt")  # the epoch cut by the kill reports whole-epoch means

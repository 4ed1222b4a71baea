"""Checkpoints: atomic, safe to load, clear about mismatches, exact on resume."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainkit as tk
from trainkit.checkpoint import load_module, load_params
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
        torch.save({"format": "trainkit.checkpoint/2", "evil": _Evil()}, f)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(tk.CheckpointError) as e:
            tk.load(tmp_path / name, like=_state())
        msg = str(e.value)
        assert f"load: refused '{tmp_path / name}': loading it would run code (it calls the Python global posix.system)" in msg
        assert "weights_only=False" not in msg and "corrupt" not in msg
        assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickled_module_is_refused_by_name_and_a_pickle_without_code_is_not_a_checkpoint(tmp_path):
    torch.save(torch.nn.Linear(2, 1), tmp_path / "module.pt")  # the whole module: code, not data
    with pytest.raises(tk.CheckpointError, match=r"run code \(it calls the Python global torch.nn.modules.linear.Linear\)") as e:
        tk.load(tmp_path / "module.pt", like=_state())
    assert "torch.save(model.state_dict(), path)" in str(e.value) and "weights_only=False" not in str(e.value)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"a": [1, 2]}, f)
    with pytest.raises(tk.CheckpointError, match="truncated, corrupt or not a checkpoint") as e:
        tk.load(tmp_path / "plain.pkl", like=_state())
    assert "weights_only" not in str(e.value), "torch's advice to load unsafely is not passed on"


_EFBIG = (
    "import resource, signal, sys, torch, trainkit as tk\n"
    "from trainkit.demo import CNN\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "s = tk.TrainState.create(CNN(width=64), tk.optim.adam(1e-3))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
    "try:\n    tk.save(s, sys.argv[1])\nexcept Exception as e:\n    print('failed', type(e).__name__, e.errno, e)\n"
)


def test_failed_save_leaves_previous_checkpoint_intact_and_says_why(tmp_path):
    s = _state()
    path = tk.save(s, tmp_path / "c.pt")
    good = path.read_bytes()
    with pytest.raises(TypeError, match="checkpoints hold only tensors"):
        tk.save(s.replace(slots={"x": object()}), path)
    # A real write failure mid-file: a file-size limit makes the OS refuse the bytes (EFBIG).
    out = subprocess.run([sys.executable, "-c", _EFBIG, str(path)], capture_output=True, text=True, timeout=120)
    assert f"failed OSError 27 [Errno 27] save: could not write '{path}': the file would exceed" in out.stdout, out.stderr
    assert "(EFBIG: File too large)" in out.stdout and "ulimit -f" in out.stdout
    assert f"The previous checkpoint at '{path}' is intact" in out.stdout
    assert "inline_container" not in out.stdout
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    tk.load(path, like=s)
    fresh = tmp_path / "new.pt"
    out = subprocess.run([sys.executable, "-c", _EFBIG, str(fresh)], capture_output=True, text=True, timeout=120)
    assert f"Nothing was left at '{fresh}'" in out.stdout, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def _payload(path):
    return torch.load(path, weights_only=True)


def test_checkpoints_carry_their_format_and_old_or_newer_ones_are_refused(tmp_path):
    s = _trained(_state())
    tk.save(s, tmp_path / "a.pt")
    payload = _payload(tmp_path / "a.pt")
    assert payload["format"] == "trainkit.checkpoint/2"
    old = {**payload, "format": "trainkit.checkpoint", "version": 1}  # what trainkit wrote before format 2
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(tk.CheckpointError) as e:
        tk.load(tmp_path / "old.pt", like=_state())
    assert "was written by an older trainkit (checkpoint format 1; this one resumes format 2" in str(e.value)
    assert "Retrain, or start from its weights: trainkit.load_module(path, module)" in str(e.value)
    with pytest.raises(tk.CheckpointError, match="older trainkit"):
        tk.fit(lambda st, b: (st, {}), _state(), [], epochs=1, resume=tmp_path / "old.pt", progress=False)
    module = load_module(tmp_path / "old.pt", CNN(width=8))  # its weights still load
    tk.testing.assert_trees_equal(dict(module.named_parameters()), s.params)
    torch.save({**payload, "format": "trainkit.checkpoint/3"}, tmp_path / "new.pt")
    with pytest.raises(tk.CheckpointError, match=r"newer trainkit \(checkpoint format 3; this one reads up to 2\). Upgrade"):
        load_params(tmp_path / "new.pt")


def test_foreign_files_say_what_they_are_and_what_to_do(tmp_path):
    model = CNN(width=8)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    lightning = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                 "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                 "optimizer_states": [{"state": {}, "param_groups": []}], "lr_schedulers": []}
    torch.save(lightning, tmp_path / "pl.ckpt")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "tut.pt")
    torch.save(torch.ones(3), tmp_path / "t.pt")
    cases = {
        "sd.pt": r"is not a trainkit checkpoint: it is a plain state_dict \(\d+ tensors: 'features.0.weight', .*\)\. "
                 r"Load it into the module first: module.load_state_dict\(torch.load\(path, weights_only=True\)\), "
                 r"then TrainState.create\(module, optimizer\)",
        "pl.ckpt": r"it is a PyTorch Lightning checkpoint \(Lightning 2.4.0\)\. Load its 'state_dict' entry",
        "tut.pt": r"it is a dict with keys \['model_state_dict', 'epoch'\] .*Load its 'model_state_dict' entry",
        "t.pt": r"it is a torch file holding a Tensor",
    }
    for name, msg in cases.items():
        for fn in (lambda p: tk.load(p, like=_state()), load_params, lambda p: load_module(p, CNN(width=8))):
            with pytest.raises(tk.CheckpointError, match=msg):
                fn(tmp_path / name)


def test_load_module_returns_a_trained_copy_and_leaves_the_argument_alone(tmp_path):
    s = _trained(_state())
    path = tk.save(s, tmp_path / "a.pt")
    torch.manual_seed(1)
    module = CNN(width=8)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trained = load_module(path, module)
    assert trained is not module and type(trained) is CNN
    tk.testing.assert_trees_equal(dict(trained.named_parameters()), s.params)
    tk.testing.assert_trees_equal(dict(trained.named_buffers()), s.buffers)
    tk.testing.assert_trees_equal(module.state_dict(), before)
    assert all(p.requires_grad for p in trained.parameters())
    w = load_params(path)
    tk.testing.assert_trees_equal(w, {"params": s.params, "buffers": s.buffers})
    # a float64 run loads into the module's own dtype, as load_state_dict does
    s64 = tk.TrainState.create(CNN(width=8), tk.optim.sgd(0.1), dtype=torch.float64)
    m32 = load_module(tk.save(s64, tmp_path / "f64.pt"), CNN(width=8))
    assert m32.head[2].weight.dtype == torch.float32
    assert torch.equal(m32.head[2].weight, s64.params["head.2.weight"].float())


def test_load_module_lists_every_difference(tmp_path):
    path = tk.save(_state(width=8), tmp_path / "a.pt")
    other = torch.nn.Sequential()
    other.add_module("features", torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False)))
    other.add_module("extra", torch.nn.Linear(2, 2))
    with pytest.raises(tk.CheckpointError) as e:
        load_module(path, other)
    msg = str(e.value)
    assert msg.startswith(f"load_module: '{path}' does not fit this Sequential:\n  - param missing from the file: "
                          "['extra.weight', 'extra.bias']\n  - param in the file but not in the model: [")
    assert "param 'features.0.weight': file has (8, 1, 3, 3) torch.float32, model has (4, 1, 3, 3) torch.float32" in msg
    assert msg.endswith("Build the module with the same layers and sizes as the run that saved it.")
    with pytest.raises(TypeError, match="load_module: module must be an nn.Module, got TrainState"):
        load_module(path, _state())


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

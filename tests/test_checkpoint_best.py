"""Best-by-metric checkpoints, hyperparameters in checkpoints, two models in one state (real files)."""

import json
import math
import subprocess
import sys

import pytest
import torch

import trainkit as tk
from trainkit.checkpoint import load_hparams

NAME = "step-{:09d}.pt".format


def _state(seed=0):
    torch.manual_seed(seed)
    return tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1), seed=seed)


def _names(ck):
    return [p.name for p in ck.checkpoints()]


def _meta(path):
    return torch.load(path, weights_only=True)["meta"]


def _save_scores(ck, scores, start=1, key="val_loss"):
    s = _state()
    for i, score in enumerate(scores, start=start):
        ck.save(s.replace(step=i), meta={"epoch": i}, metrics={"epoch": float(i), "step": float(i), key: score})


# --------------------------------------------------------------------------- best-k


def test_best_k_are_kept_beside_the_last_n(tmp_path):
    ck = tk.Checkpointer(tmp_path, monitor="val_loss", mode="min", save_top_k=2, keep_last=1)
    kept = []
    for i, score in enumerate([0.5, 0.3, 0.4, 0.6, 0.2], start=1):
        _save_scores(ck, [score], start=i)
        kept.append(_names(ck))
    assert kept == [
        [NAME(1)],
        [NAME(1), NAME(2)],
        [NAME(2), NAME(3)],  # 0.4 displaced 0.5: step 1 went once step 3 was in place
        [NAME(2), NAME(3), NAME(4)],  # 4 is the last (not a best); 2 and 3 the best two
        [NAME(2), NAME(5)],  # 5 is both the last and the best; 3 and 4 are neither now
    ]
    assert ck.best() == tmp_path / NAME(5) and ck.best_score == 0.2
    assert ck.latest() == tmp_path / NAME(5)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["best"] == NAME(5) and best["score"] == 0.2 and best["monitor"] == "val_loss" and best["mode"] == "min"
    assert [(e["name"], e["score"]) for e in best["top_k"]] == [(NAME(5), 0.2), (NAME(2), 0.3)]
    assert not (tmp_path / "best.json").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", NAME(2), NAME(5)], "no temp files"
    meta = _meta(tmp_path / NAME(2))
    assert meta["epoch"] == 2, "the caller's meta is passed through"
    assert meta["checkpointer"]["score"] == 0.3 and meta["checkpointer"]["monitor"] == "val_loss"


def test_max_mode_and_ties_keep_the_earlier_checkpoint(tmp_path):
    ck = tk.Checkpointer(tmp_path, monitor="val_acc", mode="max", save_top_k=1, keep_last=1)
    bests = []
    for i, score in enumerate([0.7, 0.7, 0.9, 0.9, 0.8], start=1):
        _save_scores(ck, [score], start=i, key="val_acc")
        bests.append((ck.best().name, ck.best_score))
    assert bests == [(NAME(1), 0.7), (NAME(1), 0.7), (NAME(3), 0.9), (NAME(3), 0.9), (NAME(3), 0.9)]
    assert _names(ck) == [NAME(3), NAME(5)]


def test_nan_scores_never_rank(tmp_path):
    ck = tk.Checkpointer(tmp_path, monitor="val_loss", save_top_k=1, keep_last=1)
    _save_scores(ck, [float("nan")])
    assert ck.best() is None and ck.best_score is None and not (tmp_path / "best.json").exists()
    assert math.isnan(_meta(tmp_path / NAME(1))["checkpointer"]["score"]), "the score is stored even when NaN"
    _save_scores(ck, [0.5, float("nan"), float("nan")], start=2)
    assert ck.best() == tmp_path / NAME(2) and ck.best_score == 0.5
    assert _names(ck) == [NAME(2), NAME(4)]


def test_saves_without_metrics_are_last_checkpoints_only(tmp_path):
    ck = tk.Checkpointer(tmp_path, monitor="val_loss", save_top_k=1, keep_last=1)
    s = _state()
    ck.save(s.replace(step=1), metrics={"val_loss": 0.5})
    ck.save(s.replace(step=2))  # mid-epoch (every_n_steps): never ranked
    ck.save(s.replace(step=3), meta={"epoch": 0})
    assert _names(ck) == [NAME(1), NAME(3)] and ck.best().name == NAME(1)
    meta = _meta(tmp_path / NAME(3))
    assert meta["checkpointer"]["score"] is None and [e["name"] for e in meta["checkpointer"]["top_k"]] == [NAME(1)]
    # the same step saved again with metrics (every_n_steps on an epoch boundary) ranks it
    ck.save(s.replace(step=3), metrics={"val_loss": 0.1})
    assert ck.best().name == NAME(3) and _names(ck) == [NAME(3)]


def test_save_without_monitor_works_as_before(tmp_path):
    ck = tk.Checkpointer(tmp_path, keep_last=2)
    s = _state()
    for step in (1, 2, 3):
        ck.save(s.replace(step=step), meta={"a": step}, metrics={"val_loss": 1.0})
    assert _names(ck) == [NAME(2), NAME(3)] and not (tmp_path / "best.json").exists()
    assert _meta(tmp_path / NAME(3)) == {"a": 3}
    with pytest.raises(ValueError, match=r"Checkpointer: best\(\) ranks by a metric, and this Checkpointer has no monitor"):
        ck.best()


def test_a_missing_monitor_lists_the_metrics_and_writes_nothing(tmp_path):
    ck = tk.Checkpointer(tmp_path, monitor="val_acc", save_top_k=1)
    row = {"epoch": 1.0, "step": 10.0, "train_loss": 0.4, "val_loss": 0.5}
    with pytest.raises(ValueError) as e:
        ck.save(_state().replace(step=10), metrics=row)
    assert str(e.value).startswith(
        "Checkpointer: monitor='val_acc' is not among the metrics: ['epoch', 'step', 'train_loss', 'val_loss']. "
    )
    assert "eval_step" in str(e.value)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match=r"Checkpointer: metrics\['val_acc'\] must be a number, got str"):
        ck.save(_state(), metrics={"val_acc": "high"})


def test_arguments_are_checked_when_the_checkpointer_is_made(tmp_path):
    with pytest.raises(ValueError, match="Checkpointer: mode must be 'min' or 'max', got 'lowest'"):
        tk.Checkpointer(tmp_path, monitor="val_loss", mode="lowest")
    with pytest.raises(ValueError, match="Checkpointer: save_top_k must be an int >= 1, got 0"):
        tk.Checkpointer(tmp_path, monitor="val_loss", save_top_k=0)
    with pytest.raises(ValueError, match="Checkpointer: save_top_k=3 ranks checkpoints by a metric, but monitor is None"):
        tk.Checkpointer(tmp_path, save_top_k=3)
    with pytest.raises(TypeError, match="Checkpointer: monitor must be a metric name"):
        tk.Checkpointer(tmp_path, monitor=["val_loss"])


def test_restore_keeps_the_same_k_best(tmp_path):
    ck = tk.Checkpointer(tmp_path, monitor="val_loss", save_top_k=2, keep_last=1)
    _save_scores(ck, [0.5, 0.3, 0.9])  # best: 2, 1; last: 3
    meta = _meta(ck.latest())
    again = tk.Checkpointer(tmp_path, monitor="val_loss", save_top_k=2, keep_last=1)
    again.restore(meta)
    assert again.best() == tmp_path / NAME(2) and again.best_score == 0.3
    _save_scores(again, [0.4], start=4)  # displaces 0.5 (step 1), as the first run would have
    assert _names(again) == [NAME(2), NAME(4)]
    assert [e["name"] for e in json.loads((tmp_path / "best.json").read_text())["top_k"]] == [NAME(2), NAME(4)]
    # a checkpoint ranked by another metric: ranking starts afresh, with a warning
    other = tk.Checkpointer(tmp_path, monitor="val_acc", mode="max")
    with pytest.warns(UserWarning, match="ranked by 'val_loss' \\(min\\).*starts afresh"):
        other.restore(meta)
    assert other.best() is None
    fresh = tk.Checkpointer(tmp_path, monitor="val_loss")
    fresh.restore({"epoch": 1, "batch": 0, "history": []})  # written without a monitor
    assert fresh.best() is None


def test_a_fresh_checkpointer_reads_the_best_of_a_finished_run(tmp_path):
    ck = tk.Checkpointer(tmp_path, monitor="val_loss", save_top_k=1, keep_last=1)
    _save_scores(ck, [0.5, 0.3, 0.9])
    later = tk.Checkpointer(tmp_path, monitor="val_loss")
    assert later.best() == tmp_path / NAME(2) and later.best_score == 0.3
    state = tk.load(later.best(), like=_state())
    assert state.step == 2


_EFBIG = (
    "import resource, signal, sys, torch, trainkit as tk\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "ck = tk.Checkpointer(sys.argv[1], monitor='val_loss', save_top_k=1, keep_last=1)\n"
    "s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))\n"
    "ck.save(s.replace(step=1), metrics={'val_loss': 0.5})\n"
    "big = tk.TrainState.create(torch.nn.Linear(200, 200), tk.optim.sgd(0.1))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000))\n"
    "try:\n    ck.save(big.replace(step=2), metrics={'val_loss': 0.1})\n"
    "except OSError as e:\n    print('failed', e.errno)\n"
    "print('best', ck.best().name, ck.best_score)\n"
)


def test_a_failed_save_keeps_the_previous_best_and_its_pointer(tmp_path):
    out = subprocess.run([sys.executable, "-c", _EFBIG, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "failed 27" in out.stdout, out.stderr
    assert f"best {NAME(1)} 0.5" in out.stdout, "the in-memory ranking is unchanged by a failed save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", NAME(1)]
    assert json.loads((tmp_path / "best.json").read_text())["best"] == NAME(1)
    tk.load(tmp_path / NAME(1), like=_state())


def test_fit_keeps_the_best_epoch(tmp_path):
    state = _state()
    data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: ((state.apply(p, x)[0] - y) ** 2).mean())(state.params)
        return state.apply_gradients(g), {"loss": loss}

    def eval_step(state, batch):
        return {"loss": ((state.apply(None, batch[0])[0] - batch[1]) ** 2).mean()}

    ck = tk.Checkpointer(tmp_path, monitor="val_loss", save_top_k=1, keep_last=1)
    _, history = tk.fit(step, state, data, epochs=4, eval_step=eval_step, val_loader=data[:1], checkpoint=ck, progress=False)
    meta = json.loads((tmp_path / "best.json").read_text()) if (tmp_path / "best.json").exists() else None
    assert meta is not None, "fit passes metrics=row to checkpointer.save"
    best = min(history, key=lambda r: r["val_loss"])
    assert ck.best() == tmp_path / NAME(int(best["step"])) and ck.best_score == best["val_loss"]


def test_fit_resume_keeps_the_best_k(tmp_path):
    state = _state()
    data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    val = [(torch.randn(4, 2), torch.randn(4, 1))]

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: ((state.apply(p, x)[0] - y) ** 2).mean())(state.params)
        return state.apply_gradients(g), {"loss": loss}

    def eval_step(state, batch):
        return {"loss": ((state.apply(None, batch[0])[0] - batch[1]) ** 2).mean()}

    def run(directory, epochs, resume=None):
        ck = tk.Checkpointer(directory, monitor="val_loss", save_top_k=2, keep_last=1)
        tk.fit(step, state, data, epochs=epochs, eval_step=eval_step, val_loader=val, checkpoint=ck, resume=resume, progress=False)
        return ck

    full = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume="latest")
    assert resumed.best().name == full.best().name and resumed.best_score == full.best_score
    assert _names(resumed) == _names(full)
    assert (tmp_path / "a" / "best.json").read_text() == (tmp_path / "b" / "best.json").read_text()


# --------------------------------------------------------------------------- hyperparameters


def test_hparams_are_in_every_checkpoint(tmp_path):
    hp = {"lr": 1e-3, "width": 64, "name": "cnn", "betas": [0.9, 0.999], "sched": {"warmup": 10, "kind": None}}
    ck = tk.Checkpointer(tmp_path, hparams=hp, keep_last=None)
    s = _state()
    for step in (1, 2):
        ck.save(s.replace(step=step), meta={"epoch": step})
    hp["lr"] = 1.0  # the Checkpointer keeps its own copy
    for path in ck.checkpoints():
        assert load_hparams(path) == {**hp, "lr": 1e-3}
        assert _meta(path)["epoch"] in (1, 2)
    assert load_hparams(tk.save(s, tmp_path / "plain.pt")) == {}, "a checkpoint without hparams has none"
    with pytest.raises(TypeError, match=r"Checkpointer: hparams\['model'\] is a Linear; hparams hold plain values"):
        tk.Checkpointer(tmp_path, hparams={"model": torch.nn.Linear(1, 1)})
    with pytest.raises(TypeError, match=r"Checkpointer: hparams must be a dict of plain values, got list"):
        tk.Checkpointer(tmp_path, hparams=[1, 2])
    torch.save({"w": torch.ones(1)}, tmp_path / "sd.pt")
    with pytest.raises(tk.CheckpointError, match="load_hparams: .* is not a trainkit checkpoint"):
        load_hparams(tmp_path / "sd.pt")


# --------------------------------------------------------------------------- two models in one state


class Disc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def forward(self, x):
        return self.body(x)


def _two_models(seed=0):
    torch.manual_seed(seed)
    gen = tk.TrainState.create(torch.nn.Linear(3, 2), tk.optim.adam(1e-2), seed=1)
    disc = tk.TrainState.create(Disc(), tk.optim.sgd(0.05, momentum=0.9), seed=2)
    return gen.replace(slots={"disc": disc})


def two_model_step(state, batch):
    """One discriminator update, then one generator update (a least-squares GAN)."""
    noise, real = batch
    disc = state.slots["disc"]
    fake = state.apply(None, noise)[0].detach()

    def d_loss(p):
        out, buffers = disc.apply(p, torch.cat([real, fake]), train=True)
        n = len(real)
        return ((out[:n] - 1) ** 2).mean() + (out[n:] ** 2).mean(), buffers

    (dl, buffers), dg = tk.value_and_grad(d_loss, has_aux=True)(disc.params)
    disc = disc.apply_gradients(dg, buffers=buffers)
    gl, gg = tk.value_and_grad(lambda p: ((disc.apply(None, state.apply(p, noise)[0])[0] - 1) ** 2).mean())(state.params)
    return state.apply_gradients(gg, slots={**state.slots, "disc": disc}), {"g_loss": gl, "d_loss": dl}


def _gan_data(n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g) + 2) for _ in range(n)]


def _trained_two(n=3):
    state = _two_models()
    for batch in _gan_data(n):
        state, _ = two_model_step(state, batch)
    return state


def test_a_state_holding_a_second_train_state_saves_and_loads_bit_identically(tmp_path):
    s = _trained_two()
    assert s.slots["disc"].step == 3 and s.slots["disc"].buffers["body.1.num_batches_tracked"] == 3
    path = tk.save(s, tmp_path / "gan.pt")
    loaded = tk.load(path, like=_two_models(seed=5))
    tk.testing.assert_trees_equal(loaded, s)
    disc = loaded.slots["disc"]
    assert isinstance(disc, tk.TrainState) and type(disc.module) is Disc and disc.tx is not loaded.tx
    assert disc.params["body.0.weight"].requires_grad and not disc.buffers["body.1.running_mean"].requires_grad
    # the loaded pair trains on exactly as the original
    batch = _gan_data(5)[-1]
    tk.testing.assert_trees_equal(two_model_step(loaded, batch)[0], two_model_step(s, batch)[0])
    # through the Checkpointer and load_run
    ck = tk.Checkpointer(tmp_path / "ck")
    ck.save(s, meta={"epoch": 1, "batch": 0, "history": []})
    state, meta = tk.checkpoint.load_run(ck.latest(), like=_two_models())
    tk.testing.assert_trees_equal(state, s)


def test_nested_states_at_any_depth(tmp_path):
    s = _trained_two()
    inner = s.slots["disc"].replace(slots={"ema": {"decay": 0.9}})
    deep = s.replace(slots={"gan": {"disc": inner, "n": 3}, "more": [inner]})
    like_inner = _two_models().slots["disc"]
    like = _two_models().replace(slots={"gan": {"disc": like_inner, "n": 0}, "more": [like_inner]})
    loaded = tk.load(tk.save(deep, tmp_path / "deep.pt"), like=like)
    tk.testing.assert_trees_equal(loaded, deep)
    assert loaded.slots["gan"]["disc"].slots == {"ema": {"decay": 0.9}}


def test_nested_state_mismatches_name_the_slot(tmp_path):
    path = tk.save(_trained_two(), tmp_path / "gan.pt")
    torch.manual_seed(0)
    wider = _two_models().replace(slots={"disc": tk.TrainState.create(torch.nn.Linear(2, 3), tk.optim.sgd(0.05, momentum=0.9))})
    with pytest.raises(tk.CheckpointError) as e:
        tk.load(path, like=wider)
    msg = str(e.value)
    assert msg.startswith(f"load: '{path}' was saved from another model (the TrainState at slots['disc']):\n  - param")
    assert "param missing from the file: ['weight', 'bias']" in msg and "Build the same module" in msg
    other_tx = _two_models()
    other_tx = other_tx.replace(slots={"disc": tk.TrainState.create(Disc(), tk.optim.adam(1e-3))})
    with pytest.raises(tk.CheckpointError, match=r"different optimizer state .*\(the TrainState at slots\['disc'\]\)"):
        tk.load(path, like=other_tx)
    with pytest.raises(tk.CheckpointError, match=r"holds a TrainState at slots\['disc'\], but like= has nothing there"):
        tk.load(path, like=_two_models().replace(slots={}))
    plain = tk.save(_two_models().replace(slots={"disc": {"x": torch.ones(1)}}), tmp_path / "plain.pt")
    with pytest.raises(tk.CheckpointError, match=r"holds a dict at slots\['disc'\], but like= has a TrainState there"):
        tk.load(plain, like=_two_models())
    none = tk.save(_two_models().replace(slots={}), tmp_path / "none.pt")
    with pytest.raises(tk.CheckpointError, match=r"holds nothing at slots\['disc'\], but like= has a TrainState there"):
        tk.load(none, like=_two_models())


def test_foreign_objects_in_slots_say_what_to_do(tmp_path):
    s = _state()
    with pytest.raises(TypeError) as e:
        tk.save(s.replace(slots={"opt": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)}), tmp_path / "a.pt")
    msg = str(e.value)
    assert msg.startswith("save: slots['opt'] is a SGD; checkpoints hold only tensors")
    assert "Keep its tensors and numbers in the slot instead" in msg and "TrainState" in msg
    with pytest.raises(TypeError, match=r"save: meta\['state'\] is a TrainState"):
        tk.save(s, tmp_path / "a.pt", meta={"state": s})
    with pytest.raises(TypeError, match=r"save: slots\['x'\] has the key '__trainkit__'"):
        tk.save(s.replace(slots={"x": {"__trainkit__": "TrainState"}}), tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()


def test_fit_resumes_a_two_model_run_bit_identically(tmp_path):
    data = _gan_data(4)
    full, _ = tk.fit(two_model_step, _two_models(), data, epochs=3, progress=False)
    ck = tk.Checkpointer(tmp_path, every_n_steps=3)
    tk.fit(two_model_step, _two_models(), data, max_steps=6, checkpoint=ck, progress=False)  # stops mid-epoch 2
    assert ck.latest().name == NAME(6)
    resumed, history = tk.fit(two_model_step, _two_models(), data, epochs=3, checkpoint=ck, resume="latest", progress=False)
    assert resumed.step == 12 and resumed.slots["disc"].step == 12
    tk.testing.assert_trees_equal(resumed, full)

"""early_stop: Keras/Lightning semantics, table-driven; the demo stops on val_loss; restore_best; resume; ranks agree."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk
from trainkit.transforms.early_stop import decide

NAN, INF = float("nan"), float("inf")


def replay(values, key="m"):
    """A step that reports values[state.step] under ``key`` (stands for one evaluation each call)."""

    def step(state, batch):
        return state.replace(step=state.step + 1), {key: torch.tensor(values[state.step], dtype=torch.float64)}

    return step


def run(values, **kw):
    """(1-based evaluation at which it stopped or None, best evaluation, best value, reason)."""
    step = tk.early_stop(replay(values), monitor="m", **kw)
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    for _ in values:
        state, _ = step(state, None)
        if tk.should_stop(state):
            break
    s = state.slots["early_stop"]
    return s["stopped_evaluation"], s["best_evaluation"], s["best"], s["reason"]


# (values, kwargs, stop evaluation, best evaluation): patience counts evaluations without improvement,
# the run stops on the patience-th; improvement is strict and must beat min_delta; thresholds come first.
TABLE = [
    ("improving", [1.0, 0.9, 0.8, 0.7, 0.6], {"patience": 1}, None, 5),
    ("plateau", [1.0, 0.9, 0.95, 0.95, 0.91], {"patience": 3}, 5, 2),
    ("patience 1", [1.0, 1.1], {"patience": 1}, 2, 1),
    ("recovers in time", [1.0, 1.1, 1.2, 0.5, 0.6, 0.7, 0.8], {"patience": 3}, 7, 4),
    ("exact tie is no improvement", [1.0, 1.0, 1.0, 1.0], {"patience": 3}, 4, 1),
    # (values exact in binary, so that the ties are ties: 1.75 + 0.25 == 2.0 is no improvement on 2.0)
    ("tie within min_delta", [2.0, 1.875, 1.75, 1.5, 1.375, 1.25, 1.25], {"patience": 3, "min_delta": 0.25}, 7, 4),
    ("min_delta sign ignored", [2.0, 1.875, 1.75, 1.5, 1.375, 1.25, 1.25], {"patience": 3, "min_delta": -0.25}, 7, 4),
    ("non-improving never moves best", [1.0, 0.5, 0.55, 0.52, 0.51], {"patience": 3, "min_delta": 0.1}, 5, 2),
    ("mode max", [0.5, 0.6, 0.6, 0.55, 0.58], {"patience": 3, "mode": "max"}, 5, 2),
    ("mode max min_delta", [0.5, 0.55, 0.61, 0.65, 0.7], {"patience": 2, "mode": "max", "min_delta": 0.1}, 5, 3),
    ("nan stops at once", [1.0, 0.9, NAN, 0.1], {"patience": 3}, 3, 2),
    ("inf stops at once", [1.0, INF], {"patience": 3}, 2, 1),
    ("nan on first evaluation", [NAN], {}, 1, None),
    ("nan, check_finite off: never improves", [1.0, NAN, NAN, NAN], {"patience": 3, "check_finite": False}, 4, 1),
    ("stopping threshold strict", [1.0, 0.6, 0.5, 0.49, 0.1], {"patience": 5, "stopping_threshold": 0.5}, 4, 3),
    ("stopping threshold at first", [0.1, 0.05], {"stopping_threshold": 0.5}, 1, None),
    ("divergence threshold strict", [1.0, 1.5, 2.0, 2.1], {"patience": 5, "divergence_threshold": 2.0}, 4, 1),
    ("max mode thresholds", [0.5, 0.95], {"mode": "max", "stopping_threshold": 0.9, "divergence_threshold": 0.1}, 2, 1),
    ("max mode divergence", [0.5, 0.6, 0.05], {"mode": "max", "divergence_threshold": 0.1}, 3, 2),
    ("nan checked before thresholds", [1.0, NAN], {"divergence_threshold": 5.0}, 2, 1),
]


@pytest.mark.parametrize("values,kw,stop_at,best_at", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_stopping_evaluation_follows_keras_and_lightning(values, kw, stop_at, best_at):
    stopped, best_evaluation, best, reason = run(values, **kw)
    assert (stopped, best_evaluation) == (stop_at, best_at)
    if best_at is not None:
        assert best == values[best_at - 1]
    if stop_at is None:
        assert reason is None
    else:
        assert f"evaluation {stop_at}" in reason
        if best_at is not None:
            assert f"at evaluation {best_at}" in reason


def test_reasons_say_why_and_where():
    assert "'m' is nan at evaluation 3 (check_finite=True); best 0.9 at evaluation 2" in run([1.0, 0.9, NAN])[3]
    assert (
        "did not improve for 2 evaluations (patience=2); stopped at evaluation 3, best 1 at evaluation 1"
        in run([1.0, 2.0, 3.0], patience=2)[3]
    )
    assert "reached stopping_threshold=0.5 at evaluation 2" in run([1.0, 0.4], stopping_threshold=0.5)[3]
    assert "passed divergence_threshold=3.0 at evaluation 2" in run([1.0, 4.0], divergence_threshold=3.0)[3]
    assert "'m' is nan at evaluation 2" in run([1.0, NAN], divergence_threshold=5.0, stopping_threshold=0.5)[3]


def test_decide_is_the_rule_the_transform_uses():
    cfg = {
        "monitor": "m",
        "mode": "min",
        "patience": 2,
        "min_delta": 0.0,
        "check_finite": True,
        "stopping_threshold": None,
        "divergence_threshold": None,
    }
    slot = {"best": None, "wait": 0, "evaluations": 0, "best_evaluation": None, "stop": False}
    history = []
    for v in (3.0, 2.0, 2.5, 1.0, 1.5, 1.2):
        slot, improved = decide(slot, v, cfg)
        history.append((improved, slot["wait"], slot["stop"]))
    assert history == [(True, 0, False), (True, 0, False), (False, 1, False), (True, 0, False), (False, 1, False), (False, 2, True)]


# --------------------------------------------------------------------------- restore_best


def regression_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.3 * torch.randn(n, 1, generator=g)
    return x, y


def mse_step(state, batch):
    x, y = batch
    loss, grads = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x, train=True)[0], y))(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def mse_eval(state, batch):
    x, y = batch
    return {"loss": F.mse_loss(state.apply(None, x)[0], y)}


def record_params(log):
    """A transform recording a copy of the params after every call (placed inside early_stop)."""

    def transform(step):
        def wrapped(state, data):
            state, metrics = step(state, data)
            log.append({k: v.detach().clone() for k, v in state.params.items()})
            return state, metrics

        wrapped.__trainkit_level__ = getattr(step, "__trainkit_level__", "batch")
        return wrapped

    return transform


def test_restore_best_hands_back_the_params_of_the_best_evaluation_under_fit():
    # A batch-level early_stop under fit (which donates: params are updated in place), monitoring
    # a noisy quantity, so the best evaluation is not the last one.
    noisy = [3.0, 2.0, 2.5, 1.0, 1.4, 1.3, 1.2, 0.9, 1.1]

    def step(state, batch):
        new, m = mse_step(state, batch)
        return new, {**m, "noisy": torch.tensor(noisy[state.step])}

    log = []
    wrapped = tk.early_stop(record_params(log)(step), monitor="noisy", patience=3, restore_best=True)
    x, y = regression_data()
    state = tk.TrainState.create(torch.nn.Linear(5, 1), tk.optim.sgd(0.05))
    final, history = tk.fit(wrapped, state, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)], epochs=3, progress=False)
    es = final.slots["early_stop"]
    assert (es["stopped_evaluation"], es["best_evaluation"]) == (7, 4)
    assert final.step == 7 and len(log) == 7
    tk.testing.assert_trees_equal({k: v.detach() for k, v in final.params.items()}, log[3])
    assert not torch.equal(log[3]["weight"], log[6]["weight"])
    assert all(p.requires_grad for p in final.params.values())


def test_best_state_after_a_run_that_did_not_stop():
    log = []
    x, y = regression_data()
    step = tk.early_stop(record_params(log)(tk.epoch_step(mse_step, mse_eval)), monitor="val_loss", patience=50, restore_best=True)
    val = [(x[:64], y[:64])]
    # Heavy momentum overshoots: val_loss goes down, then up again, so the best is not the last epoch.
    final, history = tk.fit(
        step,
        tk.TrainState.create(torch.nn.Linear(5, 1), tk.optim.sgd(0.5, momentum=0.5)),
        [(x[64:], y[64:])],
        epochs=6,
        val_loader=val,
        progress=False,
    )
    es = final.slots["early_stop"]
    assert not es["stop"] and es["evaluations"] == 6
    assert es["best_evaluation"] == 5 < len(history)
    best = tk.early_stop.best_state(final)
    tk.testing.assert_trees_equal({k: v.detach() for k, v in best.params.items()}, log[es["best_evaluation"] - 1])
    assert tk.evaluate(mse_eval, best, val)["loss"] == min(h["val_loss"] for h in history)
    with pytest.raises(ValueError, match="without restore_best=True"):
        tk.early_stop.best_state(tk.early_stop(replay([1.0]), monitor="m")(final.replace(slots={}, step=0), None)[0])


@pytest.mark.slow
def test_demo_with_early_stopping_on_val_loss_stops_and_restores_the_best_epoch(tmp_path):
    from trainkit.demo import eval_step, main

    out = main(["--logdir", str(tmp_path), "--no-progress", "--epochs", "30", "--early-stop"])
    history, state = out["history"], out["state"]
    es = state.slots["early_stop"]
    assert es["stop"] and len(history) == es["stopped_evaluation"] < 30
    assert es["stopped_evaluation"] - es["best_evaluation"] == 3  # patience 3
    val_losses = [h["val_loss"] for h in history]
    assert es["best_evaluation"] == 1 + val_losses.index(min(val_losses))
    # The returned params (and BatchNorm buffers) are the best epoch's: they give its val_loss again.
    val = tk.data.loaders(tk.data.digits(seed=0), 64)[1]
    again = tk.evaluate(eval_step, state, val)["loss"]
    assert again == pytest.approx(val_losses[es["best_evaluation"] - 1], rel=1e-6, abs=0)
    assert again != pytest.approx(val_losses[-1], rel=1e-3)
    assert out["test_acc"] >= 0.95


# --------------------------------------------------------------------------- checkpoint and resume


class Crash(RuntimeError):
    pass


def resumable_run(directory, crash_at=None, resume=None):
    x, y = regression_data(seed=1)
    train = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16, shuffle=True)
    val = [(x[:64], y[:64])]

    def step(state, batch):
        if crash_at is not None and state.step == crash_at:
            raise Crash(f"killed at step {crash_at}")
        return mse_step(state, batch)

    wrapped = tk.early_stop(tk.epoch_step(step, mse_eval), monitor="val_loss", patience=2, min_delta=1e-3, restore_best=True)
    torch.manual_seed(3)
    state = tk.TrainState.create(torch.nn.Linear(5, 1), tk.optim.sgd(0.02, momentum=0.9), seed=3)
    ck = tk.Checkpointer(directory, every_n_steps=5, keep_last=2)
    return tk.fit(wrapped, state, train, epochs=60, val_loader=val, checkpoint=ck, resume=resume, progress=False)


def test_a_resumed_run_stops_at_the_same_epoch_as_an_uninterrupted_one(tmp_path):
    ref_state, ref_history = resumable_run(tmp_path / "ref")
    es = ref_state.slots["early_stop"]
    assert es["stop"] and 4 <= len(ref_history) < 60
    # Interrupted mid-epoch, after some evaluations, before the stop; then resumed from the latest checkpoint.
    crash = (len(ref_history) - 1) * 12 + 7
    with pytest.raises(Crash):
        resumable_run(tmp_path / "run", crash_at=crash)
    state, history = resumable_run(tmp_path / "run", resume="latest")
    # Same epochs, same validation losses bit for bit. (The train_* means of the epoch that was
    # resumed mid-way cover the batches after the restart only: fit does not checkpoint partial means.)
    assert [(h["epoch"], h["step"], h["val_loss"]) for h in history] == [(h["epoch"], h["step"], h["val_loss"]) for h in ref_history]
    tk.testing.assert_trees_equal(state.slots["early_stop"], es)
    tk.testing.assert_trees_equal(state.params, ref_state.params)  # the restored best params
    # Resuming a run that has already stopped does not train on.
    again, history2 = resumable_run(tmp_path / "run", resume="latest")
    assert again.step == state.step and history2 == history


# --------------------------------------------------------------------------- purity, placement, errors


def test_passes_check_step_around_a_batch_step_and_an_epoch_step():
    x, y = regression_data()
    state = tk.TrainState.create(torch.nn.Linear(5, 1), tk.optim.adam(1e-2))
    new, _ = tk.testing.check_step(tk.early_stop(mse_step, monitor="loss", restore_best=True), state, (x[:32], y[:32]))
    assert new.slots["early_stop"]["best_evaluation"] == 1 and new.slots["early_stop"]["best_params"] is not None
    # An epoch step's metrics are epoch means, floats on the CPU, so check_step (which wants tensors) does
    # not apply; check what it checks by hand: the input state untouched, two calls bit-identical.
    epoch = tk.early_stop(tk.epoch_step(mse_step, mse_eval), monitor="val_loss", restore_best=True)
    data = tk.EpochData(train=[(x[:32], y[:32]), (x[32:64], y[32:64])], val=[(x[64:], y[64:])])
    before = tk.testing.snapshot(state)
    first, second = epoch(state, data), epoch(state, data)
    tk.testing.assert_trees_equal(tk.testing.snapshot(state), before)  # (path, value, version counter) of every leaf
    tk.testing.assert_trees_equal(second, first)
    new, metrics = first
    assert tk.is_epoch_step(epoch) and new.step == 2 and "val_loss" in metrics
    assert new.slots["early_stop"]["best"] == metrics["val_loss"]


def test_errors_say_what_to_fix():
    with pytest.raises(
        KeyError, match=r"monitor='val_loss' is not among the metrics the step returned: \['train_loss'\]\. There are no val_\*"
    ):
        tk.early_stop(tk.epoch_step(mse_step), monitor="val_loss")(
            tk.TrainState.create(torch.nn.Linear(5, 1), tk.optim.sgd(0.1)), tk.EpochData(train=[regression_data(8)])
        )
    with pytest.raises(KeyError, match=r"monitor='acc' is not among .*\['loss'\]"):
        tk.early_stop(mse_step, monitor="acc")(tk.TrainState.create(torch.nn.Linear(5, 1), tk.optim.sgd(0.1)), regression_data(8))
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        tk.early_stop(monitor="loss", patience=0)
    with pytest.raises(ValueError, match='mode must be "min"'):
        tk.early_stop(monitor="loss", mode="lower")
    with pytest.raises(ValueError, match="stopping_threshold .* must be below the divergence_threshold"):
        tk.early_stop(monitor="loss", stopping_threshold=2.0, divergence_threshold=1.0)
    with pytest.raises(TypeError, match="monitor must be the name of a metric"):
        tk.early_stop(mse_step, monitor=["val_loss"])
    with pytest.raises(ValueError, match="already wrapped by early_stop"):
        tk.compose(tk.early_stop(monitor="loss"), tk.early_stop(monitor="loss"))(mse_step)


# --------------------------------------------------------------------------- ranks agree


WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, trainkit as tk
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Rank 1 sees other values: alone it would stop at evaluation 2; rank 0 would not stop.
    values = [1.0, 0.9, 0.8, 0.7] if rank == 0 else [1.0, 2.0, 3.0, 4.0]
    report = lambda s, b: (s.replace(step=s.step + 1), {"m": torch.tensor(values[s.step], dtype=torch.float64)})
    step = tk.early_stop(report, monitor="m", patience=1)
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    for _ in values:
        state, _ = step(state, None)
    es = state.slots["early_stop"]
    loss = lambda s, b: (s, {"loss": torch.tensor(float(10 * rank + s.lr))})  # rank 1: 10 more
    sweep = tk.lr_range_test(loss, min_lr=1.0, max_lr=4.0, num_steps=4, mode="linear")
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    for _ in range(4):
        state, _ = sweep(state, None)
    print("RESULT", rank, es["stop"], es["best"], es["evaluations"], state.slots["lr_range_test"]["losses"], flush=True)
    dist.destroy_process_group()
    """
)


def test_every_rank_takes_rank_zeros_decision(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        results.append(next(line for line in out.splitlines() if line.startswith("RESULT")).split(maxsplit=2)[2])
    assert results[0] == results[1] == "False 0.7 4 [1.0, 2.0, 3.0, 4.0]"

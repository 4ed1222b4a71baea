"""fit / evaluate / epoch_step: the fold, its host syncs, and its errors."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

import trainkit as tk
from trainkit.demo import CNN, eval_step, train_step


def _linear_step(state, batch):
    x, y = batch
    loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(g), {"loss": loss}


def _data(n_batches=4, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, generator=g), torch.randn(bs, 1, generator=g)) for _ in range(n_batches)]


def _state(lr=0.05):
    torch.manual_seed(0)
    return tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(lr))


def test_fit_equals_a_hand_folded_loop_and_leaves_caller_state_intact():
    state = _state()
    before = tk.testing.snapshot(state)
    data = _data()
    new, history = tk.fit(_linear_step, state, data, epochs=3, progress=False)
    ref = state
    for _ in range(3):
        for b in data:
            ref, _ = _linear_step(ref, b)
    tk.testing.assert_trees_equal(new.params, ref.params)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["step"] == 12
    tk.testing._assert_unchanged(before, state, "fit")


def test_epoch_metrics_are_batch_size_weighted():
    state = _state()
    data = [(torch.zeros(1, 3), torch.zeros(1, 1)), (torch.zeros(3, 3), torch.zeros(3, 1))]

    def step(s, b):
        s2, _ = _linear_step(s, b)
        return s2, {"n": torch.tensor(float(len(b[0])))}

    _, history = tk.fit(step, state, data, epochs=1, progress=False)
    assert history[0]["train_n"] == pytest.approx((1 * 1 + 3 * 3) / 4)


def test_validation_and_max_steps():
    state = _state()
    data = _data(5)
    evals = lambda s, b: {"loss": F.mse_loss(s.apply(None, b[0])[0], b[1])}
    new, history = tk.fit(_linear_step, state, data, epochs=10, max_steps=7, eval_step=evals, val_loader=data, progress=False)
    assert new.step == 7 and len(history) == 2 and "val_loss" in history[-1]
    assert tk.evaluate(evals, new, data)["loss"] == pytest.approx(history[-1]["val_loss"])


def test_epoch_step_is_a_step_too():
    epoch = tk.epoch_step(_linear_step, eval_step=lambda s, b: {"loss": torch.tensor(1.0)})
    assert tk.is_epoch_step(epoch)
    s, m = epoch(_state(), tk.EpochData(train=_data(), val=_data(1)))
    assert s.step == 4 and set(m) == {"train_loss", "val_loss"}
    new, history = tk.fit(epoch, _state(), _data(), val_loader=_data(1), epochs=2, progress=False)
    assert new.step == 8 and history[-1]["val_loss"] == 1.0


def test_stop_requested_by_a_slot_ends_the_run():
    def stopping(s, b):
        s, m = _linear_step(s, b)
        return s.replace(slots={"mine": {"stop": s.step >= 3}}), m

    new, history = tk.fit(stopping, _state(), _data(10), epochs=5, progress=False)
    assert new.step == 3 and len(history) == 1


def test_non_finite_loss_names_the_step():
    def nan_at_5(s, b):
        s, m = _linear_step(s, b)
        return s, {"loss": m["loss"] * (math.nan if s.step == 5 else 1.0)}

    with pytest.raises(FloatingPointError, match="metric 'loss' is nan at step 5"):
        tk.fit(nan_at_5, _state(), _data(), epochs=3, progress=False)
    tk.fit(nan_at_5, _state(), _data(), epochs=3, progress=False, check_finite=False)


@pytest.mark.parametrize(
    "step_out, match",
    [
        (lambda s, m: m["loss"], r"must return \(state, metrics\).*got Tensor"),
        (lambda s, m: (m, s), r"got tuple\(dict, TrainState\)"),
        (lambda s, m: (s, m["loss"]), r"got tuple\(TrainState, Tensor\)"),
    ],
)
def test_step_with_wrong_return_gets_a_clear_error(step_out, match):
    def bad(s, b):
        return step_out(*_linear_step(s, b))

    with pytest.raises(TypeError, match=match):
        tk.fit(bad, _state(), _data(), epochs=1, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "give epochs=N or max_steps=N"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"epochs": 1, "val_loader": [1]}, "val_loader given without eval_step"),
        ({"epochs": 1, "resume": "latest"}, "needs checkpoint=Checkpointer"),
        ({"epochs": 1, "eval_step": lambda s, b: {}, "epoch_level": True}, "pass eval_step to tk.epoch_step"),
    ],
)
def test_bad_fit_arguments(kwargs, match):
    step = tk.epoch_step(_linear_step) if kwargs.pop("epoch_level", False) else _linear_step
    with pytest.raises(ValueError, match=match):
        tk.fit(step, _state(), _data(), progress=False, **kwargs)


def test_fit_rejects_a_module_as_state():
    with pytest.raises(TypeError, match="state must be a TrainState"):
        tk.fit(_linear_step, torch.nn.Linear(1, 1), _data(), epochs=1)


def test_non_scalar_metric_is_rejected():
    def bad(s, b):
        s, m = _linear_step(s, b)
        return s, {"per_sample": torch.zeros(8)}

    with pytest.raises(ValueError, match="metric 'per_sample' must be a scalar"):
        tk.fit(bad, _state(), _data(), epochs=1, progress=False)


def test_progress_is_plain_lines_when_not_a_terminal(capfd):
    # nohup, SLURM, CI: no bar, but one line per epoch (train and val metrics), and every N steps if asked
    evals = lambda s, b: {"loss": F.mse_loss(s.apply(None, b[0])[0], b[1])}
    tk.fit(_linear_step, _state(), _data(), epochs=2, eval_step=evals, val_loader=_data(1), progress=True)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 2, err
    assert lines[0].startswith("fit: epoch 1/2 step 4: train_loss ") and " val_loss " in lines[0]
    tk.fit(_linear_step, _state(), _data(), epochs=1, progress=2)
    lines = capfd.readouterr().err.strip().splitlines()
    assert [ln.split(":")[1].strip() for ln in lines] == ["epoch 1/1 step 2", "epoch 1/1 step 4", "epoch 1/1 step 4"]
    tk.fit(_linear_step, _state(), _data(), epochs=1, progress=False)
    assert capfd.readouterr() == ("", "")


def test_shuffled_epochs_are_seeded_by_state_rng():
    x = torch.arange(32.0).reshape(16, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:, :1].expand(16, 3).contiguous(), x[:, 1:]),
                                         batch_size=4, shuffle=True)
    torch.manual_seed(1)
    a, _ = tk.fit(_linear_step, _state(), loader, epochs=2, progress=False)
    torch.manual_seed(2)  # the global seed does not matter: the state's rng does
    b, _ = tk.fit(_linear_step, _state(), loader, epochs=2, progress=False)
    tk.testing.assert_trees_equal(a.params, b.params)


def test_demo_cnn_trains_through_fit():
    torch.manual_seed(0)
    splits = tk.data.digits()
    train, val, test = tk.data.loaders(splits, 64)
    state = tk.TrainState.create(CNN(), tk.optim.adam(3e-3))
    state, history = tk.fit(train_step, state, train, epochs=2, eval_step=eval_step, val_loader=val, progress=False)
    assert history[-1]["val_acc"] > 0.8


def test_resume_latest_without_checkpoints_starts_afresh_and_keeps_caller_state(tmp_path):
    state = _state()
    before = tk.testing.snapshot(state)
    ck = tk.Checkpointer(tmp_path)
    new, history = tk.fit(_linear_step, state, _data(), epochs=2, checkpoint=ck, resume="latest", progress=False)
    tk.testing._assert_unchanged(before, state, "fit")
    assert new.step == 8 and [p.name for p in ck.checkpoints()] == ["step-000000004.pt", "step-000000008.pt"]
    again, history2 = tk.fit(_linear_step, state, _data(), epochs=3, checkpoint=ck, resume="latest", progress=False)
    assert again.step == 12 and [h["epoch"] for h in history2] == [1, 2, 3] and history2[:2] == history


def test_resume_after_max_steps_cut_an_epoch_continues_that_epoch(tmp_path):
    data = _data(4)
    full, full_history = tk.fit(_linear_step, _state(), data, epochs=3, progress=False)
    ck = tk.Checkpointer(tmp_path)
    cut, cut_history = tk.fit(_linear_step, _state(), data, epochs=3, max_steps=6, checkpoint=ck, progress=False)
    assert cut.step == 6 and [h["epoch"] for h in cut_history] == [1, 2]
    resumed, history = tk.fit(_linear_step, _state(), data, epochs=3, checkpoint=ck, resume="latest", progress=False)
    assert resumed.step == 12 and [h["epoch"] for h in history] == [1, 2, 3]
    tk.testing.assert_trees_equal(resumed.params, full.params)
    assert history == full_history  # the cut epoch's means include the batches before the cut


def _k_steps(k):
    """A step running k single steps a call over a list of batches, as tk.jit(step, steps_per_call=k) does."""

    def step(state, batches):
        ms = []
        for b in batches:
            state, m = _linear_step(state, b)
            ms.append(m)
        return state, {key: torch.stack([m[key] for m in ms]) for key in ms[0]}

    step.steps_per_call = k
    return step


def test_the_fold_feeds_k_batches_a_call_and_observers_see_every_step(tmp_path):
    data = _data(7)
    logger = tk.CSVLogger(tmp_path, name="k")
    ckpt = tk.Checkpointer(tmp_path / "ckpt", every_n_steps=4, keep_last=10)
    s_k, h_k = tk.fit(_k_steps(3), _state(), data, epochs=2, max_steps=11, logger=logger, checkpoint=ckpt, log_every=2, progress=False)
    s_1, h_1 = tk.fit(_linear_step, _state(), data, epochs=2, max_steps=11, progress=False)
    tk.testing.assert_trees_equal(s_k.params, s_1.params)
    assert s_k.step == 11 and [h["step"] for h in h_k] == [h["step"] for h in h_1] == [7, 11]  # groups never pass max_steps
    assert [h["train_loss"] for h in h_k] == pytest.approx([h["train_loss"] for h in h_1])
    logged = [int(r["step"]) for r in csv.DictReader(open(logger.path)) if r.get("train/loss")]
    assert logged == [2, 4, 6, 8, 10]  # every log_every step, from inside the groups
    # a checkpoint is written at the end of a call that passed a due step (4: after 6; 8: after 10), and at
    # the epoch's end (7) and the cut (11); groups restart with each epoch (3, 3, 1 | 3, 1)
    saved = sorted(int(p.stem.split("-")[1]) for p in ckpt.checkpoints())
    assert saved == [6, 7, 10, 11]
    resumed, _ = tk.fit(_k_steps(3), _state(), data, epochs=2, max_steps=11, checkpoint=tk.Checkpointer(tmp_path / "ckpt"),
                        resume=tmp_path / "ckpt" / "step-000000006.pt", progress=False)
    tk.testing.assert_trees_equal(resumed.params, s_1.params)

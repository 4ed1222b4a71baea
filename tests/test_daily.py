"""What Lightning users reach for every day (issue 12): predict, whole-set metrics, readable progress,
the LR in the logs, debug loaders, per-step noise from the state's seed."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import trainkit as tk

WORKER = Path(__file__).parent / "workers" / "wholeset_worker.py"
spec = importlib.util.spec_from_file_location("wholeset_worker", WORKER)
W = importlib.util.module_from_spec(spec)
spec.loader.exec_module(W)


def test_predict_concatenates_in_order_without_grad_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    state = tk.TrainState.create(model, tk.optim.sgd(0.1))
    loader = DataLoader(W.data(), batch_size=8)
    out = tk.predict(lambda s, b: s.apply(None, b[0])[0], state, loader)
    x = W.data().tensors[0]
    assert out.shape == (45, 2) and not out.requires_grad
    assert torch.allclose(out, tk.to_module(state)(x))  # eval mode: no dropout
    pairs = tk.predict(lambda s, b: {"logits": s.apply(None, b[0])[0], "y": b[1]}, state, loader)
    assert torch.equal(pairs["y"], W.data().tensors[1])
    names = tk.predict(lambda s, b: [f"row{int(v)}" for v in b], state, [torch.arange(3), torch.arange(3, 5)])
    assert names == ["row0", "row1", "row2", "row3", "row4"]


def test_whole_set_f1_and_auroc_equal_scikit_learn_on_the_concatenated_predictions():
    from sklearn.metrics import f1_score, roc_auc_score

    state = W.make_state()
    loader = DataLoader(W.data(), batch_size=8)
    got = tk.evaluate(W.eval_step, state, loader, finalize=W.finalize)
    x, y = W.data().tensors
    score = state.apply(None, x)[0].softmax(-1)[:, 1].detach().numpy()
    assert got["f1"] == pytest.approx(f1_score(y.numpy(), score > 0.5))
    assert got["auroc"] == pytest.approx(roc_auc_score(y.numpy(), score))
    per_batch = [roc_auc_score(yb.numpy(), state.apply(None, xb)[0].softmax(-1)[:, 1].detach().numpy())
                 for xb, yb in loader if 0 < int(yb.sum()) < len(yb)]
    assert abs(sum(per_batch) / len(per_batch) - got["auroc"]) > 1e-3  # why a mean of batches will not do
    # the same through an epoch step: val_f1 and val_auroc in the history
    epoch = tk.epoch_step(W.train_step, W.eval_step, finalize=W.finalize)
    _, history = tk.fit(epoch, state, DataLoader(W.data(32, 1), batch_size=8), val_loader=loader, epochs=1, progress=False)
    assert {"val_f1", "val_auroc", "val_loss", "train_loss"} <= set(history[0]) and history[0]["val_n"] == 45.0
    with pytest.raises(ValueError, match="no finalize function"):
        tk.evaluate(W.eval_step, state, loader)


@pytest.mark.slow
def test_predict_and_whole_set_metrics_on_two_ranks_equal_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    state = W.make_state()
    loader = DataLoader(W.data(), batch_size=8)
    want_preds = tk.predict(lambda s, b: s.apply(None, b[0])[0], state, loader)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.allclose(got["preds"], want_preds, atol=1e-6)  # every rank has all rows, in order
        row = got["history"][0]
        assert row["val_n"] == 45.0  # every sample once, from both ranks
        trained = state.replace(params=got["params"])
        want = tk.evaluate(W.eval_step, trained, loader, finalize=W.finalize)
        assert row["val_f1"] == pytest.approx(want["f1"]) and row["val_auroc"] == pytest.approx(want["auroc"])


def _step(state, batch):
    x, y = batch
    loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(g), {"loss": loss}


def _batches(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def test_the_lr_is_logged_every_log_every_steps(tmp_path):
    schedule = tk.optim.linear_schedule(0.1, 0.0, 6)
    state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(schedule))
    logger = tk.CSVLogger(tmp_path, name="run")
    tk.fit(_step, state, _batches(), epochs=1, logger=logger, log_every=2, progress=False)
    lrs = [(int(r["step"]), float(r["train/lr"])) for r in csv.DictReader(open(logger.path)) if r.get("train/lr")]
    assert lrs == [(2, pytest.approx(schedule(2))), (4, pytest.approx(schedule(4))), (6, pytest.approx(schedule(6)))]


def test_debug_loaders_limit_overfit_and_dev_run():
    state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.1))
    new, history = tk.fit(_step, state, tk.debug.limit(_batches(), 2), epochs=3, progress=False)
    assert new.step == 6 and len(history) == 3
    few = tk.debug.overfit(iter(_batches()), 1)
    new, history = tk.fit(_step, tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.adam(0.05)), few, epochs=200, progress=False)
    assert history[-1]["train_loss"] < 0.05 * history[0]["train_loss"]  # one batch of 4 rows, learnt by heart
    evals = lambda s, b: {"loss": F.mse_loss(s.apply(None, b[0])[0], b[1])}
    new, history = tk.debug.dev_run(_step, state, _batches(), eval_step=evals, val_loader=_batches(), progress=False)
    assert new.step == 1 and "val_loss" in history[0]
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        tk.debug.limit(_batches(), 0)


def test_noise_from_the_state_seed_is_per_step_per_stream_and_reproducible():
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1), seed=7)
    draw = lambda s, stream="noise": torch.randn(4, generator=tk.rng.generator(s, stream))
    assert torch.equal(draw(state), draw(state))
    assert not torch.equal(draw(state), draw(state.replace(step=1)))
    assert not torch.equal(draw(state), draw(state, "augment"))
    assert not torch.equal(draw(state), draw(state.replace(rng=8)))
    before = torch.random.get_rng_state()
    draw(state)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is untouched

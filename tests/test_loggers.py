"""Loggers write real files that are read back."""

import csv
import json

import torch
import torch.nn.functional as F

import trainkit as tk


def _step(state, batch):
    x, y = batch
    loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(g), {"loss": loss}


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(5)]


def test_tensorboard_event_file_written_by_fit_holds_the_scalars(tmp_path):
    torch.manual_seed(0)
    state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.05))
    logger = tk.TensorBoardLogger(tmp_path, name="exp")
    logger.log_hyperparams({"lr": 0.05, "opt": "sgd"})
    evals = lambda s, b: {"loss": F.mse_loss(s.apply(None, b[0])[0], b[1])}
    state, history = tk.fit(_step, state, _data(), epochs=3, eval_step=evals, val_loader=_data(), logger=logger,
                            log_every=2, progress=False)
    logger.close()
    assert logger.log_dir == tmp_path / "exp" / "version_0"
    scalars = tk.read_scalars(logger.log_dir)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12, 14]
    assert [s for s, _ in scalars["epoch/val_loss"]] == [5, 10, 15]
    for (_, logged), row in zip(scalars["epoch/val_loss"], history):
        assert abs(logged - row["val_loss"]) < 1e-6
    assert json.loads((logger.log_dir / "hparams.json").read_text()) == {"lr": 0.05, "opt": "sgd"}
    assert tk.TensorBoardLogger(tmp_path, name="exp").log_dir.name == "version_1"


def test_csv_logger_grows_columns(tmp_path):
    log = tk.CSVLogger(tmp_path)
    log.log_metrics({"a": 1.0}, 1)
    log.log_metrics({"a": 2.0, "b": 3.0}, 2)
    log.log_metrics({"b": 4.0}, 3)
    rows = list(csv.DictReader(open(log.path)))
    assert rows == [{"step": "1", "a": "1.0", "b": ""}, {"step": "2", "a": "2.0", "b": "3.0"}, {"step": "3", "a": "", "b": "4.0"}]


def test_jsonl_logger_through_fit(tmp_path):
    log = tk.JSONLLogger(tmp_path, name="j")
    state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.05))
    tk.fit(_step, state, _data(), epochs=1, logger=log, log_every=1, progress=False)
    log.close()
    lines = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3, 4, 5]
    assert lines[-1]["epoch/epoch"] == 1

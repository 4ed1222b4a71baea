"""Loggers write real files that are read back."""

import csv
import json
import struct
from pathlib import Path

import pytest
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
    for (_, logged), row in zip(scalars["epoch/val_loss"], history, strict=True):
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


LOGGERS = [tk.TensorBoardLogger, tk.CSVLogger, tk.JSONLLogger]


@pytest.mark.parametrize("cls", LOGGERS)
def test_nothing_on_disk_before_the_first_write(tmp_path, cls):
    log = cls(tmp_path / "runs", name="exp")
    log.flush()
    log.close()
    assert not (tmp_path / "runs").exists()
    log.log_metrics({"loss": 1.0}, 1)
    assert [p.name for p in (tmp_path / "runs" / "exp").iterdir()] == ["version_0"]
    assert log.log_dir == tmp_path / "runs" / "exp" / "version_0"
    log.close()


@pytest.mark.parametrize("cls", LOGGERS)
def test_off_rank_0_every_method_is_a_no_op(tmp_path, monkeypatch, cls):
    monkeypatch.setenv("RANK", "1")  # what torchrun sets for the second process, before init_process_group
    log = cls(tmp_path, name="exp")
    log.log_hyperparams({"lr": 0.1}, metrics={"hp/acc": 0.9})
    log.log_metrics({"loss": 1.0}, 1)
    log.flush()
    log.close()
    assert log.log_dir is None
    assert list(tmp_path.iterdir()) == []


def _hparams_plugin(log_dir):
    """The HPARAMS plugin records of the event files: {tag: HParamsPluginData}."""
    from tensorboardX.proto import event_pb2, plugin_hparams_pb2

    out = {}
    for path in Path(log_dir).glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    out[v.tag] = plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
    return out


def test_tensorboard_hparams_metrics_are_written_and_read_back(tmp_path):
    log = tk.TensorBoardLogger(tmp_path, name="hp")
    log.log_hyperparams({"lr": 0.1, "opt": "adam", "layers": [2, 3]}, metrics={"hp/acc": 0.9, "hp/loss": 0.25})
    log.close()
    assert tk.read_scalars(log.log_dir) == {"hp/acc": [(0, pytest.approx(0.9))], "hp/loss": [(0, 0.25)]}
    plugin = _hparams_plugin(log.log_dir)
    exp = plugin["_hparams_/experiment"].experiment
    assert sorted(m.name.tag for m in exp.metric_infos) == ["hp/acc", "hp/loss"]
    assert sorted(h.name for h in exp.hparam_infos) == ["layers", "lr", "opt"]
    start = plugin["_hparams_/session_start_info"].session_start_info
    assert start.hparams["lr"].number_value == 0.1 and start.hparams["layers"].string_value == "[2, 3]"
    assert json.loads((log.log_dir / "hparams.json").read_text()) == {"lr": 0.1, "opt": "adam", "layers": "[2, 3]"}
    log.log_hyperparams({"lr": 0.1}, metrics={"hp/acc": 0.95}, step=7)  # final metrics, at the last step
    log.close()
    assert tk.read_scalars(log.log_dir)["hp/acc"] == [(0, pytest.approx(0.9)), (7, pytest.approx(0.95))]


def test_csv_and_jsonl_write_hparams_metrics(tmp_path):
    c, j = tk.CSVLogger(tmp_path, name="c"), tk.JSONLLogger(tmp_path, name="j")
    for log in (c, j):
        log.log_hyperparams({"lr": 0.1}, metrics={"hp/acc": 0.9}, step=5)
        log.close()
        assert json.loads((log.log_dir / "hparams.json").read_text()) == {"lr": 0.1}
    assert list(csv.DictReader(open(c.path))) == [{"step": "5", "hp/acc": "0.9"}]
    assert json.loads(j.path.read_text()) == {"step": 5, "hp/acc": 0.9}


@pytest.mark.parametrize("cls", LOGGERS)
def test_name_none_or_empty_puts_versions_under_root(tmp_path, cls):
    for name in (None, ""):
        log = cls(tmp_path, name=name)
        log.log_metrics({"loss": 1.0}, 1)
        log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "version_1"]


def test_bad_arguments_say_what_to_pass(tmp_path):
    (tmp_path / "file").write_text("")
    cases = [
        (dict(root=3), TypeError, r"TensorBoardLogger: root must be a folder path \(str or os.PathLike\), got int. Pass"),
        (dict(root=""), ValueError, "TensorBoardLogger: root is an empty string"),
        (dict(root=tmp_path, name=5), TypeError, "TensorBoardLogger: name must be a str or None, got int. Pass"),
        (dict(root=tmp_path, name="/abs"), ValueError, "name must be a folder inside root, got '/abs'"),
        (dict(root=tmp_path, name="../up"), ValueError, "name must be a folder inside root"),
        (dict(root=tmp_path / "file"), ValueError, "is a file, not a folder"),
        (dict(root=tmp_path, flush_secs=0), ValueError, "flush_secs must be a positive number of seconds, got 0"),
    ]
    for kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            tk.TensorBoardLogger(**kwargs)
    with pytest.raises(TypeError, match="CSVLogger: name must be a str or None"):
        tk.CSVLogger(tmp_path, name=1)
    log = tk.JSONLLogger(tmp_path)
    with pytest.raises(TypeError, match=r"JSONLLogger.log_metrics: metric 'loss' must be a number, got str"):
        log.log_metrics({"loss": "low"}, 1)
    with pytest.raises(TypeError, match=r"JSONLLogger.log_hyperparams: params must be a dict .*, got list"):
        log.log_hyperparams(["lr"])
    assert list(tmp_path.iterdir()) == [tmp_path / "file"], "a refused write creates nothing"


def test_close_is_idempotent_and_a_write_after_close_reopens(tmp_path):
    tb, c, j = tk.TensorBoardLogger(tmp_path, name="tb"), tk.CSVLogger(tmp_path, name="c"), tk.JSONLLogger(tmp_path, name="j")
    for log in (tb, c, j):
        log.log_metrics({"train/loss": 1.0}, 1)
        log.flush()
        log.close()
        log.close()
        log.log_metrics({"test/loss": 0.5}, 2)  # what a user does after fit closed the logger
        log.close()
    assert tk.read_scalars(tb.log_dir) == {"train/loss": [(1, 1.0)], "test/loss": [(2, 0.5)]}
    assert len(list(tb.log_dir.glob("events.out.tfevents.*"))) == 2
    assert list(csv.DictReader(open(c.path))) == [{"step": "1", "train/loss": "1.0", "test/loss": ""},
                                                  {"step": "2", "train/loss": "", "test/loss": "0.5"}]
    assert [json.loads(x) for x in j.path.read_text().splitlines()] == [{"step": 1, "train/loss": 1.0},
                                                                       {"step": 2, "test/loss": 0.5}]


def test_next_version_dir_takes_the_next_free_number(tmp_path):
    (tmp_path / "exp" / "version_3").mkdir(parents=True)
    (tmp_path / "exp" / "version_x").mkdir()
    assert tk.loggers.next_version_dir(tmp_path, "exp").name == "version_4"
    assert tk.loggers.next_version_dir(tmp_path, None) == tmp_path / "version_0"


def test_tensorboard_flush_puts_every_logged_scalar_on_disk(tmp_path):
    # tensorboardX's SummaryWriter.flush() did not wait for its writer thread's queue: the scalars
    # logged just before it were often not in the file yet.
    log = tk.TensorBoardLogger(tmp_path, name="f")
    for step in range(1, 51):
        log.log_metrics({"loss": 1.0 / step}, step)
    log.flush()
    assert [s for s, _ in tk.read_scalars(log.log_dir)["loss"]] == list(range(1, 51))
    eager = tk.TensorBoardLogger(tmp_path, name="e", flush_secs=1e-9)  # flushes at every write
    eager.log_metrics({"loss": 2.0}, 1)
    assert tk.read_scalars(eager.log_dir) == {"loss": [(1, 2.0)]}
    log.close()
    eager.close()

"""Loggers: TensorBoard (through tensorboardX) and CSV / JSON Lines files that need no viewer.

A logger is anything with ``log_metrics(metrics: dict[str, float], step: int)``;
``log_hyperparams``, ``flush`` and ``close`` are optional. Loggers receive floats
only: ``fit`` decides when to read the device (at log intervals).
"""

from __future__ import annotations

import csv
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping, Union

__all__ = ["TensorBoardLogger", "CSVLogger", "JSONLLogger", "read_scalars", "next_version_dir"]

PathLike = Union[str, os.PathLike]


def next_version_dir(root: PathLike, name: str) -> Path:
    """``root/name/version_N`` with N one more than the largest there (0 for the first).

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> next_version_dir(root, "demo").name
    'version_0'
    """
    base = Path(root) / name
    versions = [int(m.group(1)) for p in base.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    path = base / f"version_{max(versions) + 1 if versions else 0}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def _clean_hparams(params: Mapping[str, Any]) -> dict[str, Union[bool, int, float, str]]:
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}


class TensorBoardLogger:
    """Write scalars to ``root/name/version_N/`` for TensorBoard (``tensorboard --logdir runs``).

    >>> import tempfile, trainkit as tk
    >>> log = tk.TensorBoardLogger(tempfile.mkdtemp(), name="demo")
    >>> log.log_hyperparams({"lr": 0.1})
    >>> log.log_metrics({"train/loss": 0.5}, step=1)
    >>> log.close()
    >>> tk.read_scalars(log.log_dir)["train/loss"]
    [(1, 0.5)]
    """

    def __init__(self, root: PathLike = "runs", name: str = "default", *, flush_secs: int = 30) -> None:
        from tensorboardX import SummaryWriter

        self.log_dir = next_version_dir(root, name)
        self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=flush_secs)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, float(v), global_step=int(step))

    def log_hyperparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Record hyperparameters (TensorBoard's HPARAMS tab, and ``hparams.json`` beside the events)."""
        from tensorboardX.summary import hparams

        clean = _clean_hparams(params)
        (self.log_dir / "hparams.json").write_text(json.dumps(clean, indent=2))
        for summary in hparams(clean, dict(metrics or {})):
            self._writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class CSVLogger:
    """Append metrics to ``root/name/version_N/metrics.csv`` (one row per ``log_metrics`` call).

    Columns grow as new metric names appear (the file is rewritten then, rarely).

    >>> import tempfile, trainkit as tk
    >>> log = tk.CSVLogger(tempfile.mkdtemp())
    >>> log.log_metrics({"loss": 1.5}, step=3)
    >>> log.close()
    >>> (log.log_dir / "metrics.csv").read_text().splitlines()
    ['step,loss', '3,1.5']
    """

    def __init__(self, root: PathLike = "runs", name: str = "default") -> None:
        self.log_dir = next_version_dir(root, name)
        self.path = self.log_dir / "metrics.csv"
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        new_cols = [k for k in row if k not in self._columns]
        self._rows.append(row)
        if new_cols:
            self._columns += new_cols
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._columns)
            w.writeheader()
            w.writerows(self._rows)
        os.replace(tmp, self.path)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        (self.log_dir / "hparams.json").write_text(json.dumps(_clean_hparams(params), indent=2))

    def close(self) -> None:
        pass


class JSONLLogger:
    """Append one JSON object per ``log_metrics`` call to ``root/name/version_N/metrics.jsonl``.

    >>> import tempfile, json, trainkit as tk
    >>> log = tk.JSONLLogger(tempfile.mkdtemp())
    >>> log.log_metrics({"loss": 1.5}, step=3)
    >>> json.loads((log.log_dir / "metrics.jsonl").read_text())
    {'step': 3, 'loss': 1.5}
    """

    def __init__(self, root: PathLike = "runs", name: str = "default") -> None:
        self.log_dir = next_version_dir(root, name)
        self.path = self.log_dir / "metrics.jsonl"
        self._file = open(self.path, "a")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        (self.log_dir / "hparams.json").write_text(json.dumps(_clean_hparams(params), indent=2))

    def close(self) -> None:
        self._file.close()


def read_scalars(log_dir: PathLike) -> dict[str, list[tuple[int, float]]]:
    """Read back every scalar in the TensorBoard event files of ``log_dir``: ``{tag: [(step, value)]}``.

    Parses the TFRecord framing and the ``Event`` protos directly (no TensorBoard install).
    """
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            start = pos + 12
            record = data[start : start + length]
            pos = start + length + 4
            if len(record) < length:
                break  # a record still being written
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out

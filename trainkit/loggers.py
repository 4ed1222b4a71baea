"""Loggers: TensorBoard (through tensorboardX) and CSV / JSON Lines files that need no viewer.

A logger is anything with ``log_metrics(metrics: dict[str, float], step: int)``;
``log_hyperparams``, ``flush`` and ``close`` are optional. Loggers receive floats
only: ``fit`` decides when to read the device (at log intervals).

These loggers touch the disk only when they first write, and only on rank 0 of
``torch.distributed``: build the same logger on every rank and log from anywhere.
``close()`` is idempotent and a write after it reopens the files, so the runner may
close a logger that the caller goes on using.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Mapping, Union

from . import dist

__all__ = ["TensorBoardLogger", "CSVLogger", "JSONLLogger", "read_scalars", "next_version_dir"]

PathLike = Union[str, os.PathLike]


def _rank() -> int:
    """This process's rank: torch.distributed's once a group is up, else torchrun's ``RANK``, else 0."""
    if dist.is_initialized():
        return dist.rank()
    try:  # torchrun sets RANK before the script runs, so a logger built before init_process_group knows it
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def next_version_dir(root: PathLike, name: str | None = None) -> Path:
    """Create and return ``root/name/version_N``, N one more than the largest there (0 for the first).

    ``name=None`` or ``""`` puts the versions directly under ``root``. Safe against
    another process creating a version at the same time (the next number is taken).

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> next_version_dir(root, "demo").name, next_version_dir(root, "demo").name
    ('version_0', 'version_1')
    """
    base = Path(root) / (name or "")
    base.mkdir(parents=True, exist_ok=True)
    versions = [int(m.group(1)) for p in base.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    n = max(versions) + 1 if versions else 0
    while True:
        path = base / f"version_{n}"
        try:
            path.mkdir(exist_ok=False)
            return path
        except FileExistsError:  # another process took this number first
            n += 1


class _RunFolder:
    """``root/name/version_N``, chosen and created on first use, on rank 0 only."""

    def __init__(self, root: PathLike, name: str | None, who: str) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"{who}: root must be a folder path (str or os.PathLike), got {type(root).__name__}. "
                            "Pass e.g. root='runs'.")
        if str(root) == "":
            raise ValueError(f"{who}: root is an empty string. Pass a folder, e.g. root='runs' (or '.').")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{who}: name must be a str or None, got {type(name).__name__}. "
                            "Pass e.g. name='exp', or name=None for versions directly under root.")
        if name and (Path(name).is_absolute() or ".." in Path(name).parts):
            raise ValueError(f"{who}: name must be a folder inside root, got {name!r}. "
                             "Pass the outer folder as root= and a plain name, e.g. name='exp'.")
        if Path(root).exists() and not Path(root).is_dir():
            raise ValueError(f"{who}: root {str(root)!r} is a file, not a folder. Pass a folder path.")
        self.root, self.name, self._path = Path(root), name or "", None

    @property
    def path(self) -> Path | None:
        if _rank() != 0:
            return None
        if self._path is None:
            self._path = next_version_dir(self.root, self.name)
        return self._path


def _clean_hparams(params: Mapping[str, Any], who: str) -> dict[str, Union[bool, int, float, str]]:
    if not isinstance(params, Mapping):
        raise TypeError(f"{who}: params must be a dict of hyperparameters, got {type(params).__name__}. "
                        "Pass e.g. {'lr': 1e-3, 'batch_size': 64}.")
    return {str(k): v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}


def _floats(metrics: Mapping[str, Any] | None, who: str) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{who}: metrics must be a dict of numbers, got {type(metrics).__name__}. "
                        "Pass e.g. {'val/loss': 0.25}.")
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
            raise TypeError(f"{who}: metric {k!r} must be a number, got {type(v).__name__}. "
                            "Log floats or one-element tensors.") from None
    return out


def _write_hparams(log_dir: Path, params: Mapping[str, Any]) -> None:
    (log_dir / "hparams.json").write_text(json.dumps(params, indent=2))


class _EventFile:
    """One TensorBoard event file, written on the calling thread: after ``flush()`` the events are on disk.

    (tensorboardX's ``SummaryWriter`` queues events for a thread, and its ``flush()`` does not
    wait for the queue: scalars logged just before it could still be missing from the file.)
    Writing here costs ~35 us per ``log_metrics`` call of 3 scalars (measured on the CPU), once per log interval.
    """

    def __init__(self, log_dir: Path, suffix: str, flush_secs: float) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self._writer = EventsWriter(str(log_dir / "events"), suffix)
        self._flush_secs, self._flushed = flush_secs, time.monotonic()

    def add(self, summary: Any, step: int) -> None:
        from tensorboardX.proto import event_pb2

        self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        if time.monotonic() - self._flushed >= self._flush_secs:  # a live TensorBoard sees it this soon
            self.flush()

    def flush(self) -> None:
        self._writer.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self._writer.close()


class TensorBoardLogger:
    """Write scalars to ``root/name/version_N/`` for TensorBoard (``tensorboard --logdir runs``).

    Nothing is created until the first write, and only on rank 0 of ``torch.distributed``
    (``RANK`` under ``torchrun``, before the process group is up): off rank 0 every method
    is a no-op and ``log_dir`` is ``None``. ``log_dir`` is a property: reading it chooses
    and creates the version folder on rank 0 (so that files can be saved beside the logs).
    ``name=None`` (or ``""``) puts the versions directly under ``root``.

    Logged events reach the disk at ``flush()``, at ``close()``, and at the first write
    ``flush_secs`` seconds after the last flush. ``close()`` may be called any number of times; a write
    after it opens a new event file in the same folder, so a closed logger keeps working
    (``fit`` closes it; test metrics logged afterwards still land in the run).

    >>> import tempfile, trainkit as tk
    >>> log = tk.TensorBoardLogger(tempfile.mkdtemp(), name="demo")
    >>> log.log_hyperparams({"lr": 0.1}, metrics={"hp/acc": 0.9})
    >>> log.log_metrics({"train/loss": 0.5}, step=1)
    >>> log.close()
    >>> log.log_metrics({"test/loss": 0.4}, step=1)
    >>> log.close()
    >>> s = tk.read_scalars(log.log_dir)
    >>> s["train/loss"], s["hp/acc"], s["test/loss"]
    ([(1, 0.5)], [(0, 0.9...)], [(1, 0.4...)])
    """

    def __init__(self, root: PathLike = "runs", name: str | None = "default", *, flush_secs: float = 30) -> None:
        self._run = _RunFolder(root, name, "TensorBoardLogger")
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or not flush_secs > 0:
            raise ValueError(f"TensorBoardLogger: flush_secs must be a positive number of seconds, got {flush_secs!r}. "
                             "Pass e.g. flush_secs=30.")
        if importlib.util.find_spec("tensorboardX") is None:
            raise ImportError("TensorBoardLogger: needs tensorboardX, which is not installed. "
                              "pip install tensorboardX, or use CSVLogger / JSONLLogger.")
        self._flush_secs = flush_secs
        self._file: _EventFile | None = None
        self._opened = 0  # event files opened so far: a reopen after close() writes a new one

    @property
    def log_dir(self) -> Path | None:
        """``root/name/version_N`` (created on first use), or ``None`` off rank 0."""
        return self._run.path

    def _open(self) -> _EventFile | None:
        if self._file is None:
            log_dir = self.log_dir
            if log_dir is None:
                return None
            # event files are named by the second and the host: a suffix keeps a reopened one apart
            self._file = _EventFile(log_dir, f".{self._opened}" if self._opened else "", self._flush_secs)
            self._opened += 1
        return self._file

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Add each metric as a scalar at ``step`` (one event)."""
        values = _floats(metrics, "TensorBoardLogger.log_metrics")
        events = self._open()
        if events is not None and values:
            from tensorboardX.summary import Summary, scalar

            events.add(Summary(value=[scalar(k, v).value[0] for k, v in values.items()]), step)

    def log_hyperparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None, *,
                        step: int = 0) -> None:
        """Record hyperparameters, and the metrics they are judged by.

        Writes TensorBoard's HPARAMS plugin records (the hyperparameters and the metric
        names), each metric as a scalar at ``step`` (which the HPARAMS tab shows and
        :func:`read_scalars` reads back), and ``hparams.json`` beside the events.
        """
        clean = _clean_hparams(params, "TensorBoardLogger.log_hyperparams")
        values = _floats(metrics, "TensorBoardLogger.log_hyperparams")
        events = self._open()
        if events is None:
            return
        from tensorboardX.summary import hparams

        _write_hparams(self._run.path, clean)
        for summary in hparams(clean, values):  # experiment, session start, session end
            events.add(summary, 0)
        self.log_metrics(values, step)

    def flush(self) -> None:
        """Write the events logged so far to disk, now."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the event file (again: nothing); a later write opens a new one."""
        if self._file is not None:
            self._file.close()
            self._file = None


class _FileLogger:
    """What the CSV and JSON Lines loggers share: the lazy, rank-0-only run folder, its metrics file,
    and ``log_hyperparams`` (``hparams.json``, and the metrics as one more record)."""

    _FILE = ""

    def __init__(self, root: PathLike = "runs", name: str | None = "default") -> None:
        self._run = _RunFolder(root, name, type(self).__name__)

    @property
    def log_dir(self) -> Path | None:
        """``root/name/version_N`` (created on first use), or ``None`` off rank 0."""
        return self._run.path

    @property
    def path(self) -> Path | None:
        """The metrics file in ``log_dir``, or ``None`` off rank 0."""
        log_dir = self.log_dir
        return None if log_dir is None else log_dir / self._FILE

    def log_hyperparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None, *,
                        step: int = 0) -> None:
        """Write ``hparams.json``; the metrics, if any, as one more record at ``step``."""
        who = f"{type(self).__name__}.log_hyperparams"
        clean = _clean_hparams(params, who)
        values = _floats(metrics, who)
        if self.log_dir is None:
            return
        _write_hparams(self.log_dir, clean)
        if values:
            self.log_metrics(values, step)


class CSVLogger(_FileLogger):
    """Append metrics to ``root/name/version_N/metrics.csv`` (one row per ``log_metrics`` call).

    Columns grow as new metric names appear (the file is rewritten then, rarely). Each
    row goes to the OS as it is logged, so ``flush`` and ``close`` have nothing to do;
    writes after ``close`` append.

    Nothing is created until the first write, and only on rank 0 of ``torch.distributed``
    (``RANK`` under ``torchrun``, before the process group is up): off rank 0 every method
    is a no-op and ``log_dir`` is ``None``. ``log_dir`` is a property: reading it chooses
    and creates the version folder on rank 0 (so that files can be saved beside the logs).
    ``name=None`` (or ``""``) puts the versions directly under ``root``.

    >>> import tempfile, trainkit as tk
    >>> log = tk.CSVLogger(tempfile.mkdtemp())
    >>> log.log_metrics({"loss": 1.5}, step=3)
    >>> log.log_hyperparams({"lr": 0.1}, metrics={"hp/acc": 0.9}, step=3)
    >>> log.close()
    >>> (log.log_dir / "metrics.csv").read_text().splitlines()
    ['step,loss,hp/acc', '3,1.5,', '3,,0.9']
    """

    _FILE = "metrics.csv"

    def __init__(self, root: PathLike = "runs", name: str | None = "default") -> None:
        super().__init__(root, name)
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one row: ``step`` and the metrics (empty cells for the columns not given)."""
        row = {"step": int(step), **_floats(metrics, "CSVLogger.log_metrics")}
        path = self.path
        if path is None:
            return
        new_cols = [k for k in row if k not in self._columns]
        self._rows.append(row)
        if new_cols:
            self._columns += new_cols
            self._rewrite(path)
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writerow(row)

    def _rewrite(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._columns)
            w.writeheader()
            w.writerows(self._rows)
        os.replace(tmp, path)

    def flush(self) -> None:
        """Nothing to do: every row is written when it is logged."""

    def close(self) -> None:
        """Nothing to do: every row is written when it is logged (later rows append)."""


class JSONLLogger(_FileLogger):
    """Append one JSON object per ``log_metrics`` call to ``root/name/version_N/metrics.jsonl``.

    Each line is flushed as it is written; ``close`` closes the file (again: nothing) and a
    later write reopens it to append.

    Nothing is created until the first write, and only on rank 0 of ``torch.distributed``
    (``RANK`` under ``torchrun``, before the process group is up): off rank 0 every method
    is a no-op and ``log_dir`` is ``None``. ``log_dir`` is a property: reading it chooses
    and creates the version folder on rank 0 (so that files can be saved beside the logs).
    ``name=None`` (or ``""``) puts the versions directly under ``root``.

    >>> import tempfile, json, trainkit as tk
    >>> log = tk.JSONLLogger(tempfile.mkdtemp())
    >>> log.log_metrics({"loss": 1.5}, step=3)
    >>> log.close()
    >>> log.log_hyperparams({"lr": 0.1}, metrics={"hp/acc": 0.9}, step=3)
    >>> [json.loads(line) for line in (log.log_dir / "metrics.jsonl").read_text().splitlines()]
    [{'step': 3, 'loss': 1.5}, {'step': 3, 'hp/acc': 0.9}]
    """

    _FILE = "metrics.jsonl"

    def __init__(self, root: PathLike = "runs", name: str | None = "default") -> None:
        super().__init__(root, name)
        self._file: Any = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append ``{"step": step, **metrics}`` as one line."""
        line = json.dumps({"step": int(step), **_floats(metrics, "JSONLLogger.log_metrics")}) + "\n"
        if self._file is None:
            path = self.path
            if path is None:
                return
            self._file = open(path, "a")
        self._file.write(line)
        self._file.flush()

    def flush(self) -> None:
        """Flush the file (each line is already flushed as it is written)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file (again: nothing); a later write reopens it to append."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_scalars(log_dir: PathLike) -> dict[str, list[tuple[int, float]]]:
    """Read back every scalar in the TensorBoard event files of ``log_dir``: ``{tag: [(step, value)]}``.

    Parses the TFRecord framing and the ``Event`` protos directly (no TensorBoard install).
    Files are read in name order; a record still being written at the end of one is skipped.

    >>> import tempfile, trainkit as tk
    >>> log = tk.TensorBoardLogger(tempfile.mkdtemp(), name=None)
    >>> log.log_metrics({"loss": 0.5}, step=2)
    >>> log.flush()
    >>> read_scalars(log.log_dir)
    {'loss': [(2, 0.5)]}
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

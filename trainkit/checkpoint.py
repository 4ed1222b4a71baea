"""Checkpoints: atomic save, safe load (``weights_only=True``), keep-last-N, exact resume.

A checkpoint holds only tensors, numbers, strings and plain containers, so it
loads with ``torch.load(weights_only=True)``: a foreign file cannot run code.
The module and the optimizer are code, not data: they come from the ``like``
state you load into, which also fixes the expected names and shapes.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor

from .state import TrainState

__all__ = ["save", "load", "Checkpointer", "CheckpointError"]

_FORMAT = "trainkit.checkpoint"
_VERSION = 1
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, foreign, or does not fit the state it is loaded into."""


def _plain(x: Any, where: str) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v, f"{where}[{i}]") for i, v in enumerate(x))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(
        f"save: {where} is a {type(x).__name__}; checkpoints hold only tensors, numbers, strings "
        "and dicts/lists/tuples of them (so that they load with weights_only=True)."
    )


def _payload(state: TrainState, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "state": {
            "step": state.step,
            "params": _plain(state.params, "params"),
            "buffers": _plain(state.buffers, "buffers"),
            "opt_state": _plain(state.opt_state, "opt_state"),
            "rng": state.rng,
            "slots": _plain(state.slots, "slots"),
        },
        "meta": _plain(dict(meta or {}), "meta"),
    }


def save(state: TrainState, path: PathLike, *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    A crash or a full disk mid-write leaves any previous file at ``path`` intact.

    >>> import torch, tempfile, os, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.adam(1e-3))
    >>> path = tk.save(state, os.path.join(tempfile.mkdtemp(), "ckpt.pt"))
    >>> tk.load(path, like=state).params["weight"].equal(state.params["weight"])
    True
    """
    path = Path(path)
    payload = _payload(state, meta)  # fails before touching the disk if the state has foreign objects
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _read(path: PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load: no checkpoint file at {str(path)!r}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, random bytes...
        raise CheckpointError(
            f"load: {str(path)!r} is not a readable trainkit checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            "The file is truncated, corrupt or not a checkpoint; load an earlier one "
            "(Checkpointer keeps the last N)."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(
            f"load: {str(path)!r} is a torch file but not a trainkit checkpoint (no format tag). "
            "For a plain state_dict, build the module from it and call TrainState.create."
        )
    if payload.get("version") != _VERSION:
        raise CheckpointError(f"load: {str(path)!r} has checkpoint version {payload.get('version')}, expected {_VERSION}.")
    return payload


def _diff(kind: str, got: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> list[str]:
    out = []
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing:
        out.append(f"{kind} missing from the file: {missing}")
    if extra:
        out.append(f"{kind} in the file but not in the model: {extra}")
    for n in want:
        if n in got and (got[n].shape != want[n].shape or got[n].dtype != want[n].dtype):
            out.append(
                f"{kind} {n!r}: file has {tuple(got[n].shape)} {got[n].dtype}, model has {tuple(want[n].shape)} {want[n].dtype}"
            )
    return out


def _structure(x: Any) -> Any:
    if isinstance(x, Tensor):
        return ("tensor", tuple(x.shape))
    if isinstance(x, Mapping):
        return {k: _structure(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_structure(v) for v in x]
    return type(x).__name__


def _restore(state: Mapping[str, Any], like: TrainState, path: PathLike) -> TrainState:
    problems = _diff("param", state["params"], like.params) + _diff("buffer", state["buffers"], like.buffers)
    if problems:
        raise CheckpointError(
            f"load: {str(path)!r} was saved from another model:\n  - "
            + "\n  - ".join(problems)
            + "\nBuild the same module (same layers, sizes and dtypes) as the run that saved it."
        )
    if _structure(state["opt_state"]) != _structure(like.opt_state):
        raise CheckpointError(
            f"load: {str(path)!r} holds a different optimizer state than the state given as like= "
            "(another optimizer or chain). Create the state with the optimizer the run used."
        )
    device = like.device

    def place(x: Any, ref: Any) -> Any:
        if isinstance(x, Tensor):
            t = x.to(device if not isinstance(ref, Tensor) else ref.device)
            if isinstance(ref, Tensor) and ref.requires_grad:
                t.requires_grad_(True)
            return t
        if isinstance(x, Mapping):
            return {k: place(v, ref.get(k) if isinstance(ref, Mapping) else None) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            refs = list(ref) if isinstance(ref, (list, tuple)) and len(ref) == len(x) else [None] * len(x)
            return type(x)(place(v, r) for v, r in zip(x, refs))
        return x

    return like.replace(
        step=state["step"],
        params={n: place(state["params"][n], like.params[n]) for n in like.params},
        buffers={n: place(state["buffers"][n], like.buffers[n]) for n in like.buffers},
        opt_state=place(state["opt_state"], like.opt_state),
        rng=state["rng"],
        slots=place(state["slots"], like.slots),
    )


def load(path: PathLike, *, like: TrainState) -> TrainState:
    """Load a checkpoint into the structure of ``like`` (its module, optimizer and devices).

    Raises :class:`CheckpointError` naming the differing params and shapes when the
    file comes from another model, and when it is truncated, corrupt or foreign.
    ``weights_only=True``: loading a file never runs code from it.
    """
    payload = _read(path)
    return _restore(payload["state"], like, path)


def load_run(path: PathLike, *, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Like :func:`load`, also returning the runner's metadata (epoch, batch, history)."""
    payload = _read(path)
    meta = payload.get("meta") or {}
    for key in ("epoch", "batch", "history"):
        if key not in meta:
            raise CheckpointError(f"resume: {str(path)!r} was not written by fit (no {key!r}); use trainkit.load instead.")
    return _restore(payload["state"], like, path), meta


class Checkpointer:
    """Where and when ``fit`` saves: ``directory/step-000000123.pt``, keeping the last ``keep_last``.

    Saves at the end of every ``every_n_epochs`` epochs and, if set, every
    ``every_n_steps`` steps (mid-epoch: ``fit(resume="latest")`` continues exactly).

    >>> import tempfile
    >>> ck = Checkpointer(tempfile.mkdtemp(), every_n_steps=100, keep_last=2)
    >>> ck.latest() is None, ck.due_step(200), ck.due_step(150)
    (True, True, False)
    """

    _NAME = re.compile(r"^step-(\d+)\.pt$")

    def __init__(
        self, directory: PathLike, *, every_n_steps: int | None = None, every_n_epochs: int = 1, keep_last: int = 3
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"Checkpointer: keep_last must be >= 1 (or None for all), got {keep_last}.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"Checkpointer: every_n_steps must be >= 1 or None, got {every_n_steps}.")
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.keep_last = keep_last

    def due_step(self, step: int) -> bool:
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def due_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    def checkpoints(self) -> list[Path]:
        """The checkpoint files in the directory, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint, or ``None``."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState, meta: Mapping[str, Any] | None = None) -> Path:
        path = save(state, self.directory / f"step-{state.step:09d}.pt", meta=meta)
        if self.keep_last is not None:
            for old in self.checkpoints()[: -self.keep_last]:
                old.unlink(missing_ok=True)  # only after the new file is complete
        return path

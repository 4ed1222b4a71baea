"""Checkpoints: atomic save, safe load (``weights_only=True``), keep-last-N, exact resume.

A checkpoint holds only tensors, numbers, strings and plain containers, so it
loads with ``torch.load(weights_only=True)``: a foreign file cannot run code.
The module and the optimizer are code, not data: they come from the ``like``
state you load into, which also fixes the expected names and shapes.

Each file carries its format (``"format": "trainkit.checkpoint/2"``). :func:`load`
reads only the current format; :func:`load_params` and :func:`load_module` (weights
for inference, no optimizer) read every trainkit format. Files from elsewhere
(a plain ``state_dict``, a Lightning checkpoint) are refused with what to do instead.
"""

from __future__ import annotations

import copy
import errno
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

from .state import TrainState

__all__ = ["save", "load", "load_params", "load_module", "Checkpointer", "CheckpointError"]

_FORMAT = "trainkit.checkpoint"
# 2: the format tag carries the version; the optimizer state has optim's new layout (params keyed
# by name). Version 1 files ({"format": "trainkit.checkpoint", "version": 1}) keep their params and
# buffers readable by load_params / load_module.
_VERSION = 2
_TAG = f"{_FORMAT}/{_VERSION}"
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
        "format": _TAG,
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


class _Recording:
    """A file that remembers the OSError of a failed write: torch.save reports it only as
    ``[enforce fail at inline_container.cc] unexpected pos``, without the errno."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


_CAUSES = {  # errno -> (what happened, what to do)
    errno.EFBIG: ("the file would exceed the largest file this process may write (the file-size limit, "
                  "ulimit -f, or the filesystem's maximum)", "raise the limit (ulimit -f unlimited) or save elsewhere"),
    errno.ENOSPC: ("the disk is full", "free space on it, keep fewer checkpoints (Checkpointer(keep_last=...)) "
                   "or save elsewhere"),
    errno.EDQUOT: ("the disk quota is used up", "free space in the quota or save elsewhere"),
    errno.EACCES: ("permission denied", "make the folder writable or save elsewhere"),
    errno.EPERM: ("operation not permitted", "make the folder writable or save elsewhere"),
    errno.EROFS: ("the filesystem is read-only", "save to a writable folder"),
}


def _save_error(e: OSError, path: Path, existed: bool) -> OSError:
    cause, fix = _CAUSES.get(e.errno, (e.strerror or str(e), "fix the cause or save elsewhere"))
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
    kept = (f"The previous checkpoint at {str(path)!r} is intact (the new one goes to a temp file, renamed "
            "over it only once complete)." if existed else f"Nothing was left at {str(path)!r}.")
    return OSError(e.errno, f"save: could not write {str(path)!r}: {cause} ({code}: {e.strerror}). {kept} "
                            f"To save: {fix}.")


def _write(fd: int, payload: Mapping[str, Any]) -> None:
    with os.fdopen(fd, "wb") as f:
        out = _Recording(f)
        try:
            torch.save(payload, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None  # the OS's reason (EFBIG, ENOSPC...), not torch's "unexpected pos"
            raise
        f.flush()
        os.fsync(f.fileno())


def save(state: TrainState, path: PathLike, *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    A crash, a full disk or a file-size limit mid-write leaves any previous file at
    ``path`` intact; the ``OSError`` raised then names the cause (its errno), the path,
    and what to do.

    >>> import torch, tempfile, os, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.adam(1e-3))
    >>> path = tk.save(state, os.path.join(tempfile.mkdtemp(), "ckpt.pt"))
    >>> tk.load(path, like=state).params["weight"].equal(state.params["weight"])
    True
    """
    path = Path(path)
    payload = _payload(state, meta)  # fails before touching the disk if the state has foreign objects
    existed = path.is_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _save_error(e, path, existed) from e
    try:
        _write(fd, payload)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _save_error(e, path, existed) from e
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


# what torch's safe unpickler allows in a tensor file: never reported as the refused global
_SAFE_GLOBAL = re.compile(
    r"^(collections\.OrderedDict|torch\._utils\._rebuild\w*|torch\.\w*Storage|torch\.(float|bfloat|int|uint|bool|complex)\w*)$"
)


def _pickled_globals(data: bytes) -> list[str]:
    """The globals (``module.name``) that unpickling ``data`` would call, read without running it."""
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                strings.append(memo[int(arg)])
    except Exception:  # the end of the pickle, or bytes that are no pickle at all
        pass
    return found


def _refused_global(e: Exception, path: Path) -> str | None:
    """The global that torch's safe unpickler refused (from its message, else from the pickle itself)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    if m:
        return m.group(1)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)  # the globals come first; a huge file is not read whole
    except Exception:
        return None
    return next((g for g in _pickled_globals(data) if not _SAFE_GLOBAL.match(g)), None)


def _torch_reason(e: Exception) -> str:
    """torch's error without its advice (which suggests weights_only=False: never ours to give)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not re.search(r"weights_only|Weights only load failed|Check the documentation", ln)]
    return f"{type(e).__name__}: {' '.join(keep)[:200]}" if keep else type(e).__name__


def _torch_load(path: PathLike, who: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{who}: no checkpoint file at {str(path)!r}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, random bytes...
        name = _refused_global(e, path) if isinstance(e, pickle.UnpicklingError) else None
        if name is not None:
            raise CheckpointError(
                f"{who}: refused {str(path)!r}: loading it would run code (it calls the Python global {name}), "
                "and a trainkit checkpoint holds only tensors, numbers and strings. It was not written by "
                "trainkit.save (torch.save of a whole module or object?) or it was tampered with. Load a checkpoint "
                "written by trainkit.save; if you made this file, save the model's tensors instead: "
                "torch.save(model.state_dict(), path)."
            ) from None
        raise CheckpointError(
            f"{who}: {str(path)!r} is not a readable trainkit checkpoint ({_torch_reason(e)}). "
            "The file is truncated, corrupt or not a checkpoint; load an earlier one (Checkpointer keeps the last N)."
        ) from None


def _version(payload: Any) -> int | None:
    """The trainkit checkpoint format of ``payload``, or ``None`` for a foreign file."""
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), str):
        return None
    tag = payload["format"]
    if tag == _FORMAT:  # format 1 kept the version apart
        return payload["version"] if isinstance(payload.get("version"), int) else None
    m = re.fullmatch(re.escape(_FORMAT) + r"/(\d+)", tag)
    return int(m.group(1)) if m else None


def _is_tensor_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in x.items())


def _foreign(payload: Any, path: Path, who: str) -> CheckpointError:
    """What a file without a trainkit format is, and what to do with it."""
    then = "then TrainState.create(module, optimizer)"
    if _is_tensor_dict(payload):
        names = list(payload)
        what = f"a plain state_dict ({len(names)} tensors: {', '.join(map(repr, names[:4]))}{', ...' if len(names) > 4 else ''})"
        do = f"Load it into the module first: module.load_state_dict(torch.load(path, weights_only=True)), {then}."
    elif isinstance(payload, dict) and ("pytorch-lightning_version" in payload or {"state_dict", "optimizer_states"} <= set(payload)):
        what = f"a PyTorch Lightning checkpoint (Lightning {payload.get('pytorch-lightning_version', '?')})"
        do = ("Load its 'state_dict' entry into your module first (strip the LightningModule attribute prefix, e.g. "
              f"'model.', from the names) with module.load_state_dict, {then}.")
    elif isinstance(payload, dict):
        keys = [str(k) for k in payload][:8]
        inner = next((k for k in ("state_dict", "model_state_dict", "model") if _is_tensor_dict(payload.get(k))), None)
        what = f"a dict with keys {keys} and no trainkit format tag"
        do = (f"Load its {inner!r} entry with module.load_state_dict, {then}." if inner else
              f"trainkit reads files written by trainkit.save; for a model's weights, module.load_state_dict, {then}.")
    else:
        what = f"a torch file holding a {type(payload).__name__}, not a checkpoint dict"
        do = "trainkit reads files written by trainkit.save."
    return CheckpointError(f"{who}: {str(path)!r} is not a trainkit checkpoint: it is {what}. {do}")


def _read(path: PathLike, who: str = "load", versions: tuple[int, ...] = (_VERSION,)) -> dict[str, Any]:
    payload = _torch_load(path, who)
    version = _version(payload)
    if version is None:
        raise _foreign(payload, Path(path), who)
    if version > _VERSION:
        raise CheckpointError(
            f"{who}: {str(path)!r} was written by a newer trainkit (checkpoint format {version}; this one reads "
            f"up to {_VERSION}). Upgrade trainkit to load it."
        )
    if version not in versions:
        raise CheckpointError(
            f"{who}: {str(path)!r} was written by an older trainkit (checkpoint format {version}; this one resumes "
            f"format {_VERSION}, whose optimizer state has another layout). Retrain, or start from its weights: "
            "trainkit.load_module(path, module) (or load_params), then TrainState.create."
        )
    return payload


def _diff(kind: str, got: Mapping[str, Tensor], want: Mapping[str, Tensor], dtypes: bool = True) -> list[str]:
    out = []
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing:
        out.append(f"{kind} missing from the file: {missing}")
    if extra:
        out.append(f"{kind} in the file but not in the model: {extra}")
    for n in want:
        if n in got and (got[n].shape != want[n].shape or (dtypes and got[n].dtype != want[n].dtype)):
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
            return type(x)(place(v, r) for v, r in zip(x, refs, strict=True))
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
    file comes from another model; when it is truncated, corrupt, foreign (a plain
    ``state_dict``, a Lightning checkpoint: the message says how to load those), written
    by another trainkit version, or would run code. ``weights_only=True``: loading a file
    never runs code from it. For weights without an optimizer, see :func:`load_module`.

    >>> import torch, tempfile, os, trainkit as tk
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save(torch.nn.Linear(2, 1).state_dict(), path)
    >>> tk.load(path, like=tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1)))
    Traceback (most recent call last):
    ...
    trainkit.checkpoint.CheckpointError: load: '...w.pt' is not a trainkit checkpoint: it is a plain state_dict ...
    """
    payload = _read(path, "load")
    return _restore(payload["state"], like, path)


def load_run(path: PathLike, *, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Like :func:`load`, also returning the runner's metadata (epoch, batch, history)."""
    payload = _read(path, "resume")
    meta = payload.get("meta") or {}
    for key in ("epoch", "batch", "history"):
        if key not in meta:
            raise CheckpointError(f"resume: {str(path)!r} was not written by fit (no {key!r}); use trainkit.load instead.")
    return _restore(payload["state"], like, path), meta


def _weights(path: PathLike, who: str) -> dict[str, dict[str, Tensor]]:
    payload = _read(path, who, versions=tuple(range(1, _VERSION + 1)))  # params and buffers: same in every format
    state = payload.get("state")
    out = {k: state.get(k) if isinstance(state, Mapping) else None for k in ("params", "buffers")}
    for k, v in out.items():
        if not (isinstance(v, Mapping) and all(isinstance(t, Tensor) for t in v.values())):
            raise CheckpointError(f"{who}: {str(path)!r} has no {k} (a dict of tensors), got {type(v).__name__}. "
                                  "The file is corrupt; load an earlier checkpoint.")
    return {k: dict(v) for k, v in out.items()}


def load_params(path: PathLike) -> dict[str, dict[str, Tensor]]:
    """The weights of a trainkit checkpoint: ``{"params": {name: tensor}, "buffers": {name: tensor}}``.

    No optimizer, module or state needed (e.g. to inspect a run, or to start another);
    reads checkpoints of every trainkit format, on the CPU, with ``weights_only=True``.

    >>> import torch, tempfile, os, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.BatchNorm1d(3), tk.optim.adam(1e-3))
    >>> w = load_params(tk.save(state, os.path.join(tempfile.mkdtemp(), "c.pt")))
    >>> sorted(w["params"]), sorted(w["buffers"])
    (['bias', 'weight'], ['num_batches_tracked', 'running_mean', 'running_var'])
    """
    return _weights(path, "load_params")


def load_module(path: PathLike, module: nn.Module) -> nn.Module:
    """A copy of ``module`` holding the checkpoint's params and buffers, for inference: no optimizer.

    ``module`` itself is not changed (the copy is a ``copy.deepcopy``). Values are copied
    into the copy's own tensors, so they keep the module's dtypes and devices (as
    ``load_state_dict`` does). Reads checkpoints of every trainkit format. Raises
    :class:`CheckpointError` listing every name missing or extra and every shape that differs.

    >>> import torch, tempfile, os, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.adam(1e-3))
    >>> path = tk.save(state, os.path.join(tempfile.mkdtemp(), "c.pt"))
    >>> fresh = torch.nn.Linear(2, 1)
    >>> trained = load_module(path, fresh)
    >>> trained.weight.equal(state.params["weight"]), fresh.weight.equal(state.params["weight"])
    (True, False)
    >>> load_module(path, torch.nn.Linear(3, 1))
    Traceback (most recent call last):
    ...
    trainkit.checkpoint.CheckpointError: load_module: '...c.pt' does not fit this Linear:
      - param 'weight': file has (1, 2) torch.float32, model has (1, 3) torch.float32
    Build the module with the same layers and sizes as the run that saved it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"load_module: module must be an nn.Module, got {type(module).__name__}. "
                        "Pass the model, built as for training, e.g. load_module(path, Net()).")
    weights = _weights(path, "load_module")
    out = copy.deepcopy(module)
    params, buffers = dict(out.named_parameters()), dict(out.named_buffers())
    problems = _diff("param", weights["params"], params, dtypes=False) + _diff("buffer", weights["buffers"], buffers, dtypes=False)
    if problems:
        raise CheckpointError(
            f"load_module: {str(path)!r} does not fit this {type(module).__name__}:\n  - " + "\n  - ".join(problems)
            + "\nBuild the module with the same layers and sizes as the run that saved it."
        )
    with torch.no_grad():
        for mine, theirs in ((params, weights["params"]), (buffers, weights["buffers"])):
            for name, t in theirs.items():
                mine[name].copy_(t)
    return out


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
        """Whether ``fit`` saves after global step ``step`` (every ``every_n_steps``)."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def due_epoch(self, epoch: int) -> bool:
        """Whether ``fit`` saves after epoch ``epoch`` (1-based; every ``every_n_epochs``)."""
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
        """Save ``state`` as ``step-<step>.pt`` (atomically), then delete all but the last ``keep_last``.

        >>> import tempfile, torch, trainkit as tk
        >>> ck = Checkpointer(tempfile.mkdtemp(), keep_last=1)
        >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
        >>> _ = ck.save(state.replace(step=1)); ck.save(state.replace(step=2)).name, len(ck.checkpoints())
        ('step-000000002.pt', 1)
        """
        path = save(state, self.directory / f"step-{state.step:09d}.pt", meta=meta)
        if self.keep_last is not None:
            for old in self.checkpoints()[: -self.keep_last]:
                old.unlink(missing_ok=True)  # only after the new file is complete
        return path

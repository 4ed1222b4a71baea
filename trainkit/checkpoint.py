"""Checkpoints: atomic save, safe load (``weights_only=True``), keep-last-N and best-k, exact resume.

A checkpoint holds only tensors, numbers, strings and plain containers, so it
loads with ``torch.load(weights_only=True)``: a foreign file cannot run code.
The module and the optimizer are code, not data: they come from the ``like``
state you load into, which also fixes the expected names and shapes.

Each file carries its format (``"format": "trainkit.checkpoint/2"``). :func:`load`
reads only the current format; :func:`load_params` and :func:`load_module` (weights
for inference, no optimizer) read every trainkit format. Files from elsewhere
(a plain ``state_dict``, a Lightning checkpoint) are refused with what to do instead.

A second model in a slot (a GAN's ``state.slots["disc"]``, itself a ``TrainState``) is
saved as its children; :func:`load` restores it into the ``TrainState`` that ``like``
holds at the same place (which gives its module and optimizer), at any depth.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

from .state import TrainState

__all__ = ["save", "load", "load_params", "load_module", "load_hparams", "Checkpointer", "CheckpointError"]

_FORMAT = "trainkit.checkpoint"
# 2: the format tag carries the version; the optimizer state has optim's new layout (params keyed
# by name). Version 1 files ({"format": "trainkit.checkpoint", "version": 1}) keep their params and
# buffers readable by load_params / load_module.
_VERSION = 2
_TAG = f"{_FORMAT}/{_VERSION}"
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, foreign, or does not fit the state it is loaded into."""


# A TrainState kept in a slot (a GAN's discriminator, a VAE's second optimizer) is stored as a
# dict of its children carrying this key; its module and optimizer come from like= on load.
_NESTED = "__trainkit__"


def _plain(x: Any, where: str, states: bool = False) -> Any:
    """``x`` as plain containers of tensors and numbers; ``states``: TrainStates are allowed (in slots)."""
    if isinstance(x, Tensor):
        return x.detach()
    if states and isinstance(x, TrainState):
        return {_NESTED: "TrainState", **_children(x, f"{where}.")}
    if isinstance(x, Mapping):
        if _NESTED in x:
            raise TypeError(f"save: {where} has the key {_NESTED!r}, which trainkit keeps for the TrainStates "
                            "it stores in slots. Rename that key.")
        return {str(k): _plain(v, f"{where}[{k!r}]", states) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v, f"{where}[{i}]", states) for i, v in enumerate(x))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(
        f"save: {where} is a {type(x).__name__}; checkpoints hold only tensors, numbers, strings, "
        "dicts/lists/tuples of them and (in slots) TrainStates, so that they load with weights_only=True. "
        "Keep its tensors and numbers in the slot instead (e.g. its state_dict()), or a TrainState for a second model."
    )


def _children(state: TrainState, where: str = "") -> dict[str, Any]:
    return {
        "step": state.step,
        "params": _plain(state.params, f"{where}params"),
        "buffers": _plain(state.buffers, f"{where}buffers"),
        "opt_state": _plain(state.opt_state, f"{where}opt_state"),
        "rng": state.rng,
        "slots": _plain(state.slots, f"{where}slots", states=True),
    }


def _payload(state: TrainState, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"format": _TAG, "state": _children(state), "meta": _plain(dict(meta or {}), "meta")}


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


def _restore(state: Mapping[str, Any], like: TrainState, path: PathLike, where: str = "") -> TrainState:
    """The saved children ``state`` in the structure of ``like``; ``where`` names a nested state (``slots['disc']``)."""
    at = f" (the TrainState at {where})" if where else ""
    problems = _diff("param", state["params"], like.params) + _diff("buffer", state["buffers"], like.buffers)
    if problems:
        raise CheckpointError(
            f"load: {str(path)!r} was saved from another model{at}:\n  - "
            + "\n  - ".join(problems)
            + f"\nBuild the same module (same layers, sizes and dtypes){' for ' + where if where else ''} as the run that saved it."
        )
    if _structure(state["opt_state"]) != _structure(like.opt_state):
        raise CheckpointError(
            f"load: {str(path)!r} holds a different optimizer state than the state given as like={at} "
            "(another optimizer or chain). Create the state with the optimizer the run used."
        )
    device = like.device
    return like.replace(
        step=state["step"],
        params={n: _place(state["params"][n], like.params[n], device) for n in like.params},
        buffers={n: _place(state["buffers"][n], like.buffers[n], device) for n in like.buffers},
        opt_state=_place(state["opt_state"], like.opt_state, device),
        rng=state["rng"],
        slots=_place_slots(state["slots"], like.slots, device, path, f"{where + '.' if where else ''}slots"),
    )


def _place(x: Any, ref: Any, device: torch.device) -> Any:
    """``x`` with its tensors on the devices of ``ref``'s (else ``device``), requiring grad where ``ref``'s do."""
    if isinstance(x, Tensor):
        t = x.to(device if not isinstance(ref, Tensor) else ref.device)
        if isinstance(ref, Tensor) and ref.requires_grad:
            t.requires_grad_(True)
        return t
    if isinstance(x, Mapping):
        return {k: _place(v, ref.get(k) if isinstance(ref, Mapping) else None, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        refs = list(ref) if isinstance(ref, (list, tuple)) and len(ref) == len(x) else [None] * len(x)
        return type(x)(_place(v, r, device) for v, r in zip(x, refs, strict=True))
    return x


def _is_nested(x: Any) -> bool:
    return isinstance(x, Mapping) and x.get(_NESTED) == "TrainState"


def _holds_state(x: Any) -> bool:
    if isinstance(x, TrainState):
        return True
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    return any(_holds_state(v) for v in values)


def _misfit(path: PathLike, where: str, saved: str, like: str) -> CheckpointError:
    return CheckpointError(
        f"load: {str(path)!r} holds {saved} at {where}, but like= has {like} there. Give like= the structure of the "
        "run that saved it: a TrainState (with its module and optimizer) in each slot where the run had one."
    )


def _place_slots(x: Any, ref: Any, device: torch.device, path: PathLike, where: str) -> Any:
    """Like :func:`_place`, restoring each stored TrainState into ``ref``'s TrainState at the same place."""
    if _is_nested(x):
        if not isinstance(ref, TrainState):
            raise _misfit(path, where, "a TrainState", "nothing" if ref is None else f"a {type(ref).__name__}")
        return _restore(x, ref, path, where)
    if isinstance(ref, TrainState):
        raise _misfit(path, where, f"a {type(x).__name__}", "a TrainState")
    if isinstance(x, Mapping):
        refs = ref if isinstance(ref, Mapping) else {}
        for k, v in refs.items():
            if k not in x and _holds_state(v):
                raise _misfit(path, f"{where}[{k!r}]", "nothing", "a TrainState" if isinstance(v, TrainState) else "TrainStates")
        return {k: _place_slots(v, refs.get(k), device, path, f"{where}[{k!r}]") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        refs = list(ref) if isinstance(ref, (list, tuple)) and len(ref) == len(x) else [None] * len(x)
        return type(x)(_place_slots(v, r, device, path, f"{where}[{i}]") for i, (v, r) in enumerate(zip(x, refs, strict=True)))
    return _place(x, ref, device)


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


def _hparams(x: Any, where: str) -> Any:
    """A copy of ``x`` made of plain values only (what JSON holds, and tuples)."""
    if isinstance(x, Mapping):
        return {str(k): _hparams(v, f"{where}[{k!r}]") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_hparams(v, f"{where}[{i}]") for i, v in enumerate(x))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(
        f"Checkpointer: {where} is a {type(x).__name__}; hparams hold plain values (numbers, strings, bools, None "
        "and lists/dicts of them). Store the settings that make it instead, e.g. hparams={'width': 64}."
    )


def load_hparams(path: PathLike) -> dict[str, Any]:
    """The hyperparameters stored in a checkpoint by ``Checkpointer(hparams=...)`` (``{}`` if none were).

    Reads the file with ``weights_only=True``; no model or state needed.

    >>> import tempfile, torch, trainkit as tk
    >>> ck = tk.Checkpointer(tempfile.mkdtemp(), hparams={"lr": 1e-3, "width": 64})
    >>> path = ck.save(tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1)))
    >>> load_hparams(path)
    {'lr': 0.001, 'width': 64}
    """
    payload = _read(path, "load_hparams", versions=tuple(range(1, _VERSION + 1)))
    meta = payload.get("meta")
    hparams = meta.get("hparams") if isinstance(meta, Mapping) else None
    return copy.deepcopy(dict(hparams)) if isinstance(hparams, Mapping) else {}


def _score(metrics: Mapping[str, Any], monitor: str) -> float:
    if monitor not in metrics:
        raise ValueError(
            f"Checkpointer: monitor={monitor!r} is not among the metrics: {sorted(map(str, metrics))}. Monitor one of "
            "these (val_* metrics come from fit(eval_step=..., val_loader=...); train_* from the step's metrics)."
        )
    v = metrics[monitor]
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()  # a host sync point, once an epoch
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"Checkpointer: metrics[{monitor!r}] must be a number, got {type(v).__name__}. "
                        "Monitor a scalar metric (fit's history rows hold floats).")
    return float(v)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` by ``data`` atomically: a temp file in the same folder, fsync, os.replace."""
    existed = path.is_file()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _save_error(e, path, existed) from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _save_error(e, path, existed) from e
        raise


class Checkpointer:
    """Where and when ``fit`` saves: ``directory/step-000000123.pt``, keeping the last ``keep_last``.

    Saves at the end of every ``every_n_epochs`` epochs and, if set, every
    ``every_n_steps`` steps (mid-epoch: ``fit(resume="latest")`` continues exactly).

    **Best by a metric** (Lightning's ``ModelCheckpoint(monitor, mode, save_top_k)``):
    with ``monitor="val_loss"``, the ``save_top_k`` checkpoints with the lowest
    (``mode="min"``) or highest (``"max"``) value at the end of an epoch are kept too,
    besides the last ``keep_last`` (a file that is both stays until it is neither).
    ``best()`` is the best file, ``best_score`` its score, and ``directory/best.json``
    names them (replaced atomically, never a link that can dangle). Mid-epoch saves
    are never ranked; a tie keeps the earlier checkpoint; a NaN never ranks. Each
    checkpoint stores its score and the ranking (``meta["checkpointer"]``), so a
    resumed run (``fit`` calls :meth:`restore`) keeps the same best ``save_top_k``.

    ``hparams``: plain values stored in every checkpoint (read them with :func:`load_hparams`).

    >>> import tempfile, torch, trainkit as tk
    >>> ck = Checkpointer(tempfile.mkdtemp(), every_n_steps=100, keep_last=2)
    >>> ck.latest() is None, ck.due_step(200), ck.due_step(150)
    (True, True, False)
    >>> ck = Checkpointer(tempfile.mkdtemp(), monitor="val_loss", save_top_k=1, keep_last=1)
    >>> s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
    >>> for step, loss in [(1, 0.5), (2, 0.3), (3, 0.4)]:
    ...     _ = ck.save(s.replace(step=step), metrics={"val_loss": loss})
    >>> ck.best().name, ck.best_score, [p.name for p in ck.checkpoints()]
    ('step-000000002.pt', 0.3, ['step-000000002.pt', 'step-000000003.pt'])
    """

    _NAME = re.compile(r"^step-(\d+)\.pt$")
    _BEST = "best.json"

    def __init__(
        self,
        directory: PathLike,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int = 1,
        keep_last: int | None = 3,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        hparams: Mapping[str, Any] | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"Checkpointer: keep_last must be >= 1 (or None for all), got {keep_last}.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"Checkpointer: every_n_steps must be >= 1 or None, got {every_n_steps}.")
        _check_ranking(monitor, mode, save_top_k)
        if hparams is not None and not isinstance(hparams, Mapping):
            raise TypeError(f"Checkpointer: hparams must be a dict of plain values, got {type(hparams).__name__}. "
                            "Pass e.g. hparams={'lr': 1e-3, 'width': 64}.")
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.keep_last = keep_last
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.hparams = None if hparams is None else _hparams(hparams, "hparams")
        self._top: list[dict[str, Any]] = []  # the best save_top_k, best first: {"name", "step", "score"}
        self._ranked = False  # whether save or restore has set _top in this process (else best.json tells)

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
        """The newest checkpoint (best or not), or ``None``."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState, meta: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> Path:
        """Save ``state`` as ``step-<step>.pt`` (atomically), then delete what is neither among the
        last ``keep_last`` nor the best ``save_top_k``.

        ``metrics`` (an epoch's history row) ranks the checkpoint by ``metrics[monitor]``;
        without it the checkpoint is a "last" one only. A displaced best is deleted only
        once the new file and ``best.json`` are in place.

        >>> import tempfile, torch, trainkit as tk
        >>> ck = Checkpointer(tempfile.mkdtemp(), keep_last=1)
        >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
        >>> _ = ck.save(state.replace(step=1)); ck.save(state.replace(step=2)).name, len(ck.checkpoints())
        ('step-000000002.pt', 1)
        """
        name = f"step-{state.step:09d}.pt"
        full = dict(meta or {})
        if self.hparams is not None:
            full["hparams"] = self.hparams
        top = self._top
        if self.monitor is not None:  # rank before touching the disk: a wrong monitor writes nothing
            score = None if metrics is None else _score(metrics, self.monitor)
            top = self._rank(name, state.step, score)
            full["checkpointer"] = {"monitor": self.monitor, "mode": self.mode, "score": score, "top_k": top}
        path = save(state, self.directory / name, meta=full)
        if self.monitor is not None:
            self._top, self._ranked = top, True
            if top:
                self._write_best()  # every save: after a restore, the file may name another run's ranking
            else:
                (self.directory / self._BEST).unlink(missing_ok=True)  # nothing ranked: no pointer, not a stale one
        self._prune(path)  # only after the new file (and the pointer to it) are complete
        return path

    def restore(self, meta: Mapping[str, Any] | None) -> None:
        """Take the ranking stored in the ``meta`` of a checkpoint: ``fit(resume=...)`` calls it.

        The best ``save_top_k`` are then those of the run when it saved that checkpoint
        (files since deleted are dropped). A checkpoint ranked by another ``monitor`` or
        ``mode`` (or by none) starts the ranking afresh. Writes nothing (every rank of a
        distributed run may call it); ``best.json`` follows at the next save.

        >>> import tempfile, torch, trainkit as tk
        >>> d = tempfile.mkdtemp()
        >>> s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
        >>> path = Checkpointer(d, monitor="val_loss").save(s, metrics={"val_loss": 0.3})
        >>> ck = Checkpointer(d, monitor="val_loss")
        >>> ck.restore(torch.load(path, weights_only=True)["meta"]); ck.best_score
        0.3
        """
        saved = meta.get("checkpointer") if isinstance(meta, Mapping) else None
        self._top, self._ranked = [], True
        if self.monitor is None or not isinstance(saved, Mapping):
            return
        if (saved.get("monitor"), saved.get("mode")) != (self.monitor, self.mode):
            warnings.warn(
                f"Checkpointer.restore: the checkpoint was ranked by {saved.get('monitor')!r} ({saved.get('mode')}), "
                f"this Checkpointer ranks by {self.monitor!r} ({self.mode}): the ranking starts afresh.",
                stacklevel=2,
            )
            return
        self._top = self._sorted(e for e in self._entries(saved.get("top_k")) if (self.directory / e["name"]).is_file())

    def best(self) -> Path | None:
        """The best checkpoint by ``monitor`` so far, or ``None`` (none ranked yet).

        Before this Checkpointer has saved or restored, the directory's ``best.json`` (a
        finished run's) tells.
        """
        top = self._best_k()
        return self.directory / top[0]["name"] if top else None

    @property
    def best_score(self) -> float | None:
        """The score of :meth:`best` (``metrics[monitor]`` when it was saved), or ``None``."""
        top = self._best_k()
        return top[0]["score"] if top else None

    # ------------------------------------------------------------------ the ranking
    def _key(self, entry: Mapping[str, Any]) -> tuple[float, int]:
        # ties: the earlier step ranks first (and a later one never displaces it), as in Lightning
        return (entry["score"] if self.mode == "min" else -entry["score"], entry["step"])

    def _sorted(self, entries: Any) -> list[dict[str, Any]]:
        return sorted(entries, key=self._key)[: self.save_top_k]

    def _rank(self, name: str, step: int, score: float | None) -> list[dict[str, Any]]:
        """The best k once ``name`` is saved with ``score`` (an overwritten file loses its old rank)."""
        top = [e for e in self._top if e["name"] != name]
        if score is not None and not math.isnan(score):
            top.append({"name": name, "step": step, "score": score})
        return self._sorted(top)

    def _entries(self, raw: Any) -> list[dict[str, Any]]:
        """The well-formed entries of a stored ranking (a file name of ours, a step, a number)."""
        out = []
        for e in raw if isinstance(raw, (list, tuple)) else ():
            if (isinstance(e, Mapping) and isinstance(e.get("name"), str) and self._NAME.match(e["name"])
                    and isinstance(e.get("step"), int) and isinstance(e.get("score"), (int, float))
                    and not math.isnan(e["score"])):
                out.append({"name": e["name"], "step": e["step"], "score": float(e["score"])})
        return out

    def _best_k(self) -> list[dict[str, Any]]:
        if self.monitor is None:
            raise ValueError("Checkpointer: best() ranks by a metric, and this Checkpointer has no monitor. "
                             "Make it with Checkpointer(directory, monitor='val_loss', mode='min').")
        if self._ranked:
            return self._top
        try:
            saved = json.loads((self.directory / self._BEST).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(saved, Mapping) or (saved.get("monitor"), saved.get("mode")) != (self.monitor, self.mode):
            return []
        return self._sorted(e for e in self._entries(saved.get("top_k")) if (self.directory / e["name"]).is_file())

    def _write_best(self) -> None:
        best = self._top[0]
        _write_json(self.directory / self._BEST, {
            "best": best["name"], "score": best["score"], "step": best["step"],
            "monitor": self.monitor, "mode": self.mode, "top_k": self._top,
        })

    def _prune(self, new: Path) -> None:
        if self.keep_last is None:
            return
        found = self.checkpoints()
        keep = {*found[-self.keep_last:], new, *(self.directory / e["name"] for e in self._top)}
        for old in found:
            if old not in keep:
                old.unlink(missing_ok=True)


def _check_ranking(monitor: Any, mode: Any, save_top_k: Any) -> None:
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(f"Checkpointer: monitor must be a metric name (a str such as 'val_loss') or None, "
                        f"got {type(monitor).__name__}.")
    if mode not in ("min", "max"):
        raise ValueError(f"Checkpointer: mode must be 'min' or 'max', got {mode!r}. Use 'min' for a loss, 'max' for an accuracy.")
    if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < 1:
        raise ValueError(f"Checkpointer: save_top_k must be an int >= 1, got {save_top_k!r}. "
                         "Keep every checkpoint with keep_last=None instead.")
    if monitor is None and save_top_k != 1:
        raise ValueError(f"Checkpointer: save_top_k={save_top_k} ranks checkpoints by a metric, but monitor is None. "
                         "Give monitor='val_loss' (and mode='min' or 'max').")

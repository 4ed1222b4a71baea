"""Sharded checkpoints on ``torch.distributed.checkpoint`` (DCP): each rank writes its own shard.

A checkpoint is a folder ``directory/step-000000123/`` holding DCP's files (one
``.distcp`` per rank and DCP's ``.metadata``) and ``trainkit.json``, the completion
marker, which rank 0 writes last, atomically, once every rank's shard is on disk. A
folder without the marker (a rank died mid-save, the disk filled) is no checkpoint:
:meth:`ShardedCheckpointer.latest` skips it, so the previous one stays the latest.

DCP reshards on load: a checkpoint saved by 4 ranks loads into 2, into 8, or into one
process (whole tensors, for inference: :func:`load_sharded`). Loading is safe in the
``weights_only`` sense: the tensors are raw bytes; everything else (step, rng, the
optimizer's plain values, the run's metadata) is JSON in the marker; DCP's
``.metadata`` (a pickle) is read with an unpickler that allows only DCP's own metadata
classes and torch's dtypes, so a tampered file cannot run code.

The module and the optimizer are code, not data: as with :mod:`trainkit.checkpoint`,
they come from the ``like`` state loaded into, which also fixes the names and shapes
expected (a checkpoint of another model is refused with the names and shapes that differ).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import dist as _dist
from .checkpoint import CheckpointError
from .state import TrainState

__all__ = ["ShardedCheckpointer", "save_sharded", "load_sharded", "load_sharded_run", "read_marker"]

_FORMAT = "trainkit.sharded_checkpoint/1"
_MARKER = "trainkit.json"
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- what goes where


def _is_dtensor(t: Any) -> bool:
    return torch.distributed.is_available() and isinstance(t, torch.distributed.tensor.DTensor)


def _plain_leaf(x: Any, where: str) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(
        f"ShardedCheckpointer: {where} holds a {type(x).__name__}; a sharded checkpoint keeps tensors and plain "
        "values (numbers, strings, None, dicts/lists/tuples of them). Keep the object's tensors and numbers instead."
    )


def _split(tree: Any, prefix: str, where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``tree``'s tensors (keyed ``prefix/i``) and a JSON description of the rest: its spec and plain leaves."""
    if any(isinstance(x, TrainState) for x in pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, TrainState))):
        raise TypeError(f"ShardedCheckpointer: {where} holds a TrainState (a second model in a slot), which sharded "
                        "checkpoints do not store yet. Save it with trainkit.Checkpointer, or keep its tensors in the slot.")
    leaves, spec = pytree.tree_flatten(tree)
    tensors: dict[str, Tensor] = {}
    plain: list[Any] = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            key = f"{prefix}/{i}"
            tensors[key] = leaf.detach()
            plain.append({"tensor": key})
        else:
            plain.append({"value": _plain_leaf(leaf, f"{where} (leaf {i})")})
    try:
        spec_json = pytree.treespec_dumps(spec)
    except Exception as e:  # a container pytree cannot name in JSON
        raise TypeError(f"ShardedCheckpointer: {where} has a container that cannot be stored as JSON ({e}). "
                        "Use dicts with str keys, lists and tuples.") from None
    return tensors, {"spec": spec_json, "leaves": plain}


def _describe(tensors: Mapping[str, Tensor]) -> dict[str, list[Any]]:
    return {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()}


def _payload(state: TrainState, meta: Mapping[str, Any] | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    tensors.update({f"params/{n}": t.detach() for n, t in state.params.items()})
    tensors.update({f"buffers/{n}": t.detach() for n, t in state.buffers.items()})
    opt_t, opt_j = _split(state.opt_state, "opt_state", "the optimizer state")
    slot_t, slot_j = _split(state.slots, "slots", "state.slots")
    tensors.update(opt_t)
    tensors.update(slot_t)
    try:
        meta_json = json.loads(json.dumps(dict(meta or {})))
    except (TypeError, ValueError) as e:
        raise TypeError(f"ShardedCheckpointer: meta must hold plain values (JSON), got {e}.") from None
    marker = {
        "format": _FORMAT, "step": state.step, "rng": state.rng, "world_size": _dist.world_size(),
        "params": _describe(state.params), "buffers": _describe(state.buffers),
        "opt_state": opt_j, "slots": slot_j, "meta": meta_json,
    }
    return tensors, marker


# --------------------------------------------------------------------------- a safe reader


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its own dataclasses, torch's dtypes and Size, nothing else."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint._extension", "torch.distributed.checkpoint.planner")
    _BUILTINS = {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                 ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES or (module, name) in self._BUILTINS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with open(meta_path, "rb") as f:
                data = f.read()
            try:
                metadata = _SafeUnpickler(io.BytesIO(data)).load()
            except Exception as e:
                raise CheckpointError(
                    f"load_sharded: refused {str(meta_path)!r}: it is not DCP metadata that loads without running code "
                    f"({type(e).__name__}: {str(e)[:200]}). The checkpoint was tampered with or is corrupt; load an earlier one."
                ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def read_marker(path: PathLike) -> dict[str, Any]:
    """The completion marker of a sharded checkpoint (format, step, rng, names and shapes, meta).

    Raises :class:`~trainkit.checkpoint.CheckpointError` for a folder that is no complete checkpoint.
    """
    path = Path(path)
    try:
        marker = json.loads((path / _MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"load_sharded: {str(path)!r} is no complete sharded checkpoint (no {_MARKER}: a save that did not finish, "
            "or not a trainkit checkpoint). Load the latest complete one: ShardedCheckpointer(directory).latest()."
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"load_sharded: the marker of {str(path)!r} is unreadable ({e}); load an earlier checkpoint.") from None
    if not isinstance(marker, dict) or marker.get("format") != _FORMAT:
        raise CheckpointError(f"load_sharded: {str(path)!r} is not a trainkit sharded checkpoint "
                              f"(format {marker.get('format') if isinstance(marker, dict) else None!r}, expected {_FORMAT!r}).")
    return marker


# --------------------------------------------------------------------------- save and load


def _group(process_group: Any) -> Any:
    return process_group if process_group is not None else (torch.distributed.group.WORLD if _dist.is_initialized() else None)


def _barrier(group: Any, what: str) -> None:
    if group is None:
        return
    try:
        torch.distributed.barrier(group=group)
    except RuntimeError as e:
        raise _dist.DistributedError(
            f"ShardedCheckpointer: {what} failed on rank {_dist.rank()} of {_dist.world_size()}: a peer rank has died "
            f"or hangs. [{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}] "
            "The checkpoint being written is incomplete (no marker); the previous one is still the latest."
        ) from e


def _write_marker(path: Path, marker: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{_MARKER}.", suffix=".tmp", dir=path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / _MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for d in (path, path.parent):  # make the rename durable
        try:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def save_sharded(state: TrainState, path: PathLike, *, meta: Mapping[str, Any] | None = None, process_group: Any = None) -> Path:
    """Write ``state`` to the folder ``path``: each rank its own shard, then the marker (collective).

    Call it on every rank. Plain (replicated) tensors are written once; sharded DTensors
    (``distributed(params="fsdp")``) each rank its shard. Outside torch.distributed it writes
    the whole state from this process.

    >>> import tempfile, torch, trainkit as tk
    >>> s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.adam(1e-3))
    >>> p = save_sharded(s, tempfile.mkdtemp() + "/step-0")
    >>> load_sharded(p, like=s).params["weight"].equal(s.params["weight"])
    True
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    group = _group(process_group)
    tensors, marker = _payload(state, meta)  # fails before touching the disk on foreign objects
    if _dist.rank() == 0:
        if path.exists():  # an earlier save of this step: not complete any more until this one is
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier(group, "the start of a sharded save")
    try:
        with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process" is ours
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(path), process_group=group, no_dist=group is None)
    except Exception as e:
        if group is None:
            raise
        raise _dist.DistributedError(
            f"ShardedCheckpointer: writing {str(path)!r} failed on rank {_dist.rank()} of {_dist.world_size()} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}). "
            "A peer rank died or a disk failed: this checkpoint is incomplete (no marker), the previous one stays the latest."
        ) from e
    _barrier(group, "the end of a sharded save")  # every shard is on disk: only now may the marker say so
    if _dist.rank() == 0:
        _write_marker(path, marker)
    _barrier(group, "the marker of a sharded save")
    return path


def _template(t: Tensor) -> Tensor:
    """An empty tensor like ``t`` (a DTensor keeps its mesh and placements) for DCP to load into."""
    if _is_dtensor(t):
        from torch.distributed.tensor import DTensor

        local = torch.empty_like(t.to_local())
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return torch.empty_like(t.detach())


def _model_diff(marker: Mapping[str, Any], like: TrainState, path: Path) -> None:
    lines = []
    for kind, tensors in (("params", like.params), ("buffers", like.buffers)):
        saved = marker.get(kind) or {}
        mine = _describe(tensors)
        for n in sorted(set(saved) - set(mine)):
            lines.append(f"{kind} {n!r} {tuple(saved[n][0])} {saved[n][1]} is in the checkpoint, not in the model")
        for n in sorted(set(mine) - set(saved)):
            lines.append(f"{kind} {n!r} {tuple(mine[n][0])} {mine[n][1]} is in the model, not in the checkpoint")
        for n in sorted(set(mine) & set(saved)):
            if list(saved[n][0]) != list(mine[n][0]) or saved[n][1] != mine[n][1]:
                lines.append(f"{kind} {n!r}: checkpoint {tuple(saved[n][0])} {saved[n][1]}, model {tuple(mine[n][0])} {mine[n][1]}")
    if lines:
        shown = "; ".join(lines[:12]) + (f"; and {len(lines) - 12} more" if len(lines) > 12 else "")
        raise CheckpointError(f"load_sharded: {str(path)!r} does not fit the state it is loaded into: {shown}. "
                              "Load it into a state of the model it was saved from (like=TrainState.create(the same module, ...)).")


def _rebuild(desc: Mapping[str, Any], loaded: Mapping[str, Tensor], where: str, path: Path) -> Any:
    leaves = []
    for item in desc["leaves"]:
        leaves.append(loaded[item["tensor"]] if "tensor" in item else item["value"])
    try:
        return pytree.tree_unflatten(leaves, pytree.treespec_loads(desc["spec"]))
    except Exception as e:
        raise CheckpointError(f"load_sharded: {where} of {str(path)!r} is unreadable ({e}); load an earlier checkpoint.") from None


def load_sharded_run(path: PathLike, *, like: TrainState, process_group: Any = None) -> tuple[TrainState, dict[str, Any]]:
    """Load a sharded checkpoint into the layout of ``like``, with the run's metadata: ``(state, meta)``.

    ``like`` sharded (a DTensor state, on every rank: collective): each rank reads its
    own shards, whatever the number of ranks that saved. ``like`` plain: whole tensors
    (one process for inference, or every rank of a replicated run). The optimizer's
    layout must match ``like``'s (the same ``tx``).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    marker = read_marker(path)
    if not isinstance(like, TrainState):
        raise TypeError(f"load_sharded: like must be a TrainState, got {type(like).__name__}.")
    _model_diff(marker, like, path)
    tensors: dict[str, Tensor] = {f"params/{n}": _template(t) for n, t in like.params.items()}
    tensors.update({f"buffers/{n}": _template(t) for n, t in like.buffers.items()})
    opt_leaves, opt_spec = pytree.tree_flatten(like.opt_state)
    if pytree.treespec_dumps(opt_spec) != marker["opt_state"]["spec"]:
        raise CheckpointError(f"load_sharded: the optimizer state of {str(path)!r} has another layout than like's "
                              "(another optimizer, or another chain of stages). Load it into a state made with the same tx.")
    for i, leaf in enumerate(opt_leaves):
        if isinstance(leaf, Tensor):
            tensors[f"opt_state/{i}"] = _template(leaf)
    reader = _reader(path)
    stored = reader.read_metadata().state_dict_metadata
    for item in marker["slots"]["leaves"]:  # slots: whole tensors, shaped as saved
        if "tensor" in item:
            md = stored[item["tensor"]]
            tensors[item["tensor"]] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    group = _group(process_group) if any(_is_dtensor(t) for t in tensors.values()) else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=_reader(path), process_group=group, no_dist=group is None)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"load_sharded: reading {str(path)!r} failed ({type(e).__name__}: {str(e)[:300]}); "
                              "the files are truncated or corrupt: load an earlier checkpoint.") from None
    params = {n: tensors[f"params/{n}"].requires_grad_(t.requires_grad) for n, t in like.params.items()}
    buffers = {n: tensors[f"buffers/{n}"] for n in like.buffers}
    opt_state = _rebuild(marker["opt_state"], tensors, "the optimizer state", path)
    slots = _rebuild(marker["slots"], tensors, "the slots", path)
    state = like.replace(step=int(marker["step"]), rng=int(marker["rng"]), params=params, buffers=buffers,
                         opt_state=opt_state, slots=slots)
    return state, dict(marker.get("meta") or {})


def load_sharded(path: PathLike, *, like: TrainState, process_group: Any = None) -> TrainState:
    """Load a sharded checkpoint into the layout of ``like`` (see :func:`load_sharded_run`).

    In one process with a plain ``like`` (``TrainState.create(module, tx)``) this gives the
    whole state, gathered from every rank's shard: for inference, ``trainkit.to_module(state)``.

    >>> import tempfile, torch, trainkit as tk
    >>> s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
    >>> p = save_sharded(s.replace(step=7), tempfile.mkdtemp() + "/step-7")
    >>> load_sharded(p, like=s).step
    7
    """
    return load_sharded_run(path, like=like, process_group=process_group)[0]


# --------------------------------------------------------------------------- the checkpointer


class ShardedCheckpointer:
    """Where and when ``fit`` saves sharded checkpoints: ``directory/step-000000123/``, keeping the last ``keep_last``.

    The interface of :class:`trainkit.Checkpointer` (``save``, ``latest``, ``due_step``,
    ``due_epoch``, ``restore``, ``load_run``), but ``save`` is collective: ``all_ranks = True``
    tells ``fit`` to call it on every rank. Only complete checkpoints (with their marker)
    count; a save interrupted by a dead rank leaves the previous one the latest, and its
    leftovers are removed by the next save. Ranking by a metric (``monitor``) is not
    supported here yet.

    >>> import tempfile, torch, trainkit as tk
    >>> ck = ShardedCheckpointer(tempfile.mkdtemp(), every_n_steps=2, keep_last=1)
    >>> s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
    >>> _ = ck.save(s.replace(step=2)); _ = ck.save(s.replace(step=4))
    >>> [p.name for p in ck.checkpoints()], ck.due_step(4), ck.due_step(5)
    (['step-000000004'], True, False)
    """

    all_ranks = True  # fit: save on every rank, not on rank 0 only
    _NAME = re.compile(r"^step-(\d+)$")

    def __init__(
        self,
        directory: PathLike,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int = 1,
        keep_last: int | None = 3,
        process_group: Any = None,
    ) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"ShardedCheckpointer: keep_last must be an int >= 1 (or None for all), got {keep_last!r}.")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"ShardedCheckpointer: every_n_steps must be an int >= 1 or None, got {every_n_steps!r}.")
        self.directory = Path(directory)
        self.every_n_steps, self.every_n_epochs, self.keep_last = every_n_steps, every_n_epochs, keep_last
        self.process_group = process_group

    def due_step(self, step: int) -> bool:
        """Whether ``fit`` saves after global step ``step`` (every ``every_n_steps``)."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def due_epoch(self, epoch: int) -> bool:
        """Whether ``fit`` saves after epoch ``epoch`` (1-based; every ``every_n_epochs``)."""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    def _folders(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.directory.iterdir() if p.is_dir() and (m := self._NAME.match(p.name)))

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints (those with a marker), oldest first."""
        return [p for _, p in self._folders() if (p / _MARKER).is_file()]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState, meta: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> Path:
        """Save ``state`` as ``step-<step>/`` on every rank (collective), then prune (rank 0).

        ``metrics`` is accepted for ``fit``'s sake and not used (no ranking here).
        """
        path = save_sharded(state, self.directory / f"step-{state.step:09d}", meta=meta, process_group=self.process_group)
        if _dist.rank() == 0:
            self._prune(path)
        return path

    def restore(self, meta: Mapping[str, Any] | None) -> None:
        """Nothing to restore (no ranking); ``fit(resume=...)`` calls it."""

    def load_run(self, path: PathLike, *, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """``(state, meta)`` of the checkpoint at ``path``, in ``like``'s layout: what ``fit(resume=...)`` calls."""
        state, meta = load_sharded_run(path, like=like, process_group=self.process_group)
        for key in ("epoch", "batch", "history"):
            if key not in meta:
                raise CheckpointError(f"resume: {str(path)!r} was not written by fit (no {key!r}); use load_sharded instead.")
        return state, meta

    def _prune(self, new: Path) -> None:
        folders = self._folders()
        complete = [p for _, p in folders if (p / _MARKER).is_file()]
        keep = {new, *(complete[-self.keep_last:] if self.keep_last is not None else complete)}
        for _, p in folders:
            if p not in keep:  # an older complete one, or the leftover of a save that did not finish
                shutil.rmtree(p, ignore_errors=True)

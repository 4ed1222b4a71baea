"""``distributed``: several processes on ``torch.distributed`` (gloo on CPU, NCCL on CUDA), started by torchrun.

Each process (rank) runs the unchanged step on its own part of the global batch;
the gradients are averaged across ranks before the update, so every rank makes
the same update and the ranks stay identical: ``W`` ranks with local batches of
``B`` compute what one process computes on the global batch of ``W * B`` (for a
loss that is a mean over the batch).

How the gradients are reduced (as ``DistributedDataParallel`` does): the
:class:`~trainkit.StepHook` of this transform registers a hook on every
parameter just before backward. As backward produces each gradient, the hook
copies it into a flat **bucket** (about ``bucket_cap_mb`` each, parameters in
reverse order, the order backward produces them); a full bucket is all-reduced at
once, asynchronously, while backward goes on with the layers below. Buckets are
launched strictly in order, so every rank issues the same collectives in the same
order even when some parameters get no gradient. After backward the transform
waits for the last buckets and hands the averaged gradients on (each rank
divides by the world size as it copies into the bucket, so the sum is the
mean). ``overlap=False`` reduces all buckets after backward instead
(``benchmarks/scaling.py`` measures both).

Processes: launch with torchrun; nothing here starts processes::

    torchrun --nproc-per-node 4 train.py                      # one machine, 4 ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint host0:29400 --rdzv-id job42 train.py   # on each of 2 machines

When the default process group is not initialized yet, wrapping a step initializes
it from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
NCCL when CUDA is available (and ``torch.cuda.set_device(LOCAL_RANK)``), gloo
otherwise. Put the state on :func:`local_device`.

A dead or hung peer: a collective that does not complete within ``timeout``
seconds, or that fails because a peer closed its connection, raises
:class:`DistributedError` naming the rank, the step and the collective, and the
timeout is set on the process group too, so the surviving process exits instead
of waiting for its peers forever (torchrun then stops or restarts the group).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from .. import functional as _functional
from .. import optim as _optim
from ..contract import batch_size, check_step_output
from ..dist import DistributedError, reduce_means, shard_loader
from ..state import TrainState
from ._base import mark, two_forms
from .table import check_order

__all__ = [
    "distributed", "DistributedError", "local_device", "shard_loader", "reduce_means",
    "shard_state", "gather_state", "is_sharded", "local_state_bytes", "model_differences",
]

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")




# --------------------------------------------------------------------------- the process group


def local_device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU.

    >>> import torch
    >>> local_device() == (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu"))
    True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _seconds(timeout: Any) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or not math.isfinite(timeout):
        raise ValueError(f"distributed: timeout must be a positive number of seconds (or a timedelta), got {timeout!r}.")
    return float(timeout)


def _init_default_group(backend: str | None, timeout: datetime.timedelta) -> None:
    dist = torch.distributed
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            "distributed: there is no process group, and none can be made: this process was not started by "
            f"torchrun ({', '.join(missing)} unset). Launch the script with torchrun, e.g. "
            "`torchrun --nproc-per-node 2 train.py`, or call torch.distributed.init_process_group(...) "
            "before wrapping the step, or pass process_group=."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # After torchrun restarts the group, the workers meet in the same store as the killed ones did,
        # where the killed ranks' addresses are still written: a new rank 0 can read one of them and fail
        # ("Gloo connectFullMesh failed ... Connection refused", measured with --max-restarts 1). A prefix
        # per attempt keeps each attempt to its own keys.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"trainkit/attempt-{attempt}", store)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timeout)
        return
    dist.init_process_group(backend, timeout=timeout)


@dataclass
class _Comm:
    """The group a wrapped step reduces over, and how to wait on it."""

    group: Any
    rank: int
    world: int
    backend: str
    timeout: float

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world} ({self.backend})"

    def launch(self, tensor: Tensor, what: str, step: int, op: Any = None) -> Any:
        dist = torch.distributed
        try:
            return dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self.error(what, step, e) from e

    def wait(self, work: Any, what: str, step: int) -> None:
        try:
            if self.backend == "nccl":
                work.wait()  # a stream dependency, not a host sync; NCCL's watchdog enforces the timeout
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise self.error(what, step, e) from e

    def all_reduce(self, tensor: Tensor, what: str, step: int, op: Any = None) -> Tensor:
        self.wait(self.launch(tensor, what, step, op), what, step)
        return tensor

    def error(self, what: str, step: int, cause: BaseException) -> DistributedError:
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        why = (
            f"it did not complete within timeout={self.timeout:g}s: a peer rank has died, hangs, "
            "or runs a different number of steps (uneven data?)"
            if timed_out
            else "a peer rank has died or closed its connection"
        )
        return DistributedError(
            f"distributed: the {what} at step {step} failed on {self.describe()}: {why}. "
            f"[{type(cause).__name__}: {text[:300]}] "
            "The run cannot go on from here. Check the other ranks' logs; restart the run "
            "(torchrun --max-restarts, fit(..., resume='latest')); raise timeout= for steps that are slow on purpose."
        )


def _make_comm(process_group: Any, backend: str | None, timeout: float) -> _Comm:
    dist = torch.distributed
    if not dist.is_available():
        raise RuntimeError("distributed: this build of torch has no torch.distributed.")
    td = datetime.timedelta(seconds=timeout)
    if process_group is None:
        if not dist.is_initialized():
            _init_default_group(backend, td)
        group = dist.group.WORLD
    else:
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"distributed: process_group must be a torch.distributed.ProcessGroup (or None for the default group), "
                f"got {type(process_group).__name__}."
            )
        group = process_group
    if hasattr(group, "set_timeout"):
        # So that the process of a survivor exits too: gloo's own pending receive then times out.
        group.set_timeout(td)
    return _Comm(group, dist.get_rank(group), dist.get_world_size(group), str(dist.get_backend(group)), timeout)


# --------------------------------------------------------------------------- gradient buckets


@dataclass(frozen=True)
class _Layout:
    buckets: tuple[tuple[int, ...], ...]  # parameter indices per bucket, in launch order
    where: tuple[tuple[int, int], ...]  # per parameter: (bucket, offset)
    sizes: tuple[int, ...]  # elements per bucket
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[torch.device, ...]


def _layout(params: Sequence[Tensor], cap_bytes: int) -> _Layout:
    # Reverse order (backward produces the last layer's gradients first); a small first
    # bucket, as DDP does, so communication starts early.
    buckets: list[list[int]] = []
    sizes: list[int] = []
    kinds: list[tuple[torch.dtype, torch.device]] = []
    cap = min(cap_bytes, 1 << 20)
    where: dict[int, tuple[int, int]] = {}
    for i in reversed(range(len(params))):
        p = params[i]
        kind = (p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        if not buckets or kinds[-1] != kind or (sizes[-1] and (sizes[-1] * p.element_size() + nbytes > cap)):
            if buckets:
                cap = cap_bytes
            buckets.append([])
            sizes.append(0)
            kinds.append(kind)
        where[i] = (len(buckets) - 1, sizes[-1])
        buckets[-1].append(i)
        sizes[-1] += p.numel()
    return _Layout(
        tuple(tuple(b) for b in buckets),
        tuple(where[i] for i in range(len(params))),
        tuple(sizes),
        tuple(k[0] for k in kinds),
        tuple(k[1] for k in kinds),
    )


class _Round:
    """One backward pass: the buckets being filled, and their all-reduces in flight."""

    def __init__(self, layout: _Layout, params: Sequence[Tensor], comm: _Comm, step: int) -> None:
        self.layout = layout
        self.comm = comm
        self.step = step
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.flats = [torch.empty(n, dtype=d, device=dev) for n, d, dev in zip(layout.sizes, layout.dtypes, layout.devices, strict=True)]
        self.missing = [len(b) for b in layout.buckets]
        self.captured: list[Tensor | None] = [None] * len(params)
        self.works: list[Any] = [None] * len(layout.buckets)
        self.launched = 0
        self.handles: list[Any] = []
        self.scale = 1.0 / comm.world  # applied while copying in: the sum of the buckets is then the mean

    def what(self, b: int) -> str:
        return f"gradient all-reduce (bucket {b + 1}/{len(self.flats)})"

    def put(self, i: int, grad: Tensor) -> None:
        b, off = self.layout.where[i]
        with torch.no_grad():
            dst = self.flats[b][off : off + self.numels[i]]
            if self.scale == 1.0:
                dst.copy_(grad.reshape(-1))
            else:
                torch.mul(grad.reshape(-1), self.scale, out=dst)
        self.captured[i] = grad
        self.missing[b] -= 1
        self.launch_ready()

    def launch_ready(self) -> None:
        while self.launched < len(self.flats) and self.missing[self.launched] == 0:
            b = self.launched
            self.works[b] = self.comm.launch(self.flats[b], self.what(b), self.step)
            self.launched += 1

    def hook(self, i: int) -> Callable[[Tensor], None]:
        def on_grad(grad: Tensor) -> None:
            self.put(i, grad)

        return on_grad

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self, grads: list[Tensor]) -> list[Tensor]:
        self.close()
        if any(c is not None and g is not c for g, c in zip(grads, self.captured, strict=True)):
            # A hook outside this transform changed the gradients after backward: what is in
            # flight is stale. Drain it (every rank issued it) and reduce what we were given.
            for b in range(self.launched):
                self.comm.wait(self.works[b], self.what(b), self.step)
            self.captured = [None] * len(grads)
            self.missing = [len(b) for b in self.layout.buckets]
            self.works = [None] * len(self.flats)
            self.launched = 0
        for i, g in enumerate(grads):
            if self.captured[i] is None:  # no hook fired: an unused parameter, or overlap=False
                self.put(i, g)
        for b in range(len(self.flats)):
            self.comm.wait(self.works[b], self.what(b), self.step)
        out: list[Tensor] = []
        for i in range(len(grads)):
            b, off = self.layout.where[i]
            out.append(self.flats[b][off : off + self.numels[i]].view(self.shapes[i]))
        return out


class _GradientReducer(_functional.StepHook):
    """Starts bucketed all-reduces during backward (``loss`` hook), finishes them after (``grads`` hook)."""

    owner = "distributed"
    traceable = False  # its all-reduces are asynchronous and wait on other processes

    def __init__(self, comm: _Comm, cap_bytes: int, overlap: bool, layouts: dict, step: int) -> None:
        self.comm = comm
        self.cap_bytes = cap_bytes
        self.overlap = overlap
        self.layouts = layouts
        self.step = step
        self.round: _Round | None = None
        self.rounds = 0

    def _begin(self, params: Sequence[Tensor]) -> _Round:
        key = tuple((tuple(p.shape), p.dtype, p.device) for p in params)
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = _layout(params, self.cap_bytes)
        return _Round(layout, params, self.comm, self.step)

    def loss(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        self.close()
        self.round = self._begin(params)
        if self.overlap:
            for i, p in enumerate(params):
                if p.requires_grad:
                    self.round.handles.append(p.register_hook(self.round.hook(i)))
        return loss

    def grads(self, grads: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
        rnd = self.round if self.round is not None else self._begin(params)
        self.round = None
        self.rounds += 1
        return rnd.finish(list(grads))

    def close(self) -> None:
        if self.round is not None:
            self.round.close()
            self.round = None


# --------------------------------------------------------------------------- metrics and the first step


def _finish(
    new_state: TrainState, metrics: Mapping[str, Any], rounds: int, comm: _Comm, reduce: bool, n: int, step: int
) -> tuple[TrainState, Mapping[str, Any]]:
    """After a distributed step: no gradient exchanged is an error; the metrics averaged over ranks if asked."""
    if rounds == 0:
        raise RuntimeError(
            "distributed: the step computed no gradients through trainkit.value_and_grad, so nothing was "
            "averaged across ranks and they would drift apart. Compute them with tk.value_and_grad(loss_fn)(state.params)."
        )
    if not reduce:
        return new_state, metrics
    device = new_state.device if comm.backend == "nccl" else torch.device("cpu")
    return new_state, _reduce_metrics(metrics, n, comm, device, step)


def _mean_over_ranks(tensors: Mapping[str, Tensor], comm: _Comm, step: int) -> dict[str, Tensor]:
    """The mean over ranks of a dict of tensors (MultiSteps' accumulator): one all-reduce per dtype."""
    out: dict[str, Tensor] = {}
    by_dtype: dict[Any, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault((t.dtype, t.device), []).append(name)
    with torch.no_grad():
        for names in by_dtype.values():
            flat = torch.cat([tensors[n].reshape(-1) for n in names])  # a new buffer: the input stays as it was
            comm.all_reduce(flat, "accumulated-gradient all-reduce", step)
            flat.div_(comm.world)
            for n, piece in zip(names, flat.split([tensors[n].numel() for n in names]), strict=True):
                out[n] = piece.view_as(tensors[n])
    return out


def _reduce_metrics(metrics: Mapping[str, Any], n: int, comm: _Comm, device: torch.device, step: int) -> dict[str, Any]:
    keys = list(metrics)
    if not keys:
        return {}
    with torch.no_grad():
        vals = [torch.as_tensor(metrics[k]).detach().to(device, torch.float64).reshape(()) for k in keys]
        packed = torch.stack([*vals, torch.ones((), dtype=torch.float64, device=device)]) * float(n)
        comm.all_reduce(packed, "metric all-reduce", step)
        means = packed[:-1] / packed[-1]
    out = {}
    for i, k in enumerate(keys):
        v = metrics[k]
        dtype = v.dtype if isinstance(v, Tensor) and v.is_floating_point() else torch.get_default_dtype()
        out[k] = means[i].to(dtype)
    return out


def _check_same_start(state: TrainState, comm: _Comm) -> None:
    """Every rank must start from the same state, or the ranks silently drift apart."""
    with torch.no_grad():
        device = state.device if comm.backend == "nccl" else torch.device("cpu")
        p = [t.detach().to(device, torch.float64) for t in state.params.values()]
        total = torch.stack([t.sum() for t in p]).sum() if p else torch.zeros((), dtype=torch.float64, device=device)
        squares = torch.stack([(t * t).sum() for t in p]).sum() if p else total
        mine = torch.stack([total, squares, torch.tensor(float(state.step), dtype=torch.float64, device=device),
                            torch.tensor(float(state.rng % (1 << 52)), dtype=torch.float64, device=device)])
        both = torch.cat([mine, -mine])
        comm.all_reduce(both, "start-state check", state.step, torch.distributed.ReduceOp.MAX)
    if not torch.equal(both[:4], -both[4:]):
        raise DistributedError(
            f"distributed: the ranks start from different states (params, step or rng differ; seen on {comm.describe()}). "
            "Build the state the same way on every rank (torch.manual_seed(0) before creating the model, the same "
            "seed= for TrainState.create), or resume every rank from the same checkpoint."
        )


# --------------------------------------------------------------------------- sharded params (params="fsdp")
#
# The SimpleFSDP design, on DTensor: the state's params and the optimizer state shaped like
# them are DTensors sharded on dim 0 (Shard(0)) over a 1-D device mesh; each rank holds and
# updates only its shard, with trainkit's own optimizer (its foreach kernels run on DTensors:
# DTensor dispatches them to the local shards, and clip_by_global_norm's norm comes out
# Replicate, i.e. global). For the forward, a module hook all-gathers each module's params
# just before that module runs (redistribute(Replicate()), differentiable); its backward,
# declared by to_local(grad_placements=[Partial("avg")]), is a reduce-scatter of the
# gradient, so value_and_grad returns each rank's shard of the mean gradient over ranks.
# fully_shard (FSDP2) was tried first and does not fit: it gathers into separate unsharded
# leaf Parameters and accumulates into .grad of the sharded ones, so the gradient of the
# loss with respect to the state's (sharded) params, which torch.autograd.grad computes in
# tk.value_and_grad, does not exist in its graph.


def _dtensor_api() -> Any:
    from torch.distributed import tensor as dt

    _register_missing_strategies()
    return dt


_REGISTERED: list[bool] = []


def _register_missing_strategies() -> None:
    """Teach DTensor the one foreach op trainkit.optim uses that torch 2.13 leaves out.

    ``optim.MultiSteps`` starts each accumulation with ``torch._foreach_copy_``, which DTensor
    has no sharding strategy for ("Operator aten._foreach_copy_.default does not have a
    sharding strategy registered"). It is pointwise: registered as torch registers its other
    foreach ops (``_foreach_add_.List`` and the like), so the shards are copied locally.
    """
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._ops._pointwise_ops import _register_single_dim_pointwise

        op = torch.ops.aten._foreach_copy_.default
        if op not in DTensor._op_dispatcher.sharding_propagator.op_single_dim_strategy_funcs:
            _register_single_dim_pointwise(op)
    except (ImportError, AttributeError):  # another torch: it may know the op already
        pass


_MESHES: dict[Any, Any] = {}  # process group -> its 1-D DeviceMesh (one per group, as torch keeps groups)


def _mesh(comm: _Comm) -> Any:
    mesh = _MESHES.get(comm.group)
    if mesh is None:
        from torch.distributed.device_mesh import DeviceMesh

        device_type = "cuda" if comm.backend == "nccl" else "cpu"
        mesh = _MESHES[comm.group] = DeviceMesh.from_group(comm.group, device_type)
    return mesh


def _is_ours(t: Any) -> bool:
    return isinstance(t, _dtensor_api().DTensor) and any(t.device_mesh is m for m in _MESHES.values())


def _placement(t: Tensor) -> Any:
    dt = _dtensor_api()
    return dt.Shard(0) if t.dim() >= 1 else dt.Replicate()  # a 0-d param cannot be split: each rank keeps it


def _to_dtensor(t: Tensor, mesh: Any, requires_grad: bool) -> Tensor:
    dt = _dtensor_api()
    # src_data_rank=None: every rank cuts its shard from its own copy, no communication
    # (the copies were checked equal across ranks first).
    out = dt.distribute_tensor(t.detach(), mesh, [_placement(t)], src_data_rank=None)
    return out.requires_grad_(requires_grad)


def is_sharded(state: TrainState) -> bool:
    """Whether ``state``'s params are sharded DTensors (made by :func:`shard_state` or ``distributed(params="fsdp")``).

    >>> import torch, trainkit as tk
    >>> is_sharded(tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1)))
    False
    """
    return any(isinstance(t, _dtensor_api().DTensor) for t in state.params.values()) if torch.distributed.is_available() else False


def dist_available() -> bool:
    return torch.distributed.is_available()


def _map_param_shaped(tree: Any, params: Mapping[str, Tensor], fn: Callable[[Tensor, str], Tensor]) -> Any:
    """``tree`` (an optimizer state) with ``fn`` applied to each tensor kept under a param's name with its shape."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        key = getattr(path[-1], "key", None) if path else None
        if isinstance(leaf, Tensor) and isinstance(key, str) and key in params and tuple(leaf.shape) == tuple(params[key].shape):
            leaf = fn(leaf, key)
        out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def _signature(state: TrainState) -> list[tuple[str, str, tuple[int, ...], str]]:
    return [(kind, n, tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for kind, tensors in (("param", state.params), ("buffer", state.buffers)) for n, t in tensors.items()]


def _ranks(rs: Sequence[int]) -> str:
    return f"rank {rs[0]}" if len(rs) == 1 else f"ranks {list(rs)}"


def model_differences(signatures: Sequence[Sequence[tuple[str, str, tuple[int, ...], str]]]) -> list[str]:
    """What differs between the ranks' models, one line per param or buffer (``[]``: none).

    ``signatures[r]`` lists rank ``r``'s ``(kind, name, shape, dtype)``.

    >>> model_differences([[("param", "w", (2, 3), "float32")], [("param", "w", (2, 4), "float32")]])
    ["param 'w': shape (2, 3) float32 on rank 0, shape (2, 4) float32 on rank 1"]
    >>> model_differences([[("param", "w", (2,), "float32")], []])
    ["param 'w': shape (2,) float32 on rank 0, missing on rank 1"]
    """
    names: dict[tuple[str, str], None] = {}
    by_rank = []
    for sig in signatures:
        mine = {(k, n): (shape, dtype) for k, n, shape, dtype in sig}
        by_rank.append(mine)
        names.update(dict.fromkeys(mine))
    lines = []
    for kind, name in names:
        seen: dict[Any, list[int]] = {}
        for r, mine in enumerate(by_rank):
            seen.setdefault(mine.get((kind, name)), []).append(r)
        if len(seen) > 1:
            parts = [f"{'missing' if v is None else f'shape {v[0]} {v[1]}'} on {_ranks(rs)}" for v, rs in seen.items()]
            lines.append(f"{kind} {name!r}: " + ", ".join(parts))
    return lines


def _check_same_model(state: TrainState, comm: _Comm) -> None:
    """Every rank must hold the same model (names, shapes, dtypes): else the shards do not line up."""
    gathered: list[Any] = [None] * comm.world
    try:
        torch.distributed.all_gather_object(gathered, _signature(state), group=comm.group)
    except RuntimeError as e:
        raise comm.error("model check (all_gather_object)", state.step, e) from e
    lines = model_differences(gathered)
    if lines:
        shown = "; ".join(lines[:8]) + (f"; and {len(lines) - 8} more" if len(lines) > 8 else "")
        raise ValueError(
            f"distributed(params='fsdp'): the ranks were built with different models: {shown}. "
            "Build the same model on every rank (the same code and arguments), or resume every rank from the same checkpoint."
        )


def _check_same_position(state: TrainState, comm: _Comm) -> None:
    """A sharded state: the ranks must be at the same step with the same rng (their params are shards)."""
    with torch.no_grad():
        mine = torch.tensor([float(state.step), float(state.rng % (1 << 52))], dtype=torch.float64)
        if comm.backend == "nccl":
            mine = mine.to(state.device.type if state.device.type == "cuda" else local_device())
        both = torch.cat([mine, -mine])
        comm.all_reduce(both, "start-state check", state.step, torch.distributed.ReduceOp.MAX)
    if not torch.equal(both[:2], -both[2:]):
        raise DistributedError(
            f"distributed: the ranks start from different states (step or rng differ; seen on {comm.describe()}). "
            "Resume every rank from the same checkpoint."
        )


def _shard(state: TrainState, comm: _Comm) -> TrainState:
    _check_same_model(state, comm)
    _check_same_start(state, comm)
    mesh = _mesh(comm)
    params = {n: _to_dtensor(t, mesh, t.requires_grad) for n, t in state.params.items()}
    opt_state = _map_param_shaped(state.opt_state, state.params, lambda t, n: _to_dtensor(t, mesh, False))
    return state.replace(params=params, opt_state=opt_state)


def shard_state(state: TrainState, *, process_group: Any = None, timeout: Union[float, datetime.timedelta] = 600.0) -> TrainState:
    """``state`` with its params and the optimizer state shaped like them sharded across the ranks (ZeRO-3).

    Each param becomes a DTensor sharded on dim 0 over the ranks of ``process_group``
    (a 0-d param stays whole on every rank); each rank then holds about ``1/W`` of the
    params and optimizer state. Collective: call it on every rank. First checks that
    every rank holds the same model (``ValueError`` naming each param that differs and
    the ranks) and the same values, step and rng (:class:`DistributedError`).
    ``distributed(params="fsdp")`` calls it on a state that is not sharded yet.

    >>> import torch, trainkit as tk
    >>> shard_state(tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1)))  # doctest: +SKIP
    """
    comm = _make_comm(process_group, None, _seconds(timeout))
    if not isinstance(state, TrainState):
        raise TypeError(f"shard_state: state must be a TrainState, got {type(state).__name__}.")
    return state if is_sharded(state) else _shard(state, comm)


def gather_state(state: TrainState) -> TrainState:
    """``state`` with every sharded tensor gathered whole (plain tensors, on every rank): for export or evaluation.

    Collective when ``state`` is sharded (call it on every rank); returns ``state`` as it is otherwise.

    >>> import torch, trainkit as tk
    >>> s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
    >>> gather_state(s) is s
    True
    """
    if not is_sharded(state):
        return state
    DTensor = _dtensor_api().DTensor

    def full(t: Any) -> Any:
        return t.full_tensor() if isinstance(t, DTensor) else t

    with torch.no_grad():
        params = {n: full(t).detach().requires_grad_(t.requires_grad) for n, t in state.params.items()}
        opt_state = _map_param_shaped(state.opt_state, state.params, lambda t, n: full(t))
    return state.replace(params=params, opt_state=opt_state)


def local_state_bytes(state: TrainState) -> int:
    """Bytes of params + optimizer state held by this rank (only the local shard of a sharded tensor).

    >>> import torch, trainkit as tk
    >>> local_state_bytes(tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.adam(1e-3)))  # 4 floats, 3 copies
    48
    """
    from torch.utils import _pytree as pytree

    DTensor = _dtensor_api().DTensor if torch.distributed.is_available() else ()
    total = 0
    for t in pytree.tree_leaves((state.params, state.opt_state)):
        if isinstance(t, Tensor):
            local = t.to_local() if isinstance(t, DTensor) else t
            total += local.numel() * local.element_size()
    return total


class _Gatherer:
    """The module hooks that swap a module's sharded params for whole ones while it runs.

    Installed once per process (global module hooks), they act only on DTensors of the
    meshes made here. With grad enabled (a train step) the gather is differentiable and
    its backward reduce-scatters the gradient; without (evaluation), the whole params are
    kept until the shards change, so an evaluation gathers once, not per batch (ranks may
    then run different numbers of eval batches, each at least one).
    """

    def __init__(self) -> None:
        self.saved: dict[int, list[list[tuple[str, Tensor]]]] = {}
        self.cache: dict[int, tuple[Any, int, Tensor]] = {}
        self.ready: dict[int, Tensor] = {}  # prefetched gathers of this step, by id of the shard
        self.handles: list[Any] = []

    def install(self) -> None:
        if not self.handles:
            from torch.nn.modules import module as m

            self.handles = [m.register_module_forward_pre_hook(self.pre), m.register_module_forward_hook(self.post, always_call=True)]

    @staticmethod
    def gather(p: Tensor, async_op: bool = False) -> Tensor:
        """The whole of ``p``, differentiable: its backward reduce-scatters the gradient (the mean over ranks)."""
        dt = _dtensor_api()
        return p.redistribute(p.device_mesh, [dt.Replicate()], async_op=async_op).to_local(grad_placements=[dt.Partial("avg")])

    def prefetch(self, params: Mapping[str, Tensor]) -> None:
        """Launch the all-gathers of every sharded param now, in the params' order, without waiting.

        Each is waited for only when its module first uses it (an ``AsyncCollectiveTensor``),
        so the gathers of the later layers run while the first layers compute.
        """
        self.cache.clear()
        self.ready = {id(p): self.gather(p, async_op=True) for p in params.values() if _is_ours(p) and p.requires_grad}

    def whole(self, p: Tensor) -> Tensor:
        if torch.is_grad_enabled() and p.requires_grad:
            self.cache.clear()  # training: the shards are about to change
            ready = self.ready.pop(id(p), None)
            return ready if ready is not None else self.gather(p)
        local = p.to_local()
        hit = self.cache.get(id(p))
        if hit is not None and hit[0]() is local and hit[1] == local._version:
            return hit[2]
        import weakref

        with torch.no_grad():
            full = p.full_tensor()
        self.cache[id(p)] = (weakref.ref(local), local._version, full)
        return full

    def pre(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or not module._parameters:
            return  # what tk.jit traces never holds sharded params (jit does not compose with distributed)
        swapped = [(attr, p) for attr, p in module._parameters.items() if p is not None and _is_ours(p)]
        if swapped:
            for attr, p in swapped:
                module._parameters[attr] = self.whole(p)  # type: ignore[assignment]
            self.saved.setdefault(id(module), []).append(swapped)

    def post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or not self.saved:
            return
        stack = self.saved.get(id(module))
        if stack:
            for attr, p in stack.pop():
                module._parameters[attr] = p  # type: ignore[assignment]
            if not stack:
                del self.saved[id(module)]


_GATHERER = _Gatherer()


class _ShardedGradients(_functional.StepHook):
    """Counts the backward passes of a sharded step; the gradients arrive reduce-scattered (by autograd)."""

    owner = "distributed"
    traceable = False

    def __init__(self) -> None:
        self.rounds = 0

    def grads(self, grads: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
        self.rounds += 1
        return grads


def _is_comm_failure(e: BaseException) -> bool:
    kinds = tuple(k for k in (getattr(torch.distributed, "DistError", None),) if k is not None)
    text = str(e).lower()
    return isinstance(e, kinds) or any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def _fsdp(inner: Callable[..., Any], comm: _Comm, reduce_metrics: bool, overlap: bool) -> Callable[..., Any]:
    _mesh(comm)
    _GATHERER.install()
    checked = [False]

    def fsdp_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"distributed: state must be a TrainState, got {type(state).__name__}.")
        if not is_sharded(state):
            state = _shard(state, comm)  # the caller's state stays as it was; the result is sharded
        elif not checked[0]:
            _check_same_position(state, comm)
        checked[0] = True
        hook = _ShardedGradients()
        try:
            if overlap and torch.is_grad_enabled():
                _GATHERER.prefetch(state.params)
            with _functional.hooks(hook, params=state.params):
                new_state, metrics = check_step_output(inner(state, batch), "distributed: step")
        except RuntimeError as e:
            if isinstance(e, DistributedError) or not _is_comm_failure(e):
                raise
            raise comm.error("parameter all-gather or gradient reduce-scatter", state.step, e) from e
        finally:
            _GATHERER.ready = {}  # what the step did not use (none, for a step that runs every module)
        return _finish(new_state, metrics, hook.rounds, comm, reduce_metrics, batch_size(batch), state.step)

    return fsdp_step


# --------------------------------------------------------------------------- the transform


def distributed(
    step: Callable[..., Any] | None = None,
    *,
    process_group: Any = None,
    timeout: Union[float, datetime.timedelta] = 600.0,
    bucket_cap_mb: float = 25.0,
    overlap: bool = True,
    reduce_metrics: bool = True,
    backend: str | None = None,
    params: str = "replicated",
) -> Any:
    """Run ``step`` on every rank of a ``torch.distributed`` group, averaging the gradients across ranks.

    Args:
      step: a batch step ``(state, batch) -> (state, metrics)`` computing its gradients
        with :func:`trainkit.value_and_grad`; each rank passes its own part of the global
        batch (:func:`trainkit.fit` shards the data for you). Omit it for :func:`trainkit.compose`.
      process_group: the group to reduce over; ``None`` is the default group, which is
        initialized from torchrun's environment if it is not yet (``backend``: ``None``
        picks NCCL where CUDA is available, else gloo).
      timeout: seconds (or a ``timedelta``) a collective may take before
        :class:`DistributedError` is raised; also set on the group, so a survivor of a dead
        peer exits. Default 600 s (NCCL's default).
      bucket_cap_mb: size of the gradient buckets (DDP's default, 25 MB).
      overlap: all-reduce each bucket as soon as backward has filled it (default), or
        all of them after backward. With ``params="fsdp"``: launch every param's
        all-gather at the start of the step, each waited for when its module runs
        (default), or gather each module's params only when it runs.
      reduce_metrics: average the metrics across ranks, weighted by each rank's batch
        size (one small all-reduce per step), so that every rank logs, checks and stops
        on the same numbers.
      params: ``"replicated"`` (default: every rank holds the whole model and optimizer
        state, DDP-style) or ``"fsdp"`` (ZeRO-3: params, gradients and optimizer state
        sharded across the ranks on DTensor, about ``1/W`` of them per rank; see below).

    Sharded params (``params="fsdp"``, the SimpleFSDP design): the step takes a state
    sharded by :func:`shard_state` (a state that is not sharded yet is sharded on the way
    in; the caller's stays as it is) and returns a sharded one. Each module's params are
    all-gathered for its forward and the gradients reduce-scattered by autograd, so each
    rank's optimizer updates only its shard (``bucket_cap_mb`` does not apply; the
    gradient accumulation of ``optim.MultiSteps`` reduces every micro-step). Every rank
    must run the same modules in the same order (a rank-dependent forward would wait for
    collectives its peers never issue, until ``timeout``); params the step uses outside a
    module call are DTensors. Evaluating a sharded state gathers its params once, on the
    first forward after an update. Checkpoint with
    :class:`trainkit.sharded_checkpoint.ShardedCheckpointer`; :func:`gather_state` gives
    the whole state back.

    Returns:
      The wrapped step. Its gradients are the mean over ranks of each rank's gradients
      (each rank counts equally, as in DDP: give every rank the same batch size, which
      ``fit``'s sharding does), so ``W`` ranks equal one process on the global batch.

    Raises:
      RuntimeError: at wrap time, when there is no process group and no torchrun environment.
      ValueError: at wrap time, for bad arguments or another parallel transform inside.
      TypeError: at wrap time, for an epoch step.
      DistributedError: at call time, when a collective fails or times out, or when the
        ranks start from different states.

    Gradient accumulation (``optim.MultiSteps``): the non-final micro-steps run no
    collective at all (DDP's ``no_sync``); the final one all-reduces the accumulator and
    its own gradient, so the update equals one process accumulating the global batches.

    Where it stands: outermost among the batch-step transforms
    (``tk.compose(tk.distributed(), tk.mixed_precision(...))``), so that inner
    transforms see the averaged gradients and every rank makes the same decisions.
    ``early_stop`` wraps the epoch step built from it; its decision is the same on
    every rank because ``fit`` averages the epoch metrics over ranks.

    >>> import torch, trainkit as tk
    >>> tk.distributed(timeout=-1)
    Traceback (most recent call last):
    ...
    ValueError: distributed: timeout must be a positive number of seconds (or a timedelta), got -1.
    """
    seconds = _seconds(timeout)
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
        raise ValueError(f"distributed: bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}.")
    for name, flag in (("overlap", overlap), ("reduce_metrics", reduce_metrics)):
        if not isinstance(flag, bool):
            raise TypeError(f"distributed: {name} must be True or False, got {flag!r}.")
    if params not in ("replicated", "fsdp"):
        raise ValueError(f"distributed: params must be 'replicated' or 'fsdp', got {params!r}.")
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"distributed: backend must be 'gloo', 'nccl' or None (pick by device), got {backend!r}.")
    cap_bytes = max(1, int(bucket_cap_mb * (1 << 20)))

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        check_order("distributed", inner)
        comm = _make_comm(process_group, backend, seconds)
        if params == "fsdp":
            return mark(_fsdp(inner, comm, reduce_metrics, overlap), inner, "distributed")
        layouts: dict = {}
        checked = [False]

        def distributed_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
            if not isinstance(state, TrainState):
                raise TypeError(f"distributed: state must be a TrainState, got {type(state).__name__}.")
            if comm.backend == "nccl" and state.params and state.device.type != "cuda":
                raise ValueError(
                    f"distributed: the process group uses NCCL, which reduces CUDA tensors, but the state is on {state.device}. "
                    "Put it on this rank's GPU: state.to(trainkit.transforms.distributed.local_device())."
                )
            if not checked[0]:
                _check_same_start(state, comm)
                checked[0] = True
            if _optim.is_accumulating(state.opt_state):
                # A non-final micro-step of optim.MultiSteps: its gradient stays in this rank's
                # accumulator (DDP's no_sync), so no collective at all; the final micro-step reduces.
                return check_step_output(inner(state, batch), "distributed: step")
            state = state.replace(opt_state=_optim.map_accumulated(state.opt_state, lambda acc: _mean_over_ranks(acc, comm, state.step)))
            reducer = _GradientReducer(comm, cap_bytes, overlap, layouts, state.step)
            try:
                with _functional.hooks(reducer, params=state.params):
                    new_state, metrics = check_step_output(inner(state, batch), "distributed: step")
            finally:
                reducer.close()
            return _finish(new_state, metrics, reducer.rounds, comm, reduce_metrics, batch_size(batch), state.step)

        return mark(distributed_step, inner, "distributed")

    return two_forms(step, "distributed", make)

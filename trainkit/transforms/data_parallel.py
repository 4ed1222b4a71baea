"""``data_parallel``: one process, several devices (Lightning's ``dp``, JAX's ``pmap``).

The batch is split along its first dimension, the state is replicated on each
device, the replicas run the step at the same time (one thread each), their
gradients are averaged **weighted by shard size**, and ONE optimizer update is
made on the primary state (on ``devices[0]``). For a loss that is a mean over
the batch this is exactly the gradient of the whole batch, so
``data_parallel(step)(state, batch)`` equals ``step(state, batch)`` (up to float
rounding) whatever the batch size, also when it does not divide evenly.

How it reaches into the step: through :func:`trainkit.value_and_grad`. Each
replica runs the unchanged step under a :class:`~trainkit.StepHook` whose
``grads`` hook waits for every replica's gradients and hands back their weighted
mean, and whose ``applies_update`` lets only the primary replica update the params
(each replica calls the state's skeleton through a module copy of its own thread).
A step written with ``tk.value_and_grad`` and ``state.apply_gradients`` therefore
works as it is.

What differs from the step on the whole batch (as in ``torch.nn.DataParallel``):

* **BatchNorm in training mode** normalizes each shard with that shard's own
  statistics (there is no SyncBatchNorm across replicas), so a model with
  BatchNorm is not numerically the full-batch step.
* **BatchNorm buffers (the policy).** The running statistics of the new state are
  the *shard-size-weighted mean of the replicas' buffers* (floating-point buffers;
  integer ones such as ``num_batches_tracked`` are the primary replica's, they are
  the same on every replica). The running mean is then exactly the one the whole
  batch would give (the mean of shard means weighted by their sizes is the batch
  mean); the running variance is the mean of the shard variances, which misses the
  spread between shard means (small for shuffled data). Taking replica 0's buffers
  alone, as ``nn.DataParallel`` does, would throw away the other shards' data.
* **Dropout**: replica ``i > 0`` draws from ``rng`` folded with ``i`` (replica 0 uses
  the state's own, so one replica is the bare step exactly), so shards do not share
  masks; the masks are not those of the full-batch step.

Metrics are the shard-size-weighted means of the replicas' metrics, on ``devices[0]``.
Put ``data_parallel`` outermost in a composition (``tk.compose(tk.data_parallel(),
tk.mixed_precision(...))``): inner transforms then run inside every replica.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .. import functional as _functional
from ..contract import check_step_output
from ..rng import derive_seed
from ..state import TrainState
from ._base import mark, two_forms
from .table import check_order

__all__ = ["data_parallel"]

DeviceSpec = Union[None, int, Sequence[Union[str, torch.device]]]


def _resolve_devices(devices: DeviceSpec) -> list[torch.device]:
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices is None:
        return [torch.device("cuda", i) for i in range(n_gpu)] if n_gpu else [torch.device("cpu")]
    if isinstance(devices, bool) or isinstance(devices, (str, torch.device)):
        raise TypeError(
            f"data_parallel: devices must be an int count or a list of devices, got {devices!r}. "
            'Use e.g. devices=2, devices=["cuda:0", "cuda:1"] or devices=["cpu", "cpu"].'
        )
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"data_parallel: devices must be at least 1, got {devices}.")
        if n_gpu == 0:
            return [torch.device("cpu")] * devices
        if devices > n_gpu:
            raise ValueError(
                f"data_parallel: devices={devices} but only {n_gpu} GPU(s) are visible. "
                f"Use devices={n_gpu}, or list them, e.g. devices=['cuda:0', 'cuda:0'] for two replicas on one GPU."
            )
        return [torch.device("cuda", i) for i in range(devices)]
    try:
        listed = list(devices)
    except TypeError:
        raise TypeError(f"data_parallel: devices must be None, an int or a list of devices, got {type(devices).__name__}.") from None
    if not listed:
        raise ValueError("data_parallel: devices is empty; give at least one device, e.g. devices=['cpu', 'cpu'].")
    out = []
    for d in listed:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError):
            raise ValueError(f"data_parallel: {d!r} is not a device; use strings such as 'cpu' or 'cuda:1'.") from None
        if dev.type == "cuda":
            if n_gpu == 0:
                raise ValueError(f"data_parallel: device {d!r} asked for, but CUDA is not available here. Use devices=['cpu', 'cpu'].")
            dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
            if dev.index >= n_gpu:
                raise ValueError(f"data_parallel: device {d!r} asked for, but only {n_gpu} GPU(s) are visible.")
        elif dev.type != "cpu":
            raise ValueError(
                f"data_parallel: replicas run on 'cpu' or 'cuda' devices, got {d!r}. For TPUs and other XLA devices use tk.xla_sharded."
            )
        out.append(dev)
    return out


# --------------------------------------------------------------------------- splitting the batch


def _split_batch(batch: Any, k: int) -> tuple[list[Any], list[int]]:
    """Split every tensor of ``batch`` along dim 0 into at most ``k`` shards (sizes as ``tensor_split``)."""
    leaves, spec = pytree.tree_flatten(batch)
    sized = [(i, t) for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() > 0]
    if not sized:
        raise ValueError(
            "data_parallel: the batch holds no tensor with a batch dimension to split. The batch must be a tensor "
            "or a tuple/list/dict of tensors whose first dimension is the batch."
        )
    n = int(sized[0][1].shape[0])
    for i, t in sized:
        if int(t.shape[0]) != n:
            paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(batch)[0]]
            raise ValueError(
                f"data_parallel: the batch's tensors must share their first dimension (the batch) to be split; "
                f"{paths[sized[0][0]] or 'batch'} has {n} rows but {paths[i] or 'batch'} has {int(t.shape[0])}. "
                "Pass per-sample tensors only; constants belong in the step or the state."
            )
    k = max(1, min(k, n))
    base, extra = divmod(n, k)
    sizes = [base + (1 if i < extra else 0) for i in range(k)]
    shards, start = [], 0
    for size in sizes:
        stop = start + size
        shard = [t[start:stop] if isinstance(t, Tensor) and t.dim() > 0 else t for t in leaves]
        shards.append(pytree.tree_unflatten(shard, spec))
        start = stop
    return shards, sizes


def _to_device(tree: Any, device: torch.device, *, copy_: bool) -> Any:
    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if t.device == device and not copy_:
            return t
        return t.detach().to(device, non_blocking=True, copy=copy_).requires_grad_(t.requires_grad and t.is_leaf)

    return pytree.tree_map(move, tree)


# --------------------------------------------------------------------------- the replicas' meeting point


class _Broken(RuntimeError):
    pass


class _Rendezvous:
    """Where the replica threads exchange gradients: each arrives with its own, leaves with the mean.

    Like a barrier whose last arrival computes the result; it breaks (instead of
    waiting forever) when a replica fails or returns while others still wait.
    """

    def __init__(self, n: int, reduce: Callable[[list[Any]], list[Any]]) -> None:
        self.n = n
        self.reduce = reduce
        self.cond = threading.Condition()
        self.slots: list[Any] = [None] * n
        self.arrived = 0
        self.generation = 0
        self.result: list[Any] = []
        self.done = [False] * n
        self.broken: str | None = None

    def exchange(self, i: int, value: Any) -> Any:
        with self.cond:
            if self.broken is None and any(self.done):
                j = self.done.index(True)
                self.broken = f"replica {j} returned from the step while replica {i} still computed gradients"
            if self.broken is not None:
                raise _Broken(self.broken)
            gen = self.generation
            self.slots[i] = value
            self.arrived += 1
            if self.arrived == self.n:
                try:
                    self.result = self.reduce(self.slots)
                except BaseException as e:
                    self.broken = f"averaging the gradients failed ({type(e).__name__})"
                    self.cond.notify_all()
                    raise
                self.slots = [None] * self.n
                self.arrived = 0
                self.generation += 1
                self.cond.notify_all()
                return self.result[i]
            while self.generation == gen and self.broken is None:
                self.cond.wait()
            if self.generation == gen:
                raise _Broken(self.broken)
            return self.result[i]

    def finish(self, i: int, error: BaseException | None) -> None:
        with self.cond:
            self.done[i] = True
            if self.broken is None and (error is not None or self.arrived > 0):
                self.broken = (
                    f"replica {i} failed ({type(error).__name__})" if error is not None
                    else f"replica {i} returned from the step while other replicas waited for its gradients"
                )
                self.cond.notify_all()


class _ReplicaHook(_functional.StepHook):
    """Averages the gradients across replicas; only the primary replica updates the params."""

    owner = "data_parallel"
    traceable = False  # replicas wait for each other's gradients in threads

    def __init__(self, index: int, weight: int, rendezvous: _Rendezvous) -> None:
        self.index = index
        self.weight = weight
        self.rendezvous = rendezvous

    def grads(self, grads: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
        return self.rendezvous.exchange(self.index, (grads, self.weight))

    def applies_update(self) -> bool:
        return self.index == 0  # the other replicas' updates would be thrown away: they make none


def _make_reducer(devices: list[torch.device], sizes: list[int]) -> Callable[[list[Any]], list[Any]]:
    total = float(sum(sizes))

    def reduce(slots: list[Any]) -> list[Any]:
        primary = devices[0]
        grads0, n0 = slots[0]
        lengths = {len(g) for g, _ in slots}
        if len(lengths) != 1:
            raise RuntimeError(f"data_parallel: replicas computed gradients of different numbers of tensors: {sorted(lengths)}.")
        with torch.no_grad():
            acc = torch._foreach_mul([g.detach() for g in grads0], n0 / total)
            for g, n in slots[1:]:
                torch._foreach_add_(acc, [t.detach().to(primary, non_blocking=True) for t in g], alpha=n / total)
            out = [acc]
            for i in range(1, len(slots)):
                out.append([a.to(devices[i], non_blocking=True, copy=True) for a in acc])
        return out

    return reduce


# --------------------------------------------------------------------------- combining the results


def _weighted_metrics(all_metrics: list[Any], sizes: list[int], primary: torch.device) -> dict[str, Any]:
    keys = list(all_metrics[0])
    for i, m in enumerate(all_metrics[1:], 1):
        if list(m) != keys:
            raise RuntimeError(f"data_parallel: replica {i} returned metrics {sorted(m)} but replica 0 returned {sorted(keys)}.")
    total = float(sum(sizes))
    out: dict[str, Any] = {}
    for k in keys:
        vals = [m[k] for m in all_metrics]
        if all(isinstance(v, Tensor) for v in vals):
            dtype = vals[0].dtype if vals[0].is_floating_point() else torch.get_default_dtype()
            acc = vals[0].detach().to(dtype) * (sizes[0] / total)
            for v, n in zip(vals[1:], sizes[1:], strict=True):
                acc = acc + v.detach().to(primary, dtype, non_blocking=True) * (n / total)
            out[k] = acc
        else:
            out[k] = sum(float(v) * n for v, n in zip(vals, sizes, strict=True)) / total
    return out


def _weighted_buffers(states: list[TrainState], sizes: list[int], primary: torch.device) -> dict[str, Tensor]:
    # b0 + sum_i w_i (b_i - b0): exactly b0 where the replicas agree (buffers the step did not touch).
    total = float(sum(sizes))
    out = {}
    with torch.no_grad():
        for name, b0 in states[0].buffers.items():
            if not b0.is_floating_point():
                out[name] = b0
                continue
            acc = b0.clone()
            for s, n in zip(states[1:], sizes[1:], strict=True):
                acc.add_(s.buffers[name].to(primary, non_blocking=True) - b0, alpha=n / total)
            out[name] = acc
    return out


# --------------------------------------------------------------------------- per-replica copies


class _Pool:
    """The worker threads of one wrapped step (made at the first call that needs them)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    def executor(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=max(1, self.n - 1), thread_name_prefix="trainkit-data-parallel")
            return self.pool


def _replica_state(state: TrainState, device: torch.device, i: int) -> TrainState:
    # Copies even on the primary's own device: the primary may update its tensors in place
    # (a donated state) while this replica still reads its own.
    return state.replace(
        params=_to_device(state.params, device, copy_=True),
        buffers=_to_device(state.buffers, device, copy_=True),
        slots=_to_device(state.slots, device, copy_=True),
        rng=derive_seed(state.rng, "replica", i),
    )


def _thread_modes(devices: list[torch.device]) -> Callable[[], contextlib.ExitStack]:
    """Grad mode and autocast are thread-local: carry the caller's into the replica threads."""
    grad = torch.is_grad_enabled()
    casts = []
    for kind in sorted({d.type for d in devices}):
        if torch.is_autocast_enabled(kind):
            casts.append((kind, torch.get_autocast_dtype(kind)))

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.set_grad_enabled(grad))
        for kind, dtype in casts:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        return stack

    return enter


# --------------------------------------------------------------------------- the transform


def data_parallel(step: Callable[..., Any] | None = None, *, devices: DeviceSpec = None) -> Any:
    """Run ``step`` data-parallel over several devices of this process; same result as the whole batch.

    Args:
      step: a batch step ``(state, batch) -> (state, metrics)`` computing its gradients
        with :func:`trainkit.value_and_grad`. Omit it to get a transform for :func:`trainkit.compose`.
      devices: ``None`` takes every visible GPU, or the CPU where there is none; an int
        ``n`` takes the first ``n`` GPUs, or ``n`` replicas on the CPU where there is no
        GPU; or a list such as ``["cuda:0", "cuda:1"]`` or ``["cpu", "cpu"]`` (a device
        may repeat). The state must live on ``devices[0]`` (the primary).

    Returns:
      The wrapped step. The batch (a tensor, or any nesting of tuples, lists and dicts
      of tensors sharing their first dimension) is split in ``len(devices)`` shards of
      sizes as even as possible (fewer when the batch is smaller). Gradients, metrics
      and floating-point buffers are averaged weighted by shard size (see the module
      docstring for the BatchNorm policy); one optimizer update is made.

    Raises:
      ValueError/TypeError at wrap time for bad ``devices``, an epoch step, or another
      parallel transform inside; at call time for a state not on ``devices[0]``, a
      batch whose tensors disagree on the batch size, or a step that computes no
      gradients through ``tk.value_and_grad``.

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.1), dtype=torch.float64)
    >>> def step(state, batch):
    ...     x, y = batch
    ...     loss, g = tk.value_and_grad(lambda p: ((state.apply(p, x)[0] - y) ** 2).mean())(state.params)
    ...     return state.apply_gradients(g), {"loss": loss}
    >>> batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64))
    >>> dp_state, metrics = tk.data_parallel(step, devices=["cpu", "cpu"])(state, batch)
    >>> full_state, full_metrics = step(state, batch)
    >>> tk.testing.assert_trees_close(dp_state.params, full_state.params)
    >>> torch.allclose(metrics["loss"], full_metrics["loss"])
    True
    """
    devs = _resolve_devices(devices)

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        check_order("data_parallel", inner)
        replicas = _Pool(len(devs))

        def data_parallel_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
            if not isinstance(state, TrainState):
                raise TypeError(f"data_parallel: state must be a TrainState, got {type(state).__name__}.")
            primary = devs[0]
            if state.params and state.device != primary:
                raise ValueError(
                    f"data_parallel: the state is on {state.device} but the primary device is {primary}. "
                    f"Create it there (TrainState.create(..., device='{primary}')) or move it: state.to('{primary}')."
                )
            shards, sizes = _split_batch(batch, len(devs))
            k = len(shards)
            if k == 1:  # one replica is the step itself
                return check_step_output(inner(state, _to_device(shards[0], primary, copy_=False)), "data_parallel: step")
            rendezvous = _Rendezvous(k, _make_reducer(devs[:k], sizes))
            modes = _thread_modes(devs[:k])
            jobs = []
            pool = replicas.executor()
            for i in range(1, k):
                rstate = _replica_state(state, devs[i], i)
                rbatch = _to_device(shards[i], devs[i], copy_=False)
                ctx = contextvars.copy_context()  # the caller's hooks (inner to outer transforms) go along
                jobs.append(pool.submit(ctx.run, _run_replica, inner, rstate, rbatch, i, sizes[i], rendezvous, modes, False))
            results: list[Any] = [None] * k
            errors: list[BaseException | None] = [None] * k
            try:
                results[0] = _run_replica(inner, state, _to_device(shards[0], primary, copy_=False), 0, sizes[0], rendezvous, None, True)
            except BaseException as e:
                errors[0] = e
            for i, job in enumerate(jobs, 1):
                try:
                    results[i] = job.result()
                except BaseException as e:
                    errors[i] = e
            real = [(i, e) for i, e in enumerate(errors) if e is not None and not isinstance(e, _Broken)]
            if real:
                i, e = real[0]
                if i > 0 and hasattr(e, "add_note"):
                    e.add_note(f"(raised by data_parallel's replica {i}, on {devs[i]}, with a shard of {sizes[i]} rows)")
                raise e
            broken = [e for e in errors if e is not None]
            if broken:
                raise RuntimeError(
                    f"data_parallel: the replicas did not compute gradients in step with each other: {broken[0]}. "
                    "The step must call tk.value_and_grad the same number of times whatever its shard of the batch."
                )
            if rendezvous.generation == 0:
                raise RuntimeError(
                    "data_parallel: the step computed no gradients through trainkit.value_and_grad, so there was "
                    "nothing to average across replicas (each would update with its own shard's gradients). "
                    "Compute them with tk.value_and_grad(loss_fn)(state.params)."
                )
            new_state, _ = results[0]
            metrics = _weighted_metrics([m for _, m in results], sizes, primary)
            if new_state.buffers:
                new_state = new_state.replace(buffers=_weighted_buffers([s for s, _ in results], sizes, primary))
            return new_state, metrics

        return mark(data_parallel_step, inner, "data_parallel")

    return two_forms(step, "data_parallel", make)


def _run_replica(
    inner: Callable[..., Any],
    state: TrainState,
    batch: Any,
    i: int,
    size: int,
    rendezvous: _Rendezvous,
    modes: Callable[[], contextlib.ExitStack] | None,
    primary: bool,
) -> tuple[TrainState, Any]:
    error: BaseException | None = None
    try:
        with contextlib.ExitStack() as stack:
            if modes is not None:
                stack.enter_context(modes())
            if not primary:  # only the primary's update happens; the others must not touch shared tensors
                stack.enter_context(_functional.donating(False))
            stack.enter_context(_functional.hooks(_ReplicaHook(i, size, rendezvous), params=state.params))
            return check_step_output(inner(state, batch), "data_parallel: step")
    except BaseException as e:
        error = e
        raise
    finally:
        rendezvous.finish(i, error)

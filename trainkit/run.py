"""The fold: ``epoch_step`` turns a batch step into an epoch step; ``fit`` folds epochs.

An epoch is itself a step, ``(state, EpochData) -> (state, metrics)``, so a
transform such as ``early_stop(monitor="val_loss")`` wraps it exactly as it wraps
a batch step. ``fit`` takes no feature flags: features are transforms, loggers,
a checkpointer and the arguments of the fold.

Host syncs: a step never reads a tensor on the host. ``fit`` reads metrics on the
host every ``log_every`` steps and at the end of an epoch. On the CPU a read costs
nothing (there is no device to wait for), so there metrics become floats at once.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor

from .functional import donating
from .state import TrainState, _derive_seed

__all__ = ["EpochData", "epoch_step", "is_epoch_step", "fit", "evaluate", "should_stop", "StepFn", "EvalFn"]

StepFn = Callable[[TrainState, Any], "tuple[TrainState, dict[str, Any]]"]
EvalFn = Callable[[TrainState, Any], "dict[str, Any]"]


# --------------------------------------------------------------------------- checks


def _check_step_output(out: Any, where: str = "step_fn") -> tuple[TrainState, Mapping[str, Any]]:
    if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], TrainState) or not isinstance(out[1], Mapping):
        got = type(out).__name__
        if isinstance(out, tuple):
            got = "tuple(" + ", ".join(type(o).__name__ for o in out) + ")"
        raise TypeError(
            f"{where} must return (state, metrics): a TrainState and a dict of scalar tensors, got {got}. "
            'Return e.g. (state.apply_gradients(grads), {"loss": loss}).'
        )
    return out


def _check_eval_output(out: Any) -> Mapping[str, Any]:
    if not isinstance(out, Mapping):
        raise TypeError(
            f"eval_step must return a dict of scalar metrics, got {type(out).__name__}. "
            'Return e.g. {"loss": loss, "acc": acc}.'
        )
    return out


def batch_size(batch: Any) -> int:
    """The size of the first dimension of the first tensor in ``batch`` (1 if there is none).

    >>> import torch
    >>> batch_size((torch.zeros(5, 2), torch.zeros(5)))
    5
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for b in batch:
            if isinstance(b, (Tensor, list, tuple, Mapping)):
                return batch_size(b)
    return 1


class _Mean:
    """Weighted means of metrics. Floats on the CPU; device tensors elsewhere (no sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, metrics: Mapping[str, Any], n: int) -> None:
        self.count += n
        sums = self.sums
        for k, v in metrics.items():
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    raise ValueError(
                        f"metric {k!r} must be a scalar, got shape {tuple(v.shape)}; reduce it, e.g. .mean()."
                    )
                v = v.detach()
                v = v.item() if v.device.type == "cpu" else v.reshape(()).float()
            prev = sums.get(k)
            sums[k] = v * n if prev is None else prev + v * n

    def result(self) -> dict[str, Any]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    # This is a host sync point on accelerators; fit calls it at log intervals only.
    return {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------- the epoch fold


@dataclass
class EpochData:
    """What an epoch step consumes: the loaders, and the runner's per-step callback.

    ``on_step(state, metrics, n) -> bool`` is called after every train step (the
    runner logs and checkpoints there; ``True`` ends the epoch early). ``skip`` train
    batches are drawn and dropped first (to resume mid-epoch exactly). ``train_mean``,
    when given, is the running mean of the epoch's train metrics: the runner owns it
    so that a mid-epoch checkpoint holds it and a resumed epoch reports whole-epoch means.
    """

    train: Iterable[Any]
    val: Iterable[Any] | None = None
    epoch: int = 0
    skip: int = 0
    on_step: Callable[[TrainState, Mapping[str, Any], int], bool] | None = field(default=None, repr=False)
    train_mean: Any = field(default=None, repr=False)


def epoch_step(step: StepFn, eval_step: EvalFn | None = None) -> Callable[[TrainState, EpochData], tuple[TrainState, dict[str, Any]]]:
    """Fold ``step`` over ``data.train`` (then ``eval_step`` over ``data.val``): an epoch-level step.

    The metrics are the batch-size-weighted means, prefixed ``train_`` and ``val_``.

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> def step(state, batch):
    ...     x, y = batch
    ...     loss, g = tk.value_and_grad(lambda p: ((state.apply(p, x)[0] - y) ** 2).mean())(state.params)
    ...     return state.apply_gradients(g), {"loss": loss}
    >>> data = [(torch.ones(4, 1), torch.zeros(4, 1))] * 3
    >>> state, m = tk.epoch_step(step)(state, tk.EpochData(train=data))
    >>> state.step, sorted(m)
    (3, ['train_loss'])
    """

    def run_epoch(state: TrainState, data: EpochData) -> tuple[TrainState, dict[str, Any]]:
        train = data.train_mean if data.train_mean is not None else _Mean()
        on_step = data.on_step
        for i, batch in enumerate(data.train):
            if i < data.skip:
                continue
            state, metrics = _check_step_output(step(state, batch))
            n = batch_size(batch)
            train.add(metrics, n)
            if on_step is not None and on_step(state, metrics, n):
                break
        out = {f"train_{k}": v for k, v in _across_ranks(train).items()}
        if eval_step is not None and data.val is not None:
            out.update({f"val_{k}": v for k, v in _evaluate(eval_step, state, data.val, across_ranks=True).items()})
        return state, out

    run_epoch.__trainkit_level__ = "epoch"  # type: ignore[attr-defined]
    run_epoch.__name__ = f"epoch_of_{getattr(step, '__name__', 'step')}"
    return run_epoch


def is_epoch_step(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` consumes an :class:`EpochData` (made by :func:`epoch_step`, maybe wrapped)."""
    return getattr(fn, "__trainkit_level__", "batch") == "epoch"


def should_stop(state: TrainState) -> bool:
    """Whether a transform asked the run to stop (a slot holding ``{"stop": True, ...}``).

    >>> import torch, trainkit as tk
    >>> s = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> tk.should_stop(s), tk.should_stop(s.replace(slots={"early_stop": {"stop": True}}))
    (False, True)
    """
    return any(isinstance(v, Mapping) and v.get("stop") is True for v in state.slots.values())


def _evaluate(eval_step: EvalFn, state: TrainState, loader: Iterable[Any], across_ranks: bool = False) -> dict[str, Any]:
    mean = _Mean()
    with torch.no_grad():
        for batch in loader:
            mean.add(_check_eval_output(eval_step(state, batch)), batch_size(batch))
    return _across_ranks(mean) if across_ranks else mean.result()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _across_ranks(mean: _Mean) -> dict[str, Any]:
    # Under torch.distributed an epoch's metrics are the means over every rank's batches,
    # the same on all ranks, so decisions taken on them (early_stop) agree.
    if _world_size() == 1:
        return mean.result()
    from .transforms.distributed import reduce_means

    return reduce_means(mean.sums, mean.count)


def evaluate(eval_step: EvalFn, state: TrainState, loader: Iterable[Any]) -> dict[str, float]:
    """Batch-size-weighted means of ``eval_step(state, batch)`` over ``loader`` (for val and test sets).

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> tk.evaluate(lambda s, b: {"n": torch.tensor(float(len(b)))}, state, [torch.zeros(1), torch.zeros(3)])
    {'n': 2.5}
    """
    return _to_floats(_evaluate(eval_step, state, loader))


# --------------------------------------------------------------------------- fit


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _interactive() -> bool:
    if sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
        return True
    # A notebook: stderr is no tty, but what it prints is shown under the cell.
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def fit(
    step: Callable[..., Any],
    state: TrainState,
    train_loader: Iterable[Any],
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    eval_step: EvalFn | None = None,
    val_loader: Iterable[Any] | None = None,
    logger: Any = None,
    checkpoint: Any = None,
    resume: Union[None, str, os.PathLike] = None,
    progress: bool = True,
    check_finite: bool = True,
    log_every: int = 50,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Train: fold ``step`` over ``train_loader`` for ``epochs`` (and/or up to ``max_steps``).

    ``step`` is a batch step ``(state, batch) -> (state, metrics)`` or an epoch step
    (from :func:`epoch_step`, perhaps wrapped by ``early_stop``). After each epoch,
    ``eval_step`` runs over ``val_loader``. Returns the final state and ``history``,
    one dict of floats per epoch (``epoch``, ``step``, ``train_*``, ``val_*``).

    * The caller's ``state`` is never changed: ``fit`` clones it once, then donates
      its own copy to every step (in-place updates, no extra copies).
    * ``logger``: a :class:`~trainkit.loggers.TensorBoardLogger`, :class:`~trainkit.loggers.CSVLogger`
      or anything with ``log_metrics(metrics, step)``; step metrics every ``log_every``
      steps, epoch metrics every epoch.
    * ``checkpoint``: a :class:`~trainkit.checkpoint.Checkpointer` (atomic, keep-last-N);
      ``resume="latest"`` (or a file) continues a run exactly, mid-epoch included.
    * ``check_finite``: a NaN/inf metric raises ``FloatingPointError`` naming the step;
      checkpoints already written stay intact.
    * The run stops early when a transform says so (:func:`should_stop`).
    * Shuffling is seeded from ``(state.rng, epoch)``, so a resumed run sees the same batches.

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> def step(state, batch):
    ...     x, y = batch
    ...     loss, g = tk.value_and_grad(lambda p: ((state.apply(p, x)[0] - y) ** 2).mean())(state.params)
    ...     return state.apply_gradients(g), {"loss": loss}
    >>> new, history = tk.fit(step, state, [(torch.ones(4, 1), torch.ones(4, 1))] * 5, epochs=2, progress=False)
    >>> new.step, state.step, [h["epoch"] for h in history]
    (10, 0, [1, 2])
    """
    if not callable(step):
        raise TypeError(f"fit: step must be a function (state, batch) -> (state, metrics), got {type(step).__name__}.")
    if not isinstance(state, TrainState):
        raise TypeError(
            f"fit: state must be a TrainState, got {type(state).__name__}. Make one with "
            "trainkit.TrainState.create(module, trainkit.optim.adam(1e-3))."
        )
    if epochs is None and max_steps is None:
        raise ValueError("fit: give epochs=N or max_steps=N (or both) to say when to stop.")
    for name, v in (("epochs", epochs), ("max_steps", max_steps), ("log_every", log_every)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"fit: {name} must be a positive int, got {v!r}.")
    if eval_step is not None and is_epoch_step(step):
        raise ValueError("fit: step is an epoch step, which runs its own evaluation; pass eval_step to tk.epoch_step instead.")
    if val_loader is not None and eval_step is None and not is_epoch_step(step):
        raise ValueError("fit: val_loader given without eval_step; pass eval_step=(state, batch) -> metrics.")
    main = _is_main_process()
    epoch_fn = step if is_epoch_step(step) else epoch_step(step, eval_step)

    history: list[dict[str, float]] = []
    start_epoch, skip = 0, 0
    path, resumed_mean = None, None
    if resume is not None:
        if checkpoint is None and str(resume) == "latest":
            raise ValueError('fit: resume="latest" needs checkpoint=Checkpointer(directory).')
        # "latest" with no checkpoint yet starts afresh, so one command both starts and resumes a run
        path = checkpoint.latest() if str(resume) == "latest" else resume
    if path is not None:
        from .checkpoint import load_run

        state, meta = load_run(path, like=state)  # new tensors: nothing of the caller's is donated
        start_epoch, skip, history = meta["epoch"], meta["batch"], list(meta["history"])
        resumed_mean = meta.get("train_mean")
    else:
        state = state.clone()  # fit donates its own copy; the caller's state stays intact
    if _world_size() > 1:
        # Each rank trains on its shard, reshuffled per epoch by (state.rng, epoch) (set_epoch below).
        from .transforms.distributed import shard_loader

        train_loader = shard_loader(train_loader, train=True, seed=_derive_seed(state.rng, -1) % (1 << 62))
        val_loader = None if val_loader is None else shard_loader(val_loader, train=False)

    total = max_steps if epochs is None else None
    try:
        steps_per_epoch: int | None = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    bar = None
    if progress and main and _interactive():
        from tqdm import tqdm

        bar = tqdm(total=total or (steps_per_epoch * epochs if steps_per_epoch and epochs else None), file=sys.stderr, dynamic_ncols=True)
        bar.update(state.step)

    epoch = start_epoch
    stopped = path is not None and should_stop(state)  # a run that stopped early stays stopped when resumed
    try:
        with donating():
            while (epochs is None or epoch < epochs) and not stopped:
                if max_steps is not None and state.step >= max_steps:
                    break
                position = {"batch": skip, "cut": False}  # cut: max_steps ended this epoch part-way
                mean = _Mean()
                if resumed_mean and skip and _world_size() == 1:
                    # the batches before the resume point count in this epoch's means, as uninterrupted
                    # (under torch.distributed only rank 0's sums are saved: the resumed epoch's means
                    # then cover the batches after the resume point)
                    mean.sums = {k: float(v) for k, v in resumed_mean["sums"].items()}
                    mean.count = int(resumed_mean["count"])
                resumed_mean = None

                def on_step(s: TrainState, metrics: Mapping[str, Any], n: int) -> bool:
                    nonlocal stopped
                    position["batch"] += 1
                    gstep = s.step
                    if bar is not None:
                        bar.update(1)
                    log_now = gstep % log_every == 0
                    # On the CPU reading a metric costs nothing, so check_finite looks at
                    # every step; on an accelerator it looks at log intervals (a host sync).
                    if log_now or (check_finite and _on_cpu(metrics)):
                        scalars = _to_floats(metrics)
                        if check_finite:
                            _check_finite(scalars, gstep)
                        if log_now:
                            if logger is not None and main:
                                logger.log_metrics({f"train/{k}": v for k, v in scalars.items()}, gstep)
                            if bar is not None:
                                bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)
                    if checkpoint is not None and checkpoint.due_step(gstep) and main:
                        checkpoint.save(s, meta={"epoch": epoch, "batch": position["batch"], "history": history, **_running(mean)})
                    if should_stop(s):
                        stopped = True
                    if max_steps is not None and gstep >= max_steps:
                        position["cut"] = True
                        return True
                    return stopped

                sampler = getattr(train_loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                data = EpochData(train=train_loader, val=val_loader, epoch=epoch, skip=skip, on_step=on_step, train_mean=mean)
                # The shuffle order of this epoch is a function of (state.rng, epoch).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_derive_seed(state.rng, -1 - epoch))
                    state, metrics = _check_step_output(epoch_fn(state, data), "epoch step")
                skip = 0
                partial = position["cut"] and position["batch"] != steps_per_epoch
                if not partial:
                    epoch += 1
                row = {"epoch": epoch + partial, "step": state.step, **_to_floats(metrics)}
                if check_finite:  # a NaN anywhere in the epoch shows in its means
                    _check_finite(row, state.step, epoch=epoch)
                history.append(row)
                if logger is not None and main:
                    logger.log_metrics({f"epoch/{k}": v for k, v in row.items() if k not in ("step",)}, state.step)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("val_")} or None, refresh=True)
                if checkpoint is not None and main and partial:
                    # resume continues this epoch where max_steps cut it; its row is redone then
                    checkpoint.save(state, meta={"epoch": epoch, "batch": position["batch"], "history": history[:-1], **_running(mean)})
                elif checkpoint is not None and main and checkpoint.due_epoch(epoch):
                    checkpoint.save(state, meta={"epoch": epoch, "batch": 0, "history": history})
                stopped = stopped or should_stop(state)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None and main and hasattr(logger, "flush"):
            logger.flush()
    return state, history


def _running(mean: _Mean) -> dict[str, Any]:
    return {"train_mean": {"sums": dict(mean.sums), "count": mean.count}}


def _on_cpu(metrics: Mapping[str, Any]) -> bool:
    for v in metrics.values():
        return not isinstance(v, Tensor) or v.device.type == "cpu"
    return True


def _check_finite(scalars: Mapping[str, float], step: int, epoch: int | None = None) -> None:
    for k, value in scalars.items():
        if not math.isfinite(value):
            where = f"in epoch {epoch} (by step {step})" if epoch is not None else f"at step {step}"
            raise FloatingPointError(
                f"fit: metric {k!r} is {value} {where} (check_finite=True). "
                "Lower the learning rate, clip gradients (optim.chain(optim.clip_by_global_norm(1.0), ...)), "
                "or check the data; checkpoints written so far are intact."
            )

"""The fold: ``epoch_step`` turns a batch step into an epoch step; ``fit`` folds epochs.

An epoch is itself a step, ``(state, EpochData) -> (state, metrics)``, so a
transform such as ``early_stop(monitor="val_loss")`` wraps it exactly as it wraps
a batch step. ``fit`` takes no feature flags: features are transforms, loggers,
a checkpointer and the arguments of the fold.

``fit`` is a flat loop over small observers, each owning its own counters: the
progress bar, the logger, the finite check, the checkpointer, the step limit and
the stop request. One :class:`RunPosition` owns what a checkpoint records of where
the run is (epoch, batch, history, the epoch's running means).

Host syncs: a step never reads a tensor on the host. ``fit`` reads metrics on the
host every ``log_every`` steps and at the end of an epoch. On the CPU a read costs
nothing (there is no device to wait for), so there metrics become floats at once.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import torch
from torch import Tensor

from . import dist
from .checkpoint import load_run
from .contract import EpochData, batch_size, check_eval_output, check_step_output, gauges_of, is_epoch_step
from .functional import donating
from .metrics import Mean, check_finite, finalize_metrics, to_floats
from .rng import derive_seed
from .state import TrainState

__all__ = ["EpochData", "epoch_step", "is_epoch_step", "fit", "evaluate", "should_stop", "RunPosition", "StepFn", "EvalFn"]

StepFn = Callable[[TrainState, Any], "tuple[TrainState, dict[str, Any]]"]
EvalFn = Callable[[TrainState, Any], "dict[str, Any]"]


# --------------------------------------------------------------------------- the epoch fold


def epoch_step(
    step: StepFn, eval_step: EvalFn | None = None, *, finalize: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
) -> Callable[[TrainState, EpochData], tuple[TrainState, dict[str, Any]]]:
    """Fold ``step`` over ``data.train`` (then ``eval_step`` over ``data.val``): an epoch-level step.

    The metrics are the batch-size-weighted means, prefixed ``train_`` and ``val_``
    (names declared with :func:`trainkit.gauges` keep their last value). Whole-set
    validation metrics (F1, AUROC): ``eval_step`` returns :class:`~trainkit.metrics.Sum` /
    :class:`~trainkit.metrics.Cat` statistics and ``finalize(stats) -> metrics`` computes
    them from the whole validation set (all ranks' under torch.distributed).

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
    if not callable(step):
        raise TypeError(f"epoch_step: step must be a function (state, batch) -> (state, metrics), got {type(step).__name__}.")
    if is_epoch_step(step):
        raise TypeError("epoch_step: step is already an epoch step (it consumes EpochData); pass it to fit as it is.")
    gauges = gauges_of(step)
    per_call = getattr(step, "steps_per_call", 1)  # tk.jit(step, steps_per_call=K): K batches a call

    def run_epoch(state: TrainState, data: EpochData) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(data, EpochData):
            raise TypeError(_NOT_EPOCH_DATA.format(got=type(data).__name__))
        train = data.train_mean if data.train_mean is not None else Mean(gauges)
        first = True
        for group in _groups(data, per_call, state.step):
            before = state.step
            state, metrics = check_step_output(step(state, group if per_call > 1 else group[0]), "step_fn")
            if first and state.step == before:
                raise RuntimeError(_NO_ADVANCE.format(step=before))
            first = False
            sizes = [batch_size(b) for b in group]
            per_step = [metrics] if per_call == 1 else [{k: v[i] for k, v in metrics.items()} for i in range(len(group))]
            for m, n in zip(per_step, sizes, strict=True):
                train.add(m, n)
            if data.on_step is not None and data.on_step(state, per_step[-1] if per_call == 1 else per_step, sum(sizes)):
                break
        out = {f"train_{k}": v for k, v in train.across_ranks().items()}
        if eval_step is not None and data.val is not None:
            val = finalize_metrics(_evaluate(eval_step, state, data.val).across_ranks(), finalize)
            out.update({f"val_{k}": v for k, v in val.items()})
        return state, out

    run_epoch.__trainkit_level__ = "epoch"  # type: ignore[attr-defined]
    run_epoch.__trainkit_gauges__ = gauges  # type: ignore[attr-defined]
    run_epoch.__name__ = f"epoch_of_{getattr(step, '__name__', 'step')}"
    return run_epoch


def _groups(data: EpochData, per_call: int, step: int) -> Iterator[list[Any]]:
    """The batches after ``data.skip``, in lists of ``per_call`` (fewer at the end of the epoch, or where
    ``data.max_steps`` would be passed: a group never runs past the step limit)."""
    group: list[Any] = []
    for i, batch in enumerate(data.train):
        if i < data.skip:
            continue
        group.append(batch)
        room = per_call if data.max_steps is None else min(per_call, data.max_steps - step)
        if len(group) >= room:
            step += len(group)
            yield group
            group = []
    if group:
        yield group


_NOT_EPOCH_DATA = (
    "epoch step: called with a {got}, not an EpochData: an epoch step was used as a batch step. "
    "If you wrapped an epoch step in a function of your own, mark the wrapper as an epoch step too: "
    "tk.transforms.mark(wrapper, inner, 'my_transform') (or functools.wraps(inner)), so fit passes it EpochData; "
    "see trainkit.transforms for how to write a transform."
)
_NO_ADVANCE = (
    "fit: the step returned a state whose step did not advance (still {step}): it made no update through "
    "state.apply_gradients, so training would do nothing. A Lightning-style step (loss.backward(), "
    "optimizer.step(), returning the state) trains nothing here: compute the gradients with "
    "tk.value_and_grad(loss_fn)(state.params) and return (state.apply_gradients(grads), metrics)."
)


def should_stop(state: TrainState) -> bool:
    """Whether a transform asked the run to stop (a slot holding ``{"stop": True, ...}``).

    >>> import torch, trainkit as tk
    >>> s = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> tk.should_stop(s), tk.should_stop(s.replace(slots={"early_stop": {"stop": True}}))
    (False, True)
    """
    return any(isinstance(v, Mapping) and v.get("stop") is True for v in state.slots.values())


def _evaluate(eval_step: EvalFn, state: TrainState, loader: Iterable[Any]) -> Mean:
    mean = Mean(gauges_of(eval_step))
    with torch.no_grad():
        for batch in loader:
            mean.add(check_eval_output(eval_step(state, batch)), batch_size(batch))
    return mean


def evaluate(
    eval_step: EvalFn,
    state: TrainState,
    loader: Iterable[Any],
    *,
    finalize: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Batch-size-weighted means of ``eval_step(state, batch)`` over ``loader`` (for val and test sets).

    Whole-set metrics: ``eval_step`` returns :class:`~trainkit.metrics.Sum` or
    :class:`~trainkit.metrics.Cat` statistics, and ``finalize(stats)`` computes the
    metrics from their totals over the loader.

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> tk.evaluate(lambda s, b: {"n": torch.tensor(float(len(b)))}, state, [torch.zeros(1), torch.zeros(3)])
    {'n': 2.5}
    >>> hits = lambda s, b: {"correct": tk.metrics.Sum(b.sum()), "seen": tk.metrics.Sum(len(b))}
    >>> tk.evaluate(hits, state, [torch.ones(2), torch.zeros(2)], finalize=lambda t: {"acc": t["correct"] / t["seen"]})["acc"]
    0.5
    """
    return to_floats(finalize_metrics(_evaluate(eval_step, state, loader).result(), finalize))


# --------------------------------------------------------------------------- where the run is


@dataclass
class RunPosition:
    """Where a run is, and all a checkpoint records of it besides the state.

    ``epoch``: epochs completed; ``batch``: batches done in the current epoch (a
    resumed run draws and drops that many); ``history``: one row per completed epoch;
    ``mean``: the current epoch's running train means (so a resumed epoch reports
    whole-epoch means); ``cut``: ``max_steps`` ended the current epoch part-way (then
    ``epoch`` and ``batch`` still point into it, so a resume continues it).

    >>> p = RunPosition(epoch=2, batch=3)
    >>> RunPosition.from_meta(p.meta()).epoch, RunPosition.from_meta(p.meta()).batch
    (2, 3)
    """

    epoch: int = 0
    batch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    mean: Mean = field(default_factory=Mean)
    cut: bool = False

    def meta(self) -> dict[str, Any]:
        """The checkpoint's ``meta``: the one shape every checkpoint of a run has."""
        return {"epoch": self.epoch, "batch": self.batch, "history": list(self.history), "train_mean": self.mean.state_dict()}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], gauges: frozenset[str] = frozenset()) -> "RunPosition":
        mean = Mean(gauges)
        # Under torch.distributed only rank 0's sums are saved: a resumed epoch's means then cover
        # the batches after the resume point (the params are exact either way).
        if meta.get("train_mean") and meta["batch"] and dist.world_size() == 1:
            mean.load_state_dict(meta["train_mean"])
        return cls(epoch=int(meta["epoch"]), batch=int(meta["batch"]), history=list(meta["history"]), mean=mean)

    def start_epoch(self, gauges: frozenset[str]) -> None:
        if not self.batch:  # a resumed epoch keeps the running means it was saved with
            self.mean = Mean(gauges)
        self.cut = False

    def end_epoch(self, row: dict[str, float], partial: bool) -> None:
        self.history.append(row)
        if not partial:
            self.epoch += 1
            self.batch = 0


# --------------------------------------------------------------------------- the observers


class _Event:
    """One call of the step as the observers see it: one step, or the K steps of a ``steps_per_call``
    step (``metrics`` then a list, one dict per step). The metrics are read on the host at most once."""

    __slots__ = ("state", "metrics", "_scalars")

    def __init__(self, state: TrainState, metrics: Any) -> None:
        self.state, self.metrics = state, metrics if isinstance(metrics, list) else [metrics]
        self._scalars: list[dict[str, float]] | None = None

    @property
    def steps(self) -> range:
        """The global step numbers this call ran."""
        return range(self.state.step - len(self.metrics) + 1, self.state.step + 1)

    def per_step(self) -> list[tuple[int, dict[str, float]]]:
        if self._scalars is None:
            self._scalars = [to_floats(m) for m in self.metrics]  # a host sync point on accelerators
        return list(zip(self.steps, self._scalars, strict=True))

    @property
    def scalars(self) -> dict[str, float]:
        """The metrics of the last step, as floats."""
        return self.per_step()[-1][1]

    def hits(self, every: int) -> list[tuple[int, dict[str, float]]]:
        """The steps (and their metrics) that fall on an interval of ``every``; reads nothing otherwise."""
        if not any(t % every == 0 for t in self.steps):
            return []
        return [(t, m) for t, m in self.per_step() if t % every == 0]


class _Observer:
    """Does nothing; each observer overrides what it needs. ``step`` returns True to end the epoch."""

    def step(self, event: _Event, position: RunPosition) -> bool:
        return False

    def epoch(self, state: TrainState, row: dict[str, float], position: RunPosition, partial: bool) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class _Progress(_Observer):
    """A tqdm bar (a terminal or a notebook): the epoch, the train metrics, the val metrics beside them."""

    def __init__(self, total: int | None, done: int, log_every: int, epochs: int | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done)
        self.log_every, self.epochs = log_every, epochs
        self.train: dict[str, str] = {}
        self.val: dict[str, str] = {}

    def step(self, event: _Event, position: RunPosition) -> bool:
        self.bar.update(len(event.steps))
        for _, scalars in event.hits(self.log_every)[-1:]:
            self.bar.set_description(_epoch_label(position, self.epochs), refresh=False)
            self.train = {k: f"{v:.4g}" for k, v in scalars.items()}
            self.bar.set_postfix({**self.train, **self.val}, refresh=False)
        return False

    def epoch(self, state: TrainState, row: dict[str, float], position: RunPosition, partial: bool) -> None:
        self.train = {k.removeprefix("train_"): f"{v:.4g}" for k, v in row.items() if k.startswith("train_")}
        self.val = {k: f"{v:.4g}" for k, v in row.items() if k.startswith("val_")}
        self.bar.set_postfix({**self.train, **self.val}, refresh=True)

    def close(self) -> None:
        self.bar.close()


class _PlainProgress(_Observer):
    """Where stderr is no terminal (nohup, SLURM, CI): one plain line per epoch, and every ``every`` steps."""

    def __init__(self, every: int | None, epochs: int | None) -> None:
        self.every, self.epochs = every, epochs
        self.t0 = time.perf_counter()

    def step(self, event: _Event, position: RunPosition) -> bool:
        for t, scalars in event.hits(self.every) if self.every else ():
            self._print(f"{_epoch_label(position, self.epochs)} step {t}: {_fmt(scalars)}")
        return False

    def epoch(self, state: TrainState, row: dict[str, float], position: RunPosition, partial: bool) -> None:
        metrics = {k: v for k, v in row.items() if k not in ("epoch", "step")}
        cut = " (cut by max_steps)" if partial else ""
        label = f"epoch {int(row['epoch'])}" + (f"/{self.epochs}" if self.epochs else "") + cut
        self._print(f"{label} step {state.step}: {_fmt(metrics)} ({time.perf_counter() - self.t0:.1f} s)")

    def _print(self, line: str) -> None:
        print(f"fit: {line}", file=sys.stderr, flush=True)


def _epoch_label(position: RunPosition, epochs: int | None) -> str:
    return f"epoch {position.epoch + 1}" + (f"/{epochs}" if epochs else "")


class _Logging(_Observer):
    """Step metrics and the LR (of the next update) every ``log_every`` steps; epoch rows every epoch."""

    def __init__(self, logger: Any, log_every: int) -> None:
        self.logger, self.log_every = logger, log_every
        self.has_lr = True

    def step(self, event: _Event, position: RunPosition) -> bool:
        for t, step_scalars in event.hits(self.log_every):
            scalars = {f"train/{k}": v for k, v in step_scalars.items()}
            if self.has_lr:  # (after a K-step call: the LR the state holds at its end)
                try:
                    scalars["train/lr"] = float(event.state.lr)
                except ValueError:  # an optimizer of the user's own with no LR stage: nothing to log
                    self.has_lr = False
            self.logger.log_metrics(scalars, t)
        return False

    def epoch(self, state: TrainState, row: dict[str, float], position: RunPosition, partial: bool) -> None:
        self.logger.log_metrics({f"epoch/{k}": v for k, v in row.items() if k != "step"}, state.step)

    def close(self) -> None:
        for name in ("flush", "close"):
            if hasattr(self.logger, name):
                getattr(self.logger, name)()


class _FiniteCheck(_Observer):
    def __init__(self, log_every: int) -> None:
        self.log_every = log_every

    def step(self, event: _Event, position: RunPosition) -> bool:
        # On the CPU reading a metric costs nothing, so every step is checked; on an
        # accelerator only the log intervals are (a host sync).
        for t, scalars in event.per_step() if _on_cpu(event.metrics[0]) else event.hits(self.log_every):
            check_finite(scalars, t)
        return False

    def epoch(self, state: TrainState, row: dict[str, float], position: RunPosition, partial: bool) -> None:
        check_finite(row, state.step, epoch=int(row["epoch"]))  # a NaN anywhere in the epoch shows in its means


class _Checkpointing(_Observer):
    def __init__(self, checkpointer: Any, steps_per_epoch: int | None) -> None:
        self.checkpointer, self.steps_per_epoch = checkpointer, steps_per_epoch

    def step(self, event: _Event, position: RunPosition) -> bool:
        if position.cut and position.batch != self.steps_per_epoch:
            # max_steps cut this epoch: save it now, before validation and epoch-level transforms
            # (early_stop) count an evaluation of the part-epoch; resume continues the epoch here.
            self.checkpointer.save(event.state, meta=position.meta())
        elif any(self.checkpointer.due_step(t) for t in event.steps):  # (a K-step call: saved at its end)
            self.checkpointer.save(event.state, meta=position.meta())
        return False

    def epoch(self, state: TrainState, row: dict[str, float], position: RunPosition, partial: bool) -> None:
        if not partial and self.checkpointer.due_epoch(position.epoch):
            self.checkpointer.save(state, meta=position.meta(), metrics=row)  # a monitored Checkpointer ranks it


class _StepLimit(_Observer):
    def __init__(self, max_steps: int | None) -> None:
        self.max_steps = max_steps

    def step(self, event: _Event, position: RunPosition) -> bool:
        position.cut = self.max_steps is not None and event.state.step >= self.max_steps
        return position.cut


class _StopRequest(_Observer):
    """Ends the run when a transform's slot asks (:func:`should_stop`), at the step or the epoch."""

    def __init__(self) -> None:
        self.stopped = False

    def step(self, event: _Event, position: RunPosition) -> bool:
        self.stopped = self.stopped or should_stop(event.state)
        return self.stopped

    def epoch(self, state: TrainState, row: dict[str, float], position: RunPosition, partial: bool) -> None:
        self.stopped = self.stopped or should_stop(state)


def _on_cpu(metrics: Mapping[str, Any]) -> bool:
    for v in metrics.values():
        return not isinstance(v, Tensor) or v.device.type == "cpu"
    return True


# --------------------------------------------------------------------------- fit


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
    progress: Union[bool, int] = True,
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
      or anything with ``log_metrics(metrics, step)``; step metrics and the LR
      (``train/lr``) every ``log_every`` steps, epoch metrics every epoch; flushed and
      closed at the end (trainkit's loggers reopen if written to again).
    * ``progress``: in a terminal or a notebook, a bar with the epoch, the train metrics
      and the val metrics; elsewhere (nohup, SLURM, CI) one plain line per epoch on
      stderr, and one every ``progress`` steps when it is an int. ``False``: silent.
    * ``checkpoint``: a :class:`~trainkit.checkpoint.Checkpointer` (atomic, keep-last-N);
      ``resume="latest"`` (or a file) continues a run exactly, mid-epoch included.
    * ``check_finite``: a NaN/inf metric raises ``FloatingPointError`` naming the step;
      checkpoints already written stay intact.
    * The run stops early when a transform says so (:func:`should_stop`).
    * Shuffling is seeded from ``(state.rng, epoch)``, so a resumed run sees the same batches.
    * A step that does not advance ``state.step`` (no ``apply_gradients``) is an error at once.

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
    _check_fit_args(step, state, epochs, max_steps, eval_step, val_loader, log_every)
    epoch_fn = step if is_epoch_step(step) else epoch_step(step, eval_step)
    gauges = gauges_of(epoch_fn)
    state, position, resumed = _start(state, checkpoint, resume, gauges)
    if dist.world_size() > 1:
        # Each rank trains on its shard, reshuffled per epoch by (state.rng, epoch) (set_epoch below).
        train_loader = dist.shard_loader(train_loader, train=True, seed=derive_seed(state.rng, "shard") % (1 << 62))
        val_loader = None if val_loader is None else dist.shard_loader(val_loader, train=False)
    steps_per_epoch = _len(train_loader)
    stop = _StopRequest()
    stop.stopped = resumed and should_stop(state)  # a run that stopped early stays stopped when resumed
    # the step limit first: the checkpointer reads whether this step cut the epoch
    chosen = _observers(state, logger, checkpoint, progress, check_finite, log_every, epochs, max_steps, steps_per_epoch)
    observers = [_StepLimit(max_steps), *chosen, stop]
    try:
        with donating():
            while (epochs is None or position.epoch < epochs) and not stop.stopped:
                if max_steps is not None and state.step >= max_steps:
                    break
                state = _run_epoch(epoch_fn, state, (train_loader, val_loader), position, observers, (steps_per_epoch, max_steps), gauges)
    finally:
        for o in observers:
            o.close()
    return state, position.history


def _run_epoch(
    epoch_fn: Callable[..., Any],
    state: TrainState,
    loaders: tuple[Iterable[Any], Iterable[Any] | None],
    position: RunPosition,
    observers: list[_Observer],
    limits: tuple[int | None, int | None],
    gauges: frozenset[str],
) -> TrainState:
    """One epoch of ``epoch_fn`` (limits: the steps per epoch, and max_steps), seen by the observers."""
    (train_loader, val_loader), (steps_per_epoch, max_steps) = loaders, limits
    position.start_epoch(gauges)

    def on_step(s: TrainState, metrics: Any, n: int) -> bool:
        event = _Event(s, metrics)
        position.batch += len(event.steps)
        ends = [o.step(event, position) for o in observers]  # every observer sees every step
        return any(ends)

    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(position.epoch)
    data = EpochData(
        train=train_loader, val=val_loader, epoch=position.epoch, skip=position.batch, on_step=on_step,
        train_mean=position.mean, max_steps=max_steps,
    )
    # The shuffle order of this epoch is a function of (state.rng, epoch).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(state.rng, "shuffle", position.epoch))
        state, metrics = check_step_output(epoch_fn(state, data), "epoch step")
    partial = position.cut and position.batch != steps_per_epoch
    row = {"epoch": position.epoch + 1, "step": state.step, **to_floats(metrics)}
    position.end_epoch(row, partial)
    for o in observers:
        o.epoch(state, row, position, partial)
    return state


def _observers(
    state: TrainState,
    logger: Any,
    checkpoint: Any,
    progress: Union[bool, int],
    check_finite: bool,
    log_every: int,
    epochs: int | None,
    max_steps: int | None,
    steps_per_epoch: int | None,
) -> list[_Observer]:
    main = dist.is_main_process()
    out: list[_Observer] = []
    if check_finite:
        out.append(_FiniteCheck(log_every))
    if progress and main and _interactive():
        total = max_steps if epochs is None else (steps_per_epoch * epochs if steps_per_epoch else None)
        out.append(_Progress(total, state.step, log_every, epochs))
    elif progress and main:
        out.append(_PlainProgress(progress if type(progress) is int else None, epochs))
    if logger is not None and main:
        out.append(_Logging(logger, log_every))
    if checkpoint is not None and (main or getattr(checkpoint, "all_ranks", False)):
        # a sharded checkpointer (all_ranks = True) saves collectively: every rank writes its shard
        out.append(_Checkpointing(checkpoint, steps_per_epoch))
    return out


def _start(state: TrainState, checkpoint: Any, resume: Any, gauges: frozenset[str]) -> tuple[TrainState, RunPosition, bool]:
    """The state and position the run starts from: a checkpoint's, or a copy of the caller's."""
    path = None
    if resume is not None:
        if checkpoint is None and str(resume) == "latest":
            raise ValueError('fit: resume="latest" needs checkpoint=Checkpointer(directory).')
        # "latest" with no checkpoint yet starts afresh, so one command both starts and resumes a run
        path = checkpoint.latest() if str(resume) == "latest" else resume
    if path is None:
        return state.clone(), RunPosition(mean=Mean(gauges)), False  # fit donates its own copy
    load = getattr(checkpoint, "load_run", None) or load_run  # a ShardedCheckpointer reads its own format
    state, meta = load(path, like=state)  # new tensors: nothing of the caller's is donated
    if checkpoint is not None:
        checkpoint.restore(meta)  # the best-k ranking as it was when this checkpoint was saved
    return state, RunPosition.from_meta(meta, gauges), True


def _check_fit_args(
    step: Any, state: Any, epochs: Any, max_steps: Any, eval_step: Any, val_loader: Any, log_every: Any
) -> None:
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
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"fit: {name} must be a positive int, got {v!r}.")
    if eval_step is not None and is_epoch_step(step):
        raise ValueError("fit: step is an epoch step, which runs its own evaluation; pass eval_step to tk.epoch_step instead.")
    if val_loader is not None and eval_step is None and not is_epoch_step(step):
        raise ValueError("fit: val_loader given without eval_step; pass eval_step=(state, batch) -> metrics.")


def _len(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _interactive() -> bool:
    if sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
        return True
    # A notebook: stderr is no tty, but what it prints is shown under the cell.
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"

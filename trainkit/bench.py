"""Timing a step properly: warm-up, device sync, donation, medians, interleaved comparisons.

A step is a plain function, so benchmarking one is timing calls of it. The
pitfalls are the usual ones, and this module handles them:

* **Warm-up.** The first calls compile (:func:`trainkit.jit`), allocate and fill
  caches; they are run and not timed.
* **Device sync.** CUDA kernels run asynchronously: on a GPU each step is timed
  with CUDA events (the GPU's clock, no host sync inside the loop), elsewhere
  with ``time.perf_counter``, after a device sync where the device has one.
* **Donation.** A training loop donates its state (``fit`` does), so by default
  the step runs under :func:`trainkit.donating` on a *copy* of your state:
  in-place updates are timed, and the state you pass is never touched.
  ``donate=False`` times the pure step (new tensors every step).
* **Noise.** A step's time is the median of per-step times, with the
  interquartile range as its spread. :func:`compare` runs the contenders
  interleaved, in rounds, in one process: on a busy machine, separate runs of
  the same code vary far more than interleaved ones.

>>> import torch, trainkit as tk
>>> from trainkit.demo import CNN, train_step
>>> state = tk.TrainState.create(CNN(width=4), tk.optim.adam(1e-3))
>>> batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
>>> t = tk.bench.time_step(train_step, state, batch, warmup=2, iters=10)
>>> t.median > 0, t.steps_per_s > 0, len(t.times), state.step
(True, True, 10, 0)
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import torch

from .contract import check_step_output
from .functional import donating
from .state import TrainState

__all__ = ["StepTiming", "Comparison", "time_step", "compare"]

Step = Callable[[TrainState, Any], Any]


@dataclass(frozen=True)
class StepTiming:
    """Per-step times (seconds) of one step function, and their statistics.

    >>> t = StepTiming("step", (0.001, 0.002, 0.003, 0.004), "cpu")
    >>> t.median, t.steps_per_s, round(t.q1, 6), round(t.q3, 6)
    (0.0025, 400.0, 0.00175, 0.00325)
    """

    name: str
    times: tuple[float, ...]
    device: str

    @property
    def median(self) -> float:
        """Median seconds per step."""
        return statistics.median(self.times)

    @property
    def q1(self) -> float:
        """First quartile of the seconds per step."""
        return _quantile(self.times, 0.25)

    @property
    def q3(self) -> float:
        """Third quartile of the seconds per step."""
        return _quantile(self.times, 0.75)

    @property
    def min(self) -> float:
        """The fastest step, in seconds."""
        return min(self.times)

    @property
    def max(self) -> float:
        """The slowest step, in seconds."""
        return max(self.times)

    @property
    def steps_per_s(self) -> float:
        """Steps per second at the median time."""
        return 1.0 / self.median

    def __str__(self) -> str:
        return (
            f"{self.name}: {_ms(self.median)} ms/step median (IQR {_ms(self.q1)}-{_ms(self.q3)} ms), "
            f"{self.steps_per_s:,.0f} steps/s over {len(self.times)} steps on {self.device}"
        )


def _quantile(xs: tuple[float, ...], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


class _Timer:
    """Times single steps on one device: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        sync = getattr(getattr(torch, device.type, None), "synchronize", None)
        self.sync: Callable[[], None] | None = None if device.type == "cpu" else sync

    def run(self, step: Step, state: TrainState, batch: Any, n: int) -> tuple[TrainState, list[float]]:
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            torch.cuda.synchronize(self.device)
            for start, end in events:
                start.record()
                state, _ = step(state, batch)
                end.record()
            torch.cuda.synchronize(self.device)  # the one host sync of the block
            return state, [s.elapsed_time(e) / 1e3 for s, e in events]
        times = []
        sync = self.sync
        clock = time.perf_counter
        if sync is not None:
            sync()
        for _ in range(n):
            t0 = clock()
            state, _ = step(state, batch)
            if sync is not None:
                sync()
            times.append(clock() - t0)
        return state, times


def _prepare(step: Step, state: TrainState, name: str) -> None:
    if not callable(step):
        raise TypeError(f"bench: {name!r} must be a step function (state, batch) -> (state, metrics), got {type(step).__name__}.")
    if getattr(step, "__trainkit_level__", "batch") == "epoch":
        raise TypeError(f"bench: {name!r} is an epoch-level step; time the batch step it folds.")
    if not isinstance(state, TrainState):
        raise TypeError(f"bench: state must be a TrainState, got {type(state).__name__}.")


def _check_counts(warmup: int, iters: int, rounds: int = 1) -> None:
    for k, v in (("warmup", warmup), ("iters", iters), ("rounds", rounds)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "warmup" else 1):
            raise ValueError(f"bench: {k} must be an int >= {0 if k == 'warmup' else 1}, got {v!r}.")
    if iters < rounds:
        raise ValueError(f"bench: iters ({iters}) must be at least rounds ({rounds}): each round times iters // rounds steps.")


class _NoGC:
    # A collection in the middle of a timed block is noise, not the step's cost (timeit does the same).
    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        if self.was:
            gc.enable()


def time_step(
    step: Step,
    state: TrainState,
    batch: Any,
    *,
    warmup: int = 10,
    iters: int = 100,
    donate: bool = True,
    name: str | None = None,
) -> StepTiming:
    """Time ``iters`` calls of ``step`` on one ``batch``, after ``warmup`` untimed calls.

    Each call gets the state the previous one returned, as in training. With
    ``donate=True`` (the default, as ``fit`` runs steps) the calls run under
    :func:`trainkit.donating` on a copy of ``state``; ``state`` itself is never
    changed. The batch is the same every step: data loading is timed apart.

    Returns a :class:`StepTiming` (``median``, ``q1``/``q3``, ``min``/``max``,
    ``steps_per_s`` and the raw ``times``).

    >>> import torch, trainkit as tk
    >>> from trainkit.demo import CNN, train_step
    >>> state = tk.TrainState.create(CNN(width=4), tk.optim.adam(1e-3))
    >>> batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    >>> print(tk.bench.time_step(train_step, state, batch, warmup=1, iters=5))
    train_step: ... ms/step median (IQR ...-... ms), ... steps/s over 5 steps on cpu
    """
    _check_counts(warmup, iters)
    name = name or getattr(step, "__name__", type(step).__name__)
    _prepare(step, state, name)
    timer = _Timer(state.device)
    with donating(donate):
        run_state = _warm(timer, name, step, state.clone(), batch, warmup)
        with _NoGC():
            _, times = timer.run(step, run_state, batch, iters)
    return StepTiming(name, tuple(times), str(state.device))


def _warm(timer: _Timer, name: str, step: Step, state: TrainState, batch: Any, warmup: int) -> TrainState:
    if warmup:
        state, _ = check_step_output(step(state, batch), f"bench: {name}")  # the first call may compile
        state, _ = timer.run(step, state, batch, warmup - 1)
    return state


class Comparison(Mapping[str, StepTiming]):
    """The timings of :func:`compare`, in the order given; the first is the reference.

    ``speedups()`` gives each contender's speed relative to the first (2.0: twice
    as many steps per second); ``table()`` formats them (text or markdown);
    ``plot()`` draws a bar chart.

    >>> c = Comparison({"bare": StepTiming("bare", (0.002,) * 3, "cpu"), "fast": StepTiming("fast", (0.001,) * 3, "cpu")})
    >>> c.speedups()
    {'bare': 1.0, 'fast': 2.0}
    >>> print(c.table(markdown=True))
    | step | ms/step (median) | IQR (ms) | steps/s | vs bare |
    |---|---:|---:|---:|---:|
    | bare | 2.000 | 2.000-2.000 | 500 | 1.00x |
    | fast | 1.000 | 1.000-1.000 | 1,000 | 2.00x |
    """

    def __init__(self, timings: Mapping[str, StepTiming]) -> None:
        if not timings:
            raise ValueError("Comparison: no timings.")
        self._t = dict(timings)

    def __getitem__(self, name: str) -> StepTiming:
        return self._t[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    @property
    def reference(self) -> str:
        """The name of the first contender, which the ratios compare against."""
        return next(iter(self._t))

    def speedups(self) -> dict[str, float]:
        """Steps per second of each contender divided by the first's."""
        ref = self._t[self.reference].median
        return {k: ref / t.median for k, t in self._t.items()}

    def table(self, markdown: bool = False) -> str:
        """The timings as a text (or markdown) table, with the speed relative to the first."""
        head = ["step", "ms/step (median)", "IQR (ms)", "steps/s", f"vs {self.reference}"]
        rows = [
            [k, _ms(t.median), f"{_ms(t.q1)}-{_ms(t.q3)}", f"{t.steps_per_s:,.0f}", f"{s:.2f}x"]
            for (k, t), s in zip(self._t.items(), self.speedups().values(), strict=True)
        ]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        fmt = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])

    def plot(self, path: Union[str, os.PathLike, None] = None, ax: Any = None, title: str | None = None) -> Any:
        """A horizontal bar chart of steps/s, with the IQR as error bars; saved as PNG when ``path`` is given.

        Returns the matplotlib ``Axes``.
        """
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.45 * len(self)))
        names = list(self._t)[::-1]
        rates = [self._t[k].steps_per_s for k in names]
        lo = [r - 1 / self._t[k].q3 for k, r in zip(names, rates, strict=True)]
        hi = [1 / self._t[k].q1 - r for k, r in zip(names, rates, strict=True)]
        bars = ax.barh(names, rates, xerr=[lo, hi], color="#4c72b0", capsize=3)
        speed = self.speedups()
        for bar, k, up in zip(bars, names, hi, strict=True):  # the label after the error bar
            ax.text(bar.get_width() + up, bar.get_y() + bar.get_height() / 2, f" {speed[k]:.2f}x", va="center")
        ax.set_xlabel("steps/s (median; bars: IQR)")
        ax.set_title(title or f"speed vs {self.reference} on {self._t[self.reference].device}")
        ax.margins(x=0.15)
        if path is not None:
            (fig or ax.figure).savefig(path, dpi=120, bbox_inches="tight")
        return ax

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return "Comparison(" + ", ".join(f"{k}={_ms(t.median)}ms" for k, t in self._t.items()) + ")"


def compare(
    steps: Mapping[str, Step],
    state: TrainState,
    batch: Any,
    *,
    warmup: int = 10,
    iters: int = 200,
    rounds: int = 10,
    donate: bool = True,
    verbose: bool = True,
) -> Comparison:
    """Time several steps on the same state and batch, interleaved; print a table of ratios to the first.

    Each contender runs its own chain of states (from a copy of ``state``):
    after ``warmup`` untimed calls each, ``rounds`` rounds time ``iters // rounds``
    calls of every contender in turn, so that the machine's drift hits them all
    alike. Donation as in :func:`time_step`.

    Returns a :class:`Comparison` (a mapping name -> :class:`StepTiming`, with
    ``speedups()``, ``table()`` and ``plot()``).

    >>> import torch, trainkit as tk
    >>> from trainkit.demo import CNN, train_step
    >>> state = tk.TrainState.create(CNN(width=4), tk.optim.adam(1e-3))
    >>> batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    >>> c = tk.bench.compare({"bare": train_step, "again": train_step}, state, batch, warmup=1, iters=6, rounds=3)
    step   ms/step (median)  IQR (ms)  steps/s  vs bare
    -----  ...
    bare   ...  1.00x
    again  ...x
    >>> sorted(c), c.reference, len(c["again"].times)
    (['again', 'bare'], 'bare', 6)
    """
    if not isinstance(steps, Mapping) or not steps:
        raise TypeError("compare: steps must be a non-empty dict {name: step}, e.g. {'bare': step, 'jit': tk.jit(step)}.")
    _check_counts(warmup, iters, rounds)
    for k, s in steps.items():
        _prepare(s, state, k)
    timer = _Timer(state.device)
    chains = {k: state.clone() for k in steps}
    times: dict[str, list[float]] = {k: [] for k in steps}
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    with donating(donate):
        for k, s in steps.items():
            chains[k] = _warm(timer, k, s, chains[k], batch, warmup)
        with _NoGC():
            for n in per_round:
                for k, s in steps.items():
                    chains[k], t = timer.run(s, chains[k], batch, n)
                    times[k].extend(t)
    result = Comparison({k: StepTiming(k, tuple(v), str(state.device)) for k, v in times.items()})
    if verbose:
        print(result.table())
    return result

"""How the runner aggregates step metrics over an epoch or a loader (a leaf module).

* Per-batch metrics are averaged, weighted by batch size.
* The names a step declares with :func:`trainkit.gauges` (counters, gauges: a loss
  scale, a count of skipped steps) keep their last value instead.
* **Whole-set metrics** (F1, AUROC, mAP are not means of per-batch values): an eval
  step returns sufficient statistics, :class:`Sum` (summed over batches and ranks,
  e.g. true/false positives) or :class:`Cat` (concatenated over batches and ranks,
  e.g. scores and labels), and a ``finalize(stats) -> metrics`` function given to
  :func:`trainkit.evaluate` or :func:`trainkit.epoch_step` computes the metrics from
  the totals (with torchmetrics' functional forms, scikit-learn, or by hand).

On the CPU the values become floats at once (reading them costs nothing); on an
accelerator they stay device tensors, summed without a host sync until :func:`to_floats`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from . import dist

__all__ = ["Mean", "Sum", "Cat", "finalize_metrics", "to_floats", "check_finite"]


class Sum:
    """A sufficient statistic summed over every batch (and rank), not averaged: ``Sum(tp)``.

    >>> import torch
    >>> m = Mean(); m.add({"tp": Sum(torch.tensor(3.0))}, 4); m.add({"tp": Sum(torch.tensor(2.0))}, 4)
    >>> m.result()["tp"]
    tensor(5.)
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Sum({self.value!r})"


class Cat:
    """Per-sample values concatenated over every batch (and rank) along dim 0: ``Cat(scores)``.

    >>> import torch
    >>> m = Mean(); m.add({"s": Cat(torch.tensor([0.1, 0.9]))}, 2); m.add({"s": Cat(torch.tensor([0.5]))}, 1)
    >>> m.result()["s"].tolist()
    [0.1, 0.9, 0.5]
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Cat({self.value!r})"


class Mean:
    """Batch-size-weighted means of metrics; the ``gauges`` keep their last value.

    >>> m = Mean(gauges={"scale"})
    >>> m.add({"loss": 1.0, "scale": 4.0}, 1); m.add({"loss": 4.0, "scale": 2.0}, 3)
    >>> m.result()
    {'loss': 3.25, 'scale': 2.0}
    """

    def __init__(self, gauges: frozenset[str] | set[str] = frozenset()) -> None:
        self.gauges = frozenset(gauges)
        self.sums: dict[str, Any] = {}
        self.totals: dict[str, Any] = {}  # Sum statistics
        self.parts: dict[str, list[Tensor]] = {}  # Cat statistics
        self.count = 0

    def add(self, metrics: Mapping[str, Any], n: int) -> None:
        self.count += n
        sums = self.sums
        for k, v in metrics.items():
            if isinstance(v, Sum):
                t = torch.as_tensor(v.value).detach()
                self.totals[k] = t if k not in self.totals else self.totals[k] + t
                continue
            if isinstance(v, Cat):
                self.parts.setdefault(k, []).append(torch.as_tensor(v.value).detach())
                continue
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    raise ValueError(f"metric {k!r} must be a scalar, got shape {tuple(v.shape)}; reduce it, e.g. .mean().")
                v = v.detach()
                v = v.item() if v.device.type == "cpu" else v.reshape(()).float()
            if k in self.gauges:
                sums[k] = v
                continue
            prev = sums.get(k)
            sums[k] = v * n if prev is None else prev + v * n

    def result(self) -> dict[str, Any]:
        """The means (and the gauges' last values, the Sum totals and the Cat tensors), local to this process."""
        out: dict[str, Any] = {k: v if k in self.gauges else v / self.count for k, v in self.sums.items()} if self.count else {}
        out.update(self.totals)
        out.update({k: torch.cat([p.reshape(p.shape or (1,)) for p in parts]) for k, parts in self.parts.items()})
        return out

    def across_ranks(self) -> dict[str, Any]:
        """The means over every rank's batches (the same on all ranks), so decisions taken on
        them agree; the gauges are this rank's (they are the same on every rank); Sum
        statistics are summed and Cat statistics concatenated over the ranks (rank order)."""
        if dist.world_size() == 1:
            return self.result()
        means = dist.reduce_means({k: v for k, v in self.sums.items() if k not in self.gauges}, self.count)
        out: dict[str, Any] = {k: (self.sums[k] if k in self.gauges else means[k]) for k in self.sums}
        local = self.result()
        stats = {k: local[k].cpu() for k in (*self.totals, *self.parts)}
        if stats:
            gathered = dist.gather_objects(stats)  # a host sync, once per evaluation
            for k in self.totals:
                out[k] = sum(g[k] for g in gathered)
            for k in self.parts:
                out[k] = torch.cat([g[k] for g in gathered])
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of a running mean (plain floats and ints)."""
        if self.totals or self.parts:
            raise ValueError(
                f"metrics: a train step returned whole-set statistics {sorted((*self.totals, *self.parts))} (Sum/Cat), "
                "which a mid-epoch checkpoint cannot keep. Return them from the eval step, with a finalize function."
            )
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "count": int(self.count)}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in saved["sums"].items()}
        self.count = int(saved["count"])


def finalize_metrics(stats: Mapping[str, Any], finalize: Any = None) -> dict[str, Any]:
    """The scalar metrics of aggregated ``stats``, with what ``finalize(stats)`` computes from the whole set.

    ``finalize`` sees every aggregate (means, Sum totals, Cat tensors) and returns a dict
    of whole-set metrics; Cat tensors (not scalars) are then left out of the result.

    >>> import torch
    >>> stats = {"loss": 0.5, "tp": torch.tensor(8.0), "fp": torch.tensor(2.0), "fn": torch.tensor(2.0)}
    >>> finalize_metrics(stats, lambda s: {"f1": 2 * s["tp"] / (2 * s["tp"] + s["fp"] + s["fn"])})["f1"]
    tensor(0.8000)
    """
    out = {k: v for k, v in stats.items() if not isinstance(v, Tensor) or v.numel() == 1}
    if finalize is None:
        left = [k for k in stats if k not in out]
        if left:
            raise ValueError(
                f"metrics: the eval step returned whole-set statistics {left} (Cat) but no finalize function "
                "turns them into metrics. Pass finalize=lambda stats: {...} to tk.evaluate or tk.epoch_step."
            )
        return out
    if not callable(finalize):
        raise TypeError(f"metrics: finalize must be a function stats -> dict of metrics, got {type(finalize).__name__}.")
    extra = finalize(dict(stats))
    if not isinstance(extra, Mapping):
        raise TypeError(f'metrics: finalize must return a dict of metrics, got {type(extra).__name__}. Return e.g. {{"f1": f1}}.')
    return {**out, **extra}


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as Python floats. This is a host sync point on accelerators: the runner calls
    it at log intervals only.

    >>> import torch
    >>> to_floats({"loss": torch.tensor(0.5)})
    {'loss': 0.5}
    """
    return {k: float(v) for k, v in metrics.items()}


def check_finite(scalars: Mapping[str, float], step: int, epoch: int | None = None) -> None:
    """Raise ``FloatingPointError`` naming the first NaN/inf metric, where it was seen, and what to do.

    >>> check_finite({"loss": float("nan")}, step=3)
    Traceback (most recent call last):
    ...
    FloatingPointError: fit: metric 'loss' is nan at step 3 (check_finite=True). ...
    """
    for k, value in scalars.items():
        if not math.isfinite(value):
            where = f"in epoch {epoch} (by step {step})" if epoch is not None else f"at step {step}"
            raise FloatingPointError(
                f"fit: metric {k!r} is {value} {where} (check_finite=True). "
                "Lower the learning rate, clip gradients (optim.chain(optim.clip_by_global_norm(1.0), ...)), "
                "or check the data; checkpoints written so far are intact."
            )

"""Weighted means of step metrics, the one aggregation the runner does (a leaf module).

Per-batch metrics are averaged weighted by batch size; the names a step declares
with :func:`trainkit.gauges` (counters, gauges: a loss scale, a count of skipped
steps) keep their last value instead. On the CPU the values become floats at once
(reading them costs nothing); on an accelerator they stay device tensors, summed
without a host sync until :func:`to_floats`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor

from . import dist

__all__ = ["Mean", "to_floats", "check_finite"]


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
        self.count = 0

    def add(self, metrics: Mapping[str, Any], n: int) -> None:
        self.count += n
        sums = self.sums
        for k, v in metrics.items():
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
        """The means (and the gauges' last values) of what was added, local to this process."""
        if not self.count:
            return {}
        return {k: v if k in self.gauges else v / self.count for k, v in self.sums.items()}

    def across_ranks(self) -> dict[str, Any]:
        """The means over every rank's batches (the same on all ranks), so decisions taken on
        them agree; the gauges are this rank's (they are the same on every rank)."""
        if dist.world_size() == 1:
            return self.result()
        means = dist.reduce_means({k: v for k, v in self.sums.items() if k not in self.gauges}, self.count)
        return {k: (self.sums[k] if k in self.gauges else means[k]) for k in self.sums}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of a running mean (plain floats and ints)."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "count": int(self.count)}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in saved["sums"].items()}
        self.count = int(saved["count"])


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

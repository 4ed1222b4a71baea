"""Debug conveniences in trainkit's style: loaders that stand in for Lightning's Trainer flags.

Lightning writes ``Trainer(fast_dev_run=True, limit_train_batches=10, overfit_batches=2)``;
here each is a loader (or one call), so ``fit`` keeps no flag for it:

* ``tk.fit(step, state, limit(train, 10), ...)``: the first 10 batches of each epoch;
* ``tk.fit(step, state, overfit(train, 2), ...)``: the same 2 batches every epoch (the
  model should drive their loss to ~0: a test of the step, the model and the data);
* ``dev_run(step, state, train, eval_step=..., val_loader=...)``: one batch of training and
  one of validation, end to end through ``fit`` (checkpointer and logger included if given).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

from .run import fit

__all__ = ["limit", "overfit", "dev_run"]


class limit:
    """The first ``n`` batches of ``loader``, each time it is iterated (``len`` is at most ``n``).

    >>> list(limit([1, 2, 3, 4], 2)), len(limit([1, 2, 3], 5))
    ([1, 2], 3)
    """

    def __init__(self, loader: Iterable[Any], n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"limit: n must be an int >= 1 (the number of batches), got {n!r}.")
        self.loader, self.n = loader, n
        self.sampler = getattr(loader, "sampler", None)  # fit sets the epoch of a DistributedSampler here

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        try:
            return min(self.n, len(self.loader))  # type: ignore[arg-type]
        except TypeError:
            return self.n


class overfit:
    """The first ``n`` batches of ``loader``, drawn once and repeated every epoch.

    >>> batches = overfit(iter([1, 2, 3]), 2)
    >>> list(batches), list(batches)
    ([1, 2], [1, 2])
    """

    def __init__(self, loader: Iterable[Any], n: int = 1) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"overfit: n must be an int >= 1 (the number of batches), got {n!r}.")
        self.batches = list(itertools.islice(iter(loader), n))
        if not self.batches:
            raise ValueError("overfit: the loader yielded no batch.")

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def dev_run(
    step: Callable[..., Any], state: Any, train_loader: Iterable[Any], *, val_loader: Iterable[Any] | None = None, **fit_kwargs: Any
) -> tuple[Any, list[dict[str, float]]]:
    """One batch of training and one of validation through ``fit`` (Lightning's ``fast_dev_run``).

    Finds errors in a step, an eval step, a logger or a checkpointer in seconds
    instead of an epoch. Other keyword arguments go to :func:`trainkit.fit`.

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> def step(state, batch):
    ...     loss, g = tk.value_and_grad(lambda p: state.apply(p, batch)[0].square().mean())(state.params)
    ...     return state.apply_gradients(g), {"loss": loss}
    >>> new, history = tk.debug.dev_run(step, state, [torch.ones(2, 1)] * 100, progress=False)
    >>> new.step, len(history)
    (1, 1)
    """
    val = None if val_loader is None else limit(val_loader, 1)
    return fit(step, state, limit(train_loader, 1), epochs=1, val_loader=val, **fit_kwargs)

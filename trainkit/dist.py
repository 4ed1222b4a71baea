"""Process-group helpers: the one place that asks whether torch.distributed is running.

Everything here works without a process group (one process: rank 0 of 1), so the
runner, the loggers and the transforms call it unconditionally.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch

__all__ = [
    "DistributedError", "is_initialized", "world_size", "rank", "is_main_process", "broadcast", "gather_objects",
    "shard_loader", "reduce_means",
]


class DistributedError(RuntimeError):
    """A collective failed or timed out: a peer rank died, hung, or runs a different number of steps."""


def is_initialized() -> bool:
    """Whether a default torch.distributed process group exists.

    >>> is_initialized()
    False
    """
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks of the default group (1 without one).

    >>> world_size()
    1
    """
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one).

    >>> rank()
    0
    """
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that logs and checkpoints).

    >>> is_main_process()
    True
    """
    return rank() == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (one small object broadcast), so every rank takes the same decision.

    >>> broadcast({"stop": True})
    {'stop': True}
    """
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class _Strided(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: each sample once, no padding (for evaluation)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group).

    >>> gather_objects({"n": 3})
    [{'n': 3}]
    """
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    try:
        torch.distributed.all_gather_object(gathered, obj)
    except RuntimeError as e:
        raise DistributedError(
            f"distributed: gathering results failed on rank {rank()} of {world_size()}: a peer rank has died, hangs, "
            f"or ran a different number of steps. [{type(e).__name__}: {str(e)[:300]}]"
        ) from e
    return gathered


def shard_loader(loader: Iterable[Any], *, train: bool, seed: int = 0) -> Iterable[Any]:
    """This rank's share of ``loader`` (used by :func:`trainkit.fit` under torch.distributed).

    A ``DataLoader`` over a map-style dataset is rebuilt with the same settings around
    a sampler that gives this rank its part of the data:

    * ``train=True``: ``DistributedSampler`` (shuffled if the loader was, by ``seed`` and
      the epoch that ``fit`` sets, so a resumed run sees the same batches; padded so
      that every rank gets the same number of batches and no rank waits for a peer);
    * ``train=False``: every ``world``-th sample, no padding (evaluation needs no
      collectives, and ``fit`` averages the metrics over ranks weighted by counts).

    Anything else (a list of batches, an iterable dataset, a loader that already has a
    ``DistributedSampler`` or its own batch sampler) is returned as it is: it must then
    yield this rank's batches, the same number on every rank. Outside torch.distributed
    it returns ``loader`` itself.

    >>> batches = [1, 2, 3]
    >>> shard_loader(batches, train=True) is batches
    True
    """
    if world_size() == 1:
        return loader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    if isinstance(loader.sampler, (DistributedSampler, _Strided)) or type(loader.batch_sampler) is not BatchSampler:
        return loader
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    if train:
        sampler: Any = DistributedSampler(
            loader.dataset, num_replicas=world, rank=rank, shuffle=isinstance(loader.sampler, RandomSampler), seed=seed, drop_last=False
        )
    else:
        sampler = _Strided(len(loader.dataset), rank, world)  # type: ignore[arg-type]
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )


def reduce_means(sums: Mapping[str, Any], count: int) -> dict[str, float]:
    """Weighted means over every rank: ``sum of sums / sum of counts`` (the same on all ranks).

    ``fit`` calls it at the end of each epoch so that the epoch metrics (and the
    decisions taken on them, such as early stopping) are identical on every rank.
    Outside torch.distributed it is the local mean.

    >>> reduce_means({"loss": 6.0}, 3)
    {'loss': 2.0}
    """
    local = ({k: float(v) for k, v in sums.items()}, int(count))  # a host sync, once per epoch
    dist = torch.distributed
    if world_size() == 1:
        gathered = [local]
    else:
        gathered = [None] * dist.get_world_size()
        try:
            dist.all_gather_object(gathered, local)
        except RuntimeError as e:
            raise DistributedError(
                f"distributed: gathering the epoch metrics failed on rank {dist.get_rank()} of {dist.get_world_size()}: "
                f"a peer rank has died, hangs, or ran a different number of epochs. [{type(e).__name__}: {str(e)[:300]}]"
            ) from e
    total = sum(c for _, c in gathered)
    keys: dict[str, None] = {}
    for s, _ in gathered:
        keys.update(dict.fromkeys(s))
    return {k: sum(s.get(k, 0.0) for s, _ in gathered) / total for k in keys} if total else {}

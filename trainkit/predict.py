"""``predict``: a function of the state over a loader, for inference (Lightning's ``trainer.predict``)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import dist
from .state import TrainState

__all__ = ["predict"]


def predict(fn: Callable[[TrainState, Any], Any], state: TrainState, loader: Iterable[Any]) -> Any:
    """The outputs of ``fn(state, batch)`` over ``loader``, concatenated in the loader's order.

    ``fn`` is called without autograd, with each batch's tensors moved to the state's
    device; call the model with ``state.apply(None, x)`` (eval mode, as by default).
    Outputs that are tensors (or tuples/dicts of tensors) with a batch dimension are
    concatenated along it; anything else (e.g. a list of strings per batch) is
    returned as a flat list of per-sample items. Under torchrun, each rank predicts
    its share of a ``DataLoader`` and every rank gets all outputs, gathered in the
    loader's order (a loader that cannot be sharded is predicted whole on every rank).

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
    >>> out = tk.predict(lambda s, x: s.apply(None, x)[0], state, [torch.ones(3, 2), torch.zeros(1, 2)])
    >>> out.shape, bool(torch.equal(out[3], state.params["bias"]))
    (torch.Size([4, 1]), True)
    """
    if not callable(fn):
        raise TypeError(f"predict: fn must be a function (state, batch) -> outputs, got {type(fn).__name__}.")
    if not isinstance(state, TrainState):
        raise TypeError(f"predict: state must be a TrainState, got {type(state).__name__}.")
    shard = dist.shard_loader(loader, train=False)
    device = state.device
    outputs = []
    with torch.no_grad():
        for batch in shard:
            batch = pytree.tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, Tensor) else t, batch)
            outputs.append(fn(state, batch))
    local = _concat(outputs)
    if shard is loader or dist.world_size() == 1:
        return local
    parts = dist.gather_objects(pytree.tree_map(lambda t: t.cpu() if isinstance(t, Tensor) else t, local))
    merged = _interleave(parts)
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, merged)


def _concat(outputs: list[Any]) -> Any:
    if not outputs:
        return []
    leaves0, spec = pytree.tree_flatten(outputs[0])
    if leaves0 and all(isinstance(t, Tensor) and t.dim() > 0 for t in leaves0):
        columns = [pytree.tree_flatten(o)[0] for o in outputs]
        return pytree.tree_unflatten([torch.cat(list(col)) for col in zip(*columns, strict=True)], spec)
    flat: list[Any] = []
    for o in outputs:
        flat.extend(o if isinstance(o, (list, tuple)) else [o])
    return flat


def _interleave(parts: list[Any]) -> Any:
    # The evaluation sharding gives rank r the samples r, r + W, r + 2W, ...: sample i is item i // W of rank i % W.
    world = len(parts)
    if isinstance(parts[0], list):
        n = sum(len(p) for p in parts)
        return [parts[i % world][i // world] for i in range(n)]
    leaves = [pytree.tree_flatten(p)[0] for p in parts]
    spec = pytree.tree_flatten(parts[0])[1]
    merged = []
    for col in zip(*leaves, strict=True):
        n = sum(t.shape[0] for t in col)
        out = col[0].new_empty((n, *col[0].shape[1:]))
        for r, t in enumerate(col):
            out[r::world] = t
        merged.append(out)
    return pytree.tree_unflatten(merged, spec)

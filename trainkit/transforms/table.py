"""Every transform, its level, kind and slot, and every order rule between them: declared here once.

A transform checks its place when it wraps a step, by calling :func:`check_order`
with its name; the messages below are the only place an order error is written.
Rules are pairs ``(outer, inner)``: ``outer`` may not wrap a step that ``inner``
already wraps. A transform of your own needs no entry (it is then unconstrained);
add one with :func:`register` to give it rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..contract import is_epoch_step
from ._base import applied_transforms

__all__ = ["TransformInfo", "TRANSFORMS", "RULES", "register", "check_order"]


@dataclass(frozen=True)
class TransformInfo:
    """What the runner and the other transforms need to know of a transform.

    ``level``: the step it wraps (``"batch"``, ``"epoch"`` or ``"any"``); ``kind``: what it
    does; ``slot``: its key in ``state.slots`` (``None``: it keeps no state); ``how``:
    how to write it around the right level, for the error when it is given the other one.
    """

    name: str
    level: Literal["batch", "epoch", "any"]
    kind: Literal["parallel", "precision", "compile", "control", "tuning", "user"]
    slot: str | None = None
    how: str = ""


TRANSFORMS: dict[str, TransformInfo] = {}


def register(info: TransformInfo) -> TransformInfo:
    """Declare a transform (trainkit's own are declared below).

    >>> register(TransformInfo("my_clip", level="batch", kind="user")).name
    'my_clip'
    """
    if not isinstance(info, TransformInfo):
        raise TypeError(f"register: expected a TransformInfo, got {type(info).__name__}.")
    TRANSFORMS[info.name] = info
    return info


for _info in (
    TransformInfo("data_parallel", "batch", "parallel", how="tk.epoch_step(tk.data_parallel(train_step), eval_step)"),
    TransformInfo("distributed", "batch", "parallel", how="tk.epoch_step(tk.distributed(train_step), eval_step)"),
    TransformInfo("xla_sharded", "batch", "parallel", how="tk.epoch_step(tk.xla_sharded(train_step), eval_step)"),
    TransformInfo(
        "mixed_precision", "batch", "precision", slot="mixed_precision",
        how="tk.epoch_step(tk.mixed_precision(train_step, dtype=...), eval_step) (one loss-scale update per optimizer step)",
    ),
    TransformInfo("jit", "batch", "compile", how="tk.epoch_step(tk.jit(step), eval_step)"),
    TransformInfo(
        "lr_range_test", "batch", "tuning", slot="lr_range_test",
        how="tk.lr_range_test(train_step) or tk.find_lr(train_step, state, train_loader) (one LR per optimizer update)",
    ),
    TransformInfo("early_stop", "any", "control", slot="early_stop"),
    TransformInfo("reduce_on_plateau", "any", "control", slot="reduce_on_plateau"),
):  # fmt: skip
    register(_info)

_ONE_PARALLEL = (
    "use one parallel transform (data_parallel on the devices of one process, distributed across processes, "
    "xla_sharded on XLA)."
)
_PARALLEL = ("data_parallel", "distributed", "xla_sharded")
_NOT_IN_JIT = {
    "data_parallel": "its replicas run in threads that wait for each other's gradients. Use data_parallel without jit.",
    "distributed": "it exchanges gradients with the other processes while backward runs. Use distributed without jit.",
    "xla_sharded": "XLA traces and compiles the step itself. Use xla_sharded without jit.",
    "lr_range_test": "it reads the loss on the host every step (to smooth it and stop on divergence). "
    "Put it outside: tk.lr_range_test(tk.jit(step)), or tk.find_lr(tk.jit(step), state, loader).",
    "early_stop": "it reads the monitored metric on the host to decide. Put it outside: "
    "tk.early_stop(tk.epoch_step(tk.jit(step), eval_step), monitor=...).",
    "reduce_on_plateau": "it reads the monitored metric on the host to decide. Put it outside: "
    "tk.reduce_on_plateau(tk.epoch_step(tk.jit(step), eval_step), monitor=...).",
}
_AROUND_JIT = {
    "data_parallel": "the replicas meet inside value_and_grad (threads averaging their gradients), which a compiled "
    "graph cannot hold. Use data_parallel without tk.jit, or tk.jit on one device.",
    "distributed": "the gradient all-reduce runs asynchronously during backward, which torch.compile cannot trace "
    "(async collectives). Use tk.distributed without tk.jit.",
    "xla_sharded": "XLA compiles the step itself; inductor's graph cannot run on XLA tensors. Use xla_sharded without tk.jit.",
}

#: (outer, inner) -> why ``outer`` may not wrap a step that ``inner`` already wraps, and what to do.
RULES: dict[tuple[str, str], str] = {
    **{(a, b): _ONE_PARALLEL for a in _PARALLEL for b in _PARALLEL if a != b},
    **{("jit", name): f"it cannot run inside one compiled graph: {why}" for name, why in _NOT_IN_JIT.items()},
    **{(name, "jit"): f"it is compiled by tk.jit, but {why}" for name, why in _AROUND_JIT.items()},
    **{
        ("mixed_precision", name): "mixed_precision must stand inside it, so that the finiteness check sees the reduced "
        f"gradients and every replica skips the same steps. Write tk.compose(tk.{name}(...), tk.mixed_precision(...))(step)."
        for name in ("data_parallel", "distributed")
    },
}


def not_inside_jit(name: str) -> str | None:
    """Why transform ``name`` cannot stand inside ``tk.jit`` (``None``: it can).

    >>> not_inside_jit("mixed_precision") is None, not_inside_jit("distributed") is not None
    (True, True)
    """
    return _NOT_IN_JIT.get(name)


def check_order(name: str, inner: Callable[..., Any]) -> None:
    """Raise if transform ``name`` may not wrap ``inner``: wrong level, applied twice, or a rule of :data:`RULES`.

    >>> import trainkit as tk
    >>> check_order("jit", tk.epoch_step(lambda s, b: (s, {})))
    Traceback (most recent call last):
    ...
    TypeError: jit wraps a batch step (state, batch) -> (state, metrics), got an epoch step. Write tk.epoch_step(tk.jit(step), eval_step).
    """
    info = TRANSFORMS.get(name)
    level = "epoch" if is_epoch_step(inner) else "batch"
    if info is not None and info.level not in ("any", level):
        want = "a batch step (state, batch) -> (state, metrics)" if info.level == "batch" else "an epoch step (tk.epoch_step)"
        raise TypeError(f"{name} wraps {want}, got {'an epoch' if level == 'epoch' else 'a batch'} step. Write {info.how}.")
    applied = applied_transforms(inner)
    if name in applied:
        raise ValueError(f"{name}: the step is already wrapped by {name} (transforms applied: {list(applied)}). Apply it once.")
    for below in applied:
        why = RULES.get((name, below))
        if why is not None:
            raise ValueError(f"{name}: the step is already wrapped by {below}; {why}")
    per_call = getattr(inner, "steps_per_call", 1)
    if per_call > 1:  # (a rule above already refused the transforms that cannot be compiled at all)
        raise ValueError(
            f"{name}: the step is tk.jit(..., steps_per_call={per_call}), which takes lists of {per_call} batches; "
            f"a transform around it would pass one batch. Put {name} inside: "
            f"tk.jit(tk.{name}(step, ...), steps_per_call={per_call}) (or, for an epoch-level one, around tk.epoch_step)."
        )

"""Composing stages: ``chain``, ``masked`` and ``partition`` (param groups), ``MultiSteps`` (accumulation)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

from ._base import STAGE, GradientTransformation, Params, Pending, as_dict, check_int, donated_fn, materialize, remap, stage
from ._stages import Mask, check_mask, resolve_mask

LabelFn = Union[Callable[[str, Tensor], str], Mapping[str, str]]


def _check_tx(who: str, what: str, tx: Any) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"{who}: {what} is {type(tx).__name__}, expected a GradientTransformation such as trainkit.optim.adam(1e-3) "
            "(torch.optim optimizers are stateful objects and do not fit)."
        )


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in sequence, each to the updates of the previous one; the state is a tuple of theirs.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(1.0))
    >>> p = {"w": torch.zeros(2)}
    >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(p), p)
    >>> [round(v, 4) for v in u["w"].tolist()]
    [-0.3, -0.4]
    """
    for i, t in enumerate(transforms):
        _check_tx("chain", f"argument {i}", t)
    runs = [donated_fn(t) for t in transforms]

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def donated(updates: Any, state: tuple, params: Params) -> tuple[Any, tuple]:
        if not isinstance(state, tuple) or len(state) != len(runs):
            got = f"a {type(state).__name__} of {len(state)} states" if isinstance(state, (tuple, list)) else type(state).__name__
            raise ValueError(
                f"chain: a chain of {len(runs)} stages got {got}. Make the state with this chain's init "
                "(TrainState.create(module, tx) or optim.init(tx, params)); a state or checkpoint of another optimizer does not fit."
            )
        new_states = []
        for run, s in zip(runs, state, strict=True):
            updates, s = run(updates, s, params)
            new_states.append(s)
        return updates, tuple(new_states)

    return stage(donated, init)


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` to the params ``mask`` selects; the others' updates pass through unchanged.

    ``mask`` is a function ``(name, tensor) -> bool`` or a dict ``{name: bool}``
    with every param; it is resolved once, at ``init``, and the names kept in the state.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.masked(optim.add_decayed_weights(0.5), lambda name, p: name != "bias")
    >>> p = {"weight": torch.ones(1), "bias": torch.ones(1)}
    >>> u, _ = tx.update({"weight": torch.zeros(1), "bias": torch.zeros(1)}, tx.init(p), p)
    >>> u["weight"].item(), u["bias"].item()
    (0.5, 0.0)
    """
    _check_tx("masked", "inner", inner)
    check_mask("masked", mask)
    run = donated_fn(inner)

    def init(params: Params) -> dict:
        names = resolve_mask("masked", mask, params)
        return {STAGE: "masked", "names": names, "inner": inner.init({n: params[n] for n in names})}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Pending, dict]:
        u, names = as_dict(updates, params), state["names"]
        out, inner_state = run({n: u[n] for n in names}, state["inner"], {n: params[n] for n in names})
        chosen = set(names)
        rest = [n for n in params if n not in chosen]
        merged = remap(out, names, list(params))
        if rest:
            where = {n: i for i, n in enumerate(params)}
            merged.terms.append(("add", 1.0, [where[n] for n in rest], [u[n] for n in rest], None))
        return merged, {**state, "inner": inner_state}

    return stage(donated, init)


def partition(transforms: Mapping[str, GradientTransformation], label_fn: LabelFn) -> GradientTransformation:
    """Param groups (Optax's ``multi_transform``): ``transforms[label]`` updates the params ``label_fn`` labels so.

    ``label_fn`` is a function ``(name, tensor) -> label`` or a dict ``{name: label}``
    with every param; labels are strings, resolved once at ``init`` and kept in the
    state. ``state.lr`` reads the first group's LR (in the order of ``transforms``);
    :func:`trainkit.optim.get_lrs` reads them all, and ``set_lr`` sets them all.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.partition({"fast": optim.sgd(1.0), "slow": optim.sgd(0.1)}, lambda n, p: "fast" if n == "a" else "slow")
    >>> p = {"a": torch.zeros(1), "b": torch.zeros(1)}
    >>> u, s = tx.update({"a": torch.ones(1), "b": torch.ones(1)}, tx.init(p), p)
    >>> u["a"].item(), round(u["b"].item(), 6), optim.get_lrs(s)
    (-1.0, -0.1, [1.0, 0.1])
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError(f"partition: transforms must be a non-empty dict {{label: GradientTransformation}}, got {transforms!r}.")
    for label, t in transforms.items():
        if not isinstance(label, str):
            raise TypeError(f"partition: labels must be strings (they are keys of the checkpointed state), got {label!r}.")
        _check_tx("partition", f"transforms[{label!r}]", t)
    if not callable(label_fn) and not isinstance(label_fn, Mapping):
        raise TypeError(
            f"partition: label_fn must be a function (name, tensor) -> label or a dict {{name: label}}, got {type(label_fn).__name__}."
        )
    runs = {label: donated_fn(t) for label, t in transforms.items()}
    # The same stage object in two groups shares its scratch memory: finish one group before the next.
    shared = len({id(t) for t in transforms.values()}) < len(transforms)

    def init(params: Params) -> dict:
        labels = _labels(label_fn, params, list(transforms))
        groups = {label: [n for n in params if labels[n] == label] for label in transforms}
        inner = {label: transforms[label].init({n: params[n] for n in names}) for label, names in groups.items()}
        return {STAGE: "partition", "groups": groups, "inner": inner}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Pending, dict]:
        u, names = as_dict(updates, params), list(params)
        merged, inner = Pending(names), {}
        for label, run in runs.items():
            group = state["groups"][label]
            sub_p = {n: params[n] for n in group}
            out, inner[label] = run({n: u[n] for n in group}, state["inner"][label], sub_p)
            if shared:
                out = Pending(group, [("add", 1.0, None, list(materialize(out, sub_p).values()), None)], Pending.of(out).post)
            part = remap(out, group, names)
            merged.terms.extend(part.terms)
            merged.post.extend(part.post)
        return merged, {**state, "inner": inner}

    return stage(donated, init)


def _labels(label_fn: LabelFn, params: Params, known: list[str]) -> dict[str, str]:
    if callable(label_fn):
        labels = {n: label_fn(n, p) for n, p in params.items()}
    else:
        missing = [n for n in params if n not in label_fn]
        unknown = [n for n in label_fn if n not in params]
        if missing or unknown:
            raise ValueError(
                f"partition: the labels must name every param and only params; missing {missing}, unknown {unknown}. "
                f"The params are {list(params)}."
            )
        labels = {n: label_fn[n] for n in params}
    bad = {n: lb for n, lb in labels.items() if lb not in known}
    if bad:
        raise ValueError(
            f"partition: params labelled with no transform: {bad}; the labels are {known}. "
            f"Return one of them for every param (the params are {list(params)})."
        )
    return labels


# --------------------------------------------------------------------------- gradient accumulation


def MultiSteps(tx: GradientTransformation, every_k: int) -> GradientTransformation:  # noqa: N802 (Optax's name)
    """Gradient accumulation: ``every_k`` micro-batches, then one update of ``tx`` with their mean gradient.

    The first ``every_k - 1`` calls only add the gradients to an accumulator in the
    state (their updates are zero: the params do not move, ``tx``'s schedule does not
    advance); the ``every_k``-th divides by ``every_k`` and updates. With a mean loss
    over equal micro-batches this is one step on their concatenation. If a transform
    vetoes a micro-step (fp16 with non-finite gradients; see
    :func:`trainkit.optim.skip_update`), the whole accumulated update is skipped.
    Under trainkit.jit the first, middle and final micro-steps are up to three graphs.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.MultiSteps(optim.sgd(1.0), every_k=2)
    >>> p = {"w": torch.tensor([0.0])}
    >>> s = optim.init(tx, p)
    >>> for g in (1.0, 3.0):
    ...     p, s = optim.apply_gradients(tx, {"w": torch.tensor([g])}, s, p, donate=False)
    ...     print(p["w"].item(), optim.is_accumulating(s))  # does the next call only accumulate?
    0.0 False
    -2.0 True
    """
    _check_tx("MultiSteps", "tx", tx)
    every_k = check_int("MultiSteps", "every_k", every_k, low=1, example=4)
    run = donated_fn(tx)

    def init(params: Params) -> dict:
        acc = {n: torch.zeros_like(p) for n, p in params.items()} if every_k > 1 else {}
        return {STAGE: "multi_steps", "every_k": every_k, "mini_step": 0, "poisoned": False, "acc": acc, "inner": tx.init(params)}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Any, dict]:
        i, k = state["mini_step"], state["every_k"]
        if k == 1:
            out, inner = run(updates, state["inner"], params)
            return out, {**state, "inner": inner}
        g, acc = list(as_dict(updates, params).values()), list(state["acc"].values())
        if i == 0:  # no zeroing needed: the first micro-batch overwrites what the last update left
            torch._foreach_copy_(acc, g)
        else:
            torch._foreach_add_(acc, g)
        if i < k - 1:
            return Pending(list(params)), {**state, "mini_step": i + 1}
        if state["poisoned"]:  # a vetoed micro-batch: skip the whole accumulated update
            return Pending(list(params)), {**state, "mini_step": 0, "poisoned": False}
        torch._foreach_div_(acc, float(k))
        out, inner = run(state["acc"], state["inner"], params)
        return out, {**state, "mini_step": 0, "inner": inner}

    return stage(donated, init)

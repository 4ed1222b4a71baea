"""The pieces every stage shares: the transformation type, pending updates, checks, state walks.

A stage has a pure ``update`` (Optax's contract) and, for speed, a ``donated``
variant with the same maths that updates its own state tensors in place and may
return a :class:`Pending` instead of materialised updates, so that the last step
(``p += u``) can be fused into torch's foreach kernels (``addcdiv_``, as
``torch.optim`` does). The pure ``update`` of a built-in stage is its donated
variant run on a copy of the state, so the two agree bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]

# The key that names a built-in stage's state ("_stage": "scale_by_learning_rate"): the one
# convention by which get_lr, set_lr, skip_update, ... find what they need in any nesting.
STAGE = "_stage"


class GradientTransformation(NamedTuple):
    """An optimizer stage: ``init(params) -> state`` and ``update(updates, state, params) -> (updates, state)``.

    ``params``, ``updates`` and the gradients are dicts keyed by parameter name, in
    the order of ``state.params``. ``update`` is pure: it returns new tensors and
    leaves its arguments untouched. It is a pair, as Optax's (``init, update = tx``);
    the built-in stages also carry ``tx.donated``, the in-place variant that
    :func:`trainkit.optim.apply_gradients` uses. A stage of your own needs only
    ``init`` and ``update``.

    >>> import torch, trainkit.optim as optim
    >>> double = optim.GradientTransformation(lambda params: (), lambda u, s, p: ({n: 2 * g for n, g in u.items()}, s))
    >>> tx = optim.chain(double, optim.sgd(0.5))
    >>> p = {"w": torch.tensor([1.0])}
    >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init(p), p)
    >>> u["w"].item()
    -3.0
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]


class _Stage(GradientTransformation):
    """A built-in stage: the pair, plus its in-place variant ``donated`` (an attribute, so the pair still unpacks in two)."""

    donated: Callable[[Any, Any, Params], tuple[Any, Any]]


# --------------------------------------------------------------------------- pending updates


class Pending:
    """Updates not materialised yet: ``u[i] = sum of terms``, applied to the params in place when donated.

    A term is ``(kind, coef, idx, a, b)`` over the positions ``idx`` of ``names``
    (``None``: all): ``"add"`` is ``coef * a``, ``"div"`` is ``coef * a / b``,
    ``"self"`` is ``coef * params``, ``"deferred"`` is ``coef *`` a :class:`Deferred`
    (Adam's step, computed when consumed: by one fused kernel when applied, else
    as a quotient). ``post`` holds functions of the new params (the EMA of the
    weights) to run once they are written.
    """

    __slots__ = ("names", "terms", "post")

    def __init__(self, names: list[str], terms: list[tuple] | None = None, post: list[Callable[[Params], None]] | None = None) -> None:
        self.names = names
        self.terms = terms if terms is not None else []
        self.post = post if post is not None else []

    @staticmethod
    def of(updates: Any) -> "Pending":
        """``updates`` as a Pending (a dict of tensors becomes one ``add`` term)."""
        if isinstance(updates, Pending):
            return updates
        return Pending(list(updates), [("add", 1.0, None, list(updates.values()), None)])

    def scaled(self, factor: Any) -> "Pending":
        """Every term multiplied by ``factor`` (a float, or a 0-d tensor under trainkit.jit)."""
        return Pending(self.names, [(k, c * factor, i, a, b) for k, c, i, a, b in self.terms], self.post)


class Deferred:
    """A stage's direction not computed yet (Adam's moments and step), consumed exactly once.

    ``quotient()`` updates the state and returns ``(num, den, c)``: the direction is
    ``c * num / den`` (the foreach path: pure updates, jit). ``fused_(calls, lr)``
    instead applies ``p -= lr * direction`` in place, one fused kernel per
    ``(params, js, weight_decay)`` of ``calls`` (``params`` the entries ``js`` of the
    direction, decayed by ``1 - lr * weight_decay`` first, as ``torch.optim.AdamW``),
    updating the state too; it returns ``False`` (having done nothing) where it cannot.
    """

    def quotient(self) -> tuple[list[Tensor], list[Tensor], float]:
        raise NotImplementedError

    def fused_(self, calls: list[tuple[list[Tensor], list[int], float]], lr: float) -> bool:
        return False


def _resolve(terms: list[tuple]) -> list[tuple]:
    """Deferred terms as ``div`` terms (their quotient): what materialising needs."""
    out = []
    for kind, coef, idx, a, b in terms:
        if kind == "deferred":
            num, den, c = a.quotient()
            out.append(("div", coef * c, idx, num, den))
        else:
            out.append((kind, coef, idx, a, b))
    return out


def _pick(xs: list[Tensor], idx: list[int] | None) -> list[Tensor]:
    return xs if idx is None else [xs[i] for i in idx]


def _values(kind: str, coef: Any, a: list[Tensor], b: list[Tensor] | None) -> list[Tensor]:
    """A term's values as new tensors (``a`` itself for ``1.0 * a``: a pass-through costs nothing)."""
    if kind == "div":
        out = torch._foreach_div(a, b)
        torch._foreach_mul_(out, coef)
        return out
    return list(a) if isinstance(coef, float) and coef == 1.0 else torch._foreach_mul(a, coef)


def _accumulate(target: list[Tensor], kind: str, coef: Any, a: list[Tensor], b: list[Tensor] | None, *, inplace: bool) -> list[Tensor]:
    """``target + term``, in place when ``target`` is ours to write (under jit ``coef`` is a tensor: no alpha=)."""
    if not isinstance(coef, float):
        term = _values(kind, coef, a, b)
        if not inplace:
            return torch._foreach_add(target, term)
        torch._foreach_add_(target, term)
        return target
    if kind == "div":
        if inplace:
            torch._foreach_addcdiv_(target, a, b, value=coef)
            return target
        return torch._foreach_addcdiv(target, a, b, value=coef)
    if inplace:
        torch._foreach_add_(target, a, alpha=coef)
        return target
    return torch._foreach_add(target, a, alpha=coef)


def materialize(updates: Any, params: Params) -> Params:
    """The updates as a dict of tensors: new tensors where terms combine (inputs are never written)."""
    if not isinstance(updates, Pending):
        return updates
    p = list(params.values())
    out: list[Tensor | None] = [None] * len(p)
    owned = [False] * len(p)
    for kind, coef, idx, a, b in _resolve(updates.terms):
        pos = list(range(len(p))) if idx is None else idx
        a = _pick(p, idx) if kind == "self" else a
        if all(out[i] is None for i in pos):
            vals, mine = _values(kind, coef, a, b), not (kind != "div" and isinstance(coef, float) and coef == 1.0)
        else:
            for i in pos:
                if out[i] is None:
                    out[i], owned[i] = torch.zeros_like(p[i]), True
            inplace = all(owned[i] for i in pos)
            vals, mine = _accumulate([out[i] for i in pos], kind, coef, a, b, inplace=inplace), True
        for i, v in zip(pos, vals, strict=True):
            out[i], owned[i] = v, mine
    return dict(zip(params, [torch.zeros_like(pi) if o is None else o for o, pi in zip(out, p, strict=True)], strict=True))


def apply_(updates: Any, params: Params) -> None:
    """``params += updates`` in place; a Pending is fused into foreach kernels, then its ``post`` run."""
    if isinstance(updates, Pending):
        fusable = not torch.compiler.is_compiling() and all(isinstance(c, float) for _, c, _, _, _ in updates.terms)
        if fusable:
            p = list(params.values())
            _apply_terms_(_resolve(_fuse_deferred_(updates.terms, p)), p)
        else:  # under jit the coefficients are 0-d tensors (no alpha=); inductor fuses the ops anyway
            _add_(params, materialize(updates, params))
        for fn in updates.post:
            fn(params)
        return
    _add_(params, updates)


def _add_(params: Params, updates: Params) -> None:
    torch._foreach_add_(list(params.values()), [updates[n] for n in params])


def _fuse_deferred_(terms: list[tuple], p: list[Tensor]) -> list[tuple]:
    """Apply each deferred term with its fused kernel, folding in the weight decay (``self`` terms) at its positions.

    Returns the terms left to apply. A deferred term shares its positions only with
    ``self`` terms (masked params get other terms at other positions); anything else
    there, and it is left to be applied as a quotient.
    """
    if not any(t[0] == "deferred" for t in terms):
        return terms
    rest = [t for t in terms if t[0] != "deferred"]
    left: list[tuple] = []
    for term in terms:
        if term[0] != "deferred":
            continue
        _, coef, idx, obj, _ = term
        pos = list(range(len(p))) if idx is None else list(idx)
        decay = _decay_at(pos, rest, len(p))
        lr = -coef
        if decay is None or (lr == 0.0 and any(decay)) or not _fuse_groups(obj, p, pos, decay, lr):
            left.append(term)
            continue
        done = set(pos)  # their weight decay is applied by the kernel
        rest = [_without(t, done, len(p)) if t[0] == "self" else t for t in rest]
        rest = [t for t in rest if t is not None]
    return left + rest


def _decay_at(pos: list[int], others: list[tuple], n: int) -> list[float] | None:
    """The summed ``self`` coefficient at each of ``pos`` (``None``: another kind of term is there too)."""
    where = {i: j for j, i in enumerate(pos)}
    decay = [0.0] * len(pos)
    for kind, coef, idx, _, _ in others:
        hits = [where[i] for i in (range(n) if idx is None else idx) if i in where]
        if hits and kind != "self":
            return None
        for j in hits:
            decay[j] += coef
    return decay


def _fuse_groups(obj: Deferred, p: list[Tensor], pos: list[int], decay: list[float], lr: float) -> bool:
    groups: dict[float, list[int]] = {}
    for j, d in enumerate(decay):
        groups.setdefault(d, []).append(j)
    # the kernel decays p by (1 - lr * weight_decay): the summed self coefficient is -lr * weight_decay
    calls = [([p[pos[j]] for j in js], js, (-d / lr) if lr else 0.0) for d, js in groups.items()]
    return obj.fused_(calls, lr)


def _without(term: tuple, done: set[int], n: int) -> tuple | None:
    kind, coef, idx, a, b = term
    keep = [i for i in (range(n) if idx is None else idx) if i not in done]
    return (kind, coef, keep, a, b) if keep else None


def _apply_terms_(terms: list[tuple], p: list[Tensor]) -> None:
    # "self" terms first: p * (1 + c) then the rest is torch.optim.AdamW's order (decay, then step).
    for kind, coef, idx, _, _ in terms:
        if kind == "self":
            torch._foreach_mul_(_pick(p, idx), 1.0 + coef)
    for kind, coef, idx, a, b in terms:
        if kind == "add":
            torch._foreach_add_(_pick(p, idx), a, alpha=coef)
        elif kind == "div":
            torch._foreach_addcdiv_(_pick(p, idx), a, b, value=coef)


def as_dict(updates: Any, params: Params) -> Params:
    """What a stage that needs plain tensors receives (see :func:`materialize`)."""
    return materialize(updates, params) if isinstance(updates, Pending) else updates


def remap(pending: Any, sub_names: list[str], all_names: list[str]) -> Pending:
    """A Pending over ``sub_names`` re-expressed over ``all_names`` (for masked and partition)."""
    pending = Pending.of(pending)
    where = {n: i for i, n in enumerate(all_names)}
    pos = [where[n] for n in sub_names]
    terms = [(k, c, pos if i is None else [pos[j] for j in i], a, b) for k, c, i, a, b in pending.terms]
    return Pending(all_names, terms, pending.post)


# --------------------------------------------------------------------------- running stages


def donated_fn(tx: GradientTransformation) -> Callable[[Any, Any, Params], tuple[Any, Any]]:
    """The in-place variant of ``tx``, or its pure ``update`` on plain dicts for a stage of your own."""
    donated = getattr(tx, "donated", None)
    if donated is not None:
        return donated

    def run(updates: Any, state: Any, params: Params) -> tuple[Any, Any]:
        return tx.update(as_dict(updates, params), state, params)

    return run


def pure(donated: Callable[[Any, Any, Params], tuple[Any, Any]]) -> Callable[[Params, Any, Params], tuple[Params, Any]]:
    """The pure ``update`` of a built-in stage: its donated variant on a copy of the state."""

    def update(updates: Params, state: Any, params: Params) -> tuple[Params, Any]:
        updates = {n: updates[n] for n in params} if list(updates) != list(params) else updates
        out, new_state = donated(updates, clone_state(state), params)
        result = materialize(out, params)
        if isinstance(out, Pending) and out.post:
            new_params = {n: params[n] + result[n] for n in params}
            for fn in out.post:
                fn(new_params)
        return result, new_state

    return update


def stage(donated: Callable[[Any, Any, Params], tuple[Any, Any]], init: Callable[[Params], Any]) -> GradientTransformation:
    """A built-in stage from its ``init`` and in-place ``donated`` functions."""
    tx = _Stage(init, pure(donated))
    tx.donated = donated
    return tx


def clone_state(opt_state: Any) -> Any:
    """A deep copy of an optimizer state: new tensors, same values.

    >>> import torch
    >>> s = {"mu": {"w": torch.zeros(2)}, "count": 3}
    >>> c = clone_state(s)
    >>> c["mu"]["w"] is s["mu"]["w"], c == {"mu": c["mu"], "count": 3}
    (False, True)
    """
    if isinstance(opt_state, Tensor):
        return opt_state.clone()
    if isinstance(opt_state, dict):
        return {k: clone_state(v) for k, v in opt_state.items()}
    if isinstance(opt_state, (list, tuple)):
        return type(opt_state)(clone_state(v) for v in opt_state)
    return opt_state


# --------------------------------------------------------------------------- walking a state


def map_stages(opt_state: Any, kind: str, fn: Callable[[dict], dict], *, into_matches: bool = True) -> Any:
    """``opt_state`` with ``fn`` applied to every stage state of ``kind``; the same object where nothing changed."""
    return map_stage_kinds(opt_state, {kind: fn}, into_matches=into_matches)


def map_stage_kinds(opt_state: Any, fns: dict[str, Callable[[dict], dict]], *, into_matches: bool = True) -> Any:
    """:func:`map_stages` for several kinds in one walk (``fns``: kind -> fn); the same object where nothing changed.

    It runs on every call of a jitted step (the LR in and out of the graph), so it walks only
    containers: a param-name dict of tensors (Adam's ``mu``) costs a loop, not a call per tensor.
    """
    if isinstance(opt_state, dict):
        kind = opt_state.get(STAGE)
        fn = fns.get(kind) if isinstance(kind, str) else None
        if fn is not None:
            opt_state = fn(opt_state)
            if not into_matches:
                return opt_state
        new: dict | None = None
        for k, v in opt_state.items():
            if isinstance(v, (dict, tuple, list)):
                w = map_stage_kinds(v, fns, into_matches=into_matches)
                if w is not v:
                    if new is None:
                        new = dict(opt_state)
                    new[k] = w
        return opt_state if new is None else new
    if isinstance(opt_state, (tuple, list)):
        items = [map_stage_kinds(v, fns, into_matches=into_matches) if isinstance(v, (dict, tuple, list)) else v for v in opt_state]
        return opt_state if all(a is b for a, b in zip(items, opt_state, strict=True)) else type(opt_state)(items)
    return opt_state


def find_stages(opt_state: Any, kind: str, *, into_matches: bool = True) -> list[dict]:
    """Every stage state of ``kind`` in ``opt_state``, in order (outermost first)."""
    return list(_walk_stages(opt_state, kind, into_matches))


def stage_kinds(opt_state: Any) -> list[str]:
    """The names of the built-in stages in ``opt_state`` (for error messages)."""
    return [s[STAGE] for s in _walk_stages(opt_state, None, True)]


def _walk_stages(s: Any, kind: str | None, into_matches: bool) -> Iterator[dict]:
    """The stage states in ``s`` (of ``kind``; ``None``: all), outermost first; into a match only if ``into_matches``."""
    if isinstance(s, dict):
        name = s.get(STAGE)
        if isinstance(name, str) and (kind is None or name == kind):
            yield s
            if not into_matches:
                return
        values: Any = s.values()
    elif isinstance(s, (tuple, list)):
        values = s
    else:
        return
    for v in values:
        if isinstance(v, (dict, tuple, list)):
            yield from _walk_stages(v, kind, into_matches)


# --------------------------------------------------------------------------- checking hyperparameters


def check_number(
    who: str,
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    example: Any,
) -> float:
    """``value`` as a float if it is a real number in the interval, else an error that names ``name`` and a valid value.

    Types are checked before values are compared, so ``None``, bools and strings get
    this message too (not ``TypeError: '<=' not supported``).

    >>> check_number("sgd", "momentum", 0.9, low=0.0, high=1.0, high_open=True, example=0.9)
    0.9
    >>> check_number("sgd", "momentum", None, low=0.0, high=1.0, high_open=True, example=0.9)
    Traceback (most recent call last):
    ...
    ValueError: sgd: momentum must be a number in [0.0, 1.0), got None. Pass e.g. momentum=0.9.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{who}: {name} must be a number in {interval}, got {value!r}. Pass e.g. {name}={example!r}.")
    return float(value)


def check_int(who: str, name: str, value: Any, *, low: int, example: int) -> int:
    """``value`` if it is an int (not a bool) ``>= low``, else an error that names ``name`` and a valid value.

    >>> check_int("MultiSteps", "every_k", 0, low=1, example=4)
    Traceback (most recent call last):
    ...
    ValueError: MultiSteps: every_k must be an int >= 1, got 0. Pass e.g. every_k=4.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{who}: {name} must be an int >= {low}, got {value!r}. Pass e.g. {name}={example!r}.")
    return value

"""Named random streams: every seed trainkit uses is a function of the state's ``rng`` and a name.

A counter-based design, as JAX's ``fold_in``: the randomness of step ``k`` is a function
of ``(rng, k)`` only, so step ``k`` is reproducible alone (after a resume, in a test),
and the streams never collide: dropout draws from ``derive_seed(rng, step)``, the
shuffle of epoch ``e`` from ``derive_seed(rng, "shuffle", e)``, data_parallel's replica
``i`` from ``derive_seed(rng, "replica", i)``.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Mapping

import torch
from torch import Tensor

from . import dist

__all__ = ["derive_seed", "seeded", "generator"]


def derive_seed(seed: int, *path: int | str) -> int:
    """A 63-bit seed that is a function of ``seed`` and the names or numbers in ``path`` only.

    >>> derive_seed(0, 3) == derive_seed(0, 3), derive_seed(0, 3) == derive_seed(0, "shuffle", 3)
    (True, False)
    """
    key = ":".join(str(p) for p in (seed, *path))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(state: Any, stream: str) -> torch.Generator:
    """A ``torch.Generator`` on the state's device for the named ``stream`` of this step and rank.

    For randomness a step draws itself (a GAN's noise, a VAE's reparameterisation,
    augmentation): a function of ``(state.rng, stream, state.step, rank)`` only, so a
    step is reproducible alone, resumes exactly, and ranks draw different numbers.
    Under ``tk.jit`` draw with plain ``torch.randn`` instead (jit seeds the graph's
    random numbers from ``(rng, step)``; a Generator object cannot enter a graph).

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1), seed=3)
    >>> a = torch.randn(2, generator=tk.rng.generator(state, "noise"))
    >>> b = torch.randn(2, generator=tk.rng.generator(state, "noise"))
    >>> c = torch.randn(2, generator=tk.rng.generator(state.replace(step=1), "noise"))
    >>> torch.equal(a, b), torch.equal(a, c)
    (True, False)
    """
    if not isinstance(stream, str) or not stream:
        raise TypeError(f"generator: stream must be a non-empty name, got {stream!r}. Use e.g. tk.rng.generator(state, 'noise').")
    gen = torch.Generator(device=state.device)
    gen.manual_seed(derive_seed(state.rng, stream, state.step, dist.rank()))
    return gen


_SEED_LOCK = threading.RLock()


class seeded:
    """Seed the default generator(s) of the params' device for the block, then restore them.

    The caller's random stream is left as it was, so a step never changes the global RNG.

    >>> import torch
    >>> before = torch.random.get_rng_state()
    >>> with seeded({}, 7):
    ...     a = torch.rand(1)
    >>> with seeded({}, 7):
    ...     b = torch.rand(1)
    >>> torch.equal(a, b), torch.equal(before, torch.random.get_rng_state())
    (True, True)
    """

    __slots__ = ("seed", "cuda", "saved", "saved_cuda")

    def __init__(self, params: Mapping[str, Tensor], seed: int) -> None:
        self.seed = seed
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        self.cuda = dev if dev.type == "cuda" else None

    def __enter__(self) -> None:
        # The generators are process-wide: data_parallel's replica threads take turns here.
        _SEED_LOCK.acquire()
        try:
            self.saved = torch.default_generator.get_state()
            torch.default_generator.manual_seed(self.seed)
            if self.cuda is not None:
                gen = torch.cuda.default_generators[self.cuda.index or torch.cuda.current_device()]
                self.saved_cuda = (gen, gen.get_state())
                gen.manual_seed(self.seed)
        except BaseException:
            _SEED_LOCK.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            torch.default_generator.set_state(self.saved)
            if self.cuda is not None:
                gen, saved = self.saved_cuda
                gen.set_state(saved)
        finally:
            _SEED_LOCK.release()

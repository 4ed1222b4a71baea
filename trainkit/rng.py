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

__all__ = ["derive_seed", "seeded"]


def derive_seed(seed: int, *path: int | str) -> int:
    """A 63-bit seed that is a function of ``seed`` and the names or numbers in ``path`` only.

    >>> derive_seed(0, 3) == derive_seed(0, 3), derive_seed(0, 3) == derive_seed(0, "shuffle", 3)
    (True, False)
    """
    key = ":".join(str(p) for p in (seed, *path))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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

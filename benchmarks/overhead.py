"""trainkit.fit against a hand-written PyTorch loop: the runner's overhead, eager mode, CPU.

Same model and initial weights, same batches (in memory, so data loading is not timed),
same optimizer (Adam; the hand loop both with torch's CPU default, one tensor at a time, and with
foreach=True). Whole runs alternate A, B, A, B, ... in this one process, because
separate processes on a shared 2-core machine vary up to 2x (measured); the median of each
contender's runs is compared. Prints steps/s, the ratio trainkit/hand (higher is better)
and the final losses, which must agree within 1e-5.

    python benchmarks/overhead.py [--rounds 15] [--steps 300]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import trainkit as tk


def mlp(*sizes: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def hand_loop(model: nn.Module, batches: list, lr: float, foreach: bool | None = None) -> tuple[float, float]:
    """What a PyTorch user writes: zero_grad, forward, backward, step, and the epoch loss via .item().

    ``foreach=None`` is torch.optim.Adam's default (on CPU: one tensor at a time);
    ``foreach=True`` its multi-tensor kernels, the ones trainkit's donated update runs.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=foreach)
    t0 = time.perf_counter()
    total = 0.0
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total += loss.item()
    return time.perf_counter() - t0, loss.item()


def train_step(state: tk.TrainState, batch: tuple) -> tuple[tk.TrainState, dict]:
    x, y = batch
    loss, grads = tk.value_and_grad(lambda p: F.cross_entropy(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def trainkit_fit_with_loss(model: nn.Module, batches: list, lr: float) -> tuple[float, float]:
    state = tk.TrainState.create(model, tk.optim.adam(lr))
    last = {}

    def step(state: tk.TrainState, batch: tuple) -> tuple[tk.TrainState, dict]:
        state, metrics = train_step(state, batch)
        last["loss"] = metrics["loss"]  # keeps a reference only; read after timing
        return state, metrics

    t0 = time.perf_counter()
    tk.fit(step, state, batches, epochs=1, progress=False)
    return time.perf_counter() - t0, last["loss"].item()


def bench(name: str, sizes: tuple[int, ...], batch: int, steps: int, rounds: int, lr: float = 1e-3) -> dict:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, sizes[0], generator=g), torch.randint(0, sizes[-1], (batch,), generator=g)) for _ in range(steps)]
    torch.manual_seed(0)
    init = mlp(*sizes)
    contenders = {"hand": hand_loop, "hand_foreach": lambda m, b, lr: hand_loop(m, b, lr, foreach=True), "trainkit": trainkit_fit_with_loss}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    losses: dict[str, float] = {}
    for r in range(rounds + 1):  # round 0 warms up both (allocator, lazy imports)
        order = list(contenders.items()) if r % 2 == 0 else list(contenders.items())[::-1]
        for key, fn in order:
            seconds, loss = fn(copy.deepcopy(init), batches, lr)
            if r:
                times[key].append(seconds)
            losses[key] = loss
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["hand"] / med["trainkit"]
    ratio_foreach = med["hand_foreach"] / med["trainkit"]
    diff = max(abs(losses[k] - losses["trainkit"]) for k in ("hand", "hand_foreach"))
    print(
        f"{name:>16}  hand {steps / med['hand']:7.0f} steps/s   hand foreach {steps / med['hand_foreach']:7.0f} steps/s   "
        f"trainkit.fit {steps / med['trainkit']:7.0f} steps/s   ratio {ratio:.3f}x (foreach {ratio_foreach:.3f}x)   "
        f"final loss {losses['hand']:.6f} vs {losses['trainkit']:.6f} (|diff| {diff:.1e})"
    )
    assert diff < 1e-5, f"final losses differ by {diff}: the loops do not do the same work"
    return {
        "name": name,
        "ratio": ratio,
        "ratio_foreach": ratio_foreach,
        "hand_steps_s": steps / med["hand"],
        "hand_foreach_steps_s": steps / med["hand_foreach"],
        "trainkit_steps_s": steps / med["trainkit"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads (both contenders get the same)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds of {args.steps} steps; ratio = trainkit / hand (higher is better)")
    bench("32-64-10 b64", (32, 64, 10), 64, args.steps, args.rounds)
    bench("784-512-512-10 b128", (784, 512, 512, 10), 128, max(30, args.steps // 10), args.rounds)


if __name__ == "__main__":
    main()

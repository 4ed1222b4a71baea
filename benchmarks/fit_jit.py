"""tk.fit over tk.jit, one step and K steps per call, against a hand-written loop and JAX (CPU).

    python benchmarks/fit_jit.py            # 32-64-10 MLP, batch 64, Adam; 10 interleaved rounds of 1-epoch fits
    python benchmarks/fit_jit.py --smoke    # aot_eager, tiny: a check that it runs

What a user of fit gets: each round runs every contender for one epoch of the same 200 in-memory
batches (the same initial weights and batch order for all), in rotating order, in this one process;
a contender's time per step is the median over rounds of its epoch time / 200. fit runs with its
defaults (finite check, no progress bar, no logger); the jitted steps are compiled in a warm-up epoch.

  hand              zero_grad / forward / backward / Adam.step, with loss.item() per epoch
  fit eager         tk.fit(train_step, ...)
  fit jit           tk.fit(tk.jit(train_step), ...)
  fit jit K=8       tk.fit(tk.jit(train_step, steps_per_call=8), ...): fit feeds it 8 batches a call
  jax               a jax.jit step with donated buffers, looped (when JAX is installed)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import LR, WORKLOADS, Hand, Jax, jax_available, make_batches, train_step  # noqa: E402

import trainkit as tk  # noqa: E402


class Fit:
    def __init__(self, model: torch.nn.Module, batches: list, step: Any) -> None:
        self.state, self.batches, self.step = tk.TrainState.create(model, tk.optim.adam(LR)), batches, step

    def run(self, start: int, steps: int) -> None:
        self.state, _ = tk.fit(self.step, self.state, self.batches[:steps], epochs=1, progress=False)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workload", choices=list(WORKLOADS), default="mlp-32-64-10")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    backend = "aot_eager" if args.smoke else "inductor"
    rounds, steps = (2, 16) if args.smoke else (args.rounds, args.steps)
    w = WORKLOADS[args.workload]
    torch.manual_seed(0)
    model = w.make()
    distinct = make_batches(w, 32, 0)
    batches = [distinct[i % 32] for i in range(steps)]
    runners: dict[str, Any] = {
        "hand": Hand(copy.deepcopy(model), batches),
        "fit eager": Fit(copy.deepcopy(model), batches, train_step),
        "fit jit": Fit(copy.deepcopy(model), batches, tk.jit(train_step, backend=backend)),
        "fit jit K=8": Fit(copy.deepcopy(model), batches, tk.jit(train_step, backend=backend, steps_per_call=8)),
    }
    if jax_available(torch.get_num_threads()):
        runners["jax"] = Jax(copy.deepcopy(model), batches)
    for r in runners.values():
        r.run(0, steps)  # warm-up epoch: the jitted steps compile here
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for rnd in range(rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            t0 = time.perf_counter()
            runners[name].run(0, steps)
            times[name].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    hand, jax = med["hand"], med.get("jax")
    print(f"{w.name}: {rounds} interleaved rounds of 1-epoch runs of {steps} steps (torch {torch.__version__})")
    for k, v in med.items():
        vs_jax = f"{jax / v:5.2f}x JAX" if jax else ""
        print(f"  {k:12s} {v * 1e3:7.3f} ms/step {1 / v:9,.0f} steps/s {hand / v:6.2f}x hand  {vs_jax}")
    return med


if __name__ == "__main__":
    main()

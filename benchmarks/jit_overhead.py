"""Where a compiled step's time goes: the per-call cost of tk.jit, piece by piece (CPU).

    python benchmarks/jit_overhead.py            # 32-64-10 MLP, batch 64, Adam; a few seconds after a compile
    python benchmarks/jit_overhead.py --smoke    # aot_eager, a check that it runs

On a small model a compiled step's time is mostly per-call work, not arithmetic. This times,
in one process, interleaved (microseconds per call, median of rounds):

  graph only        inductor's compiled graph called with its flat inputs (what JAX's dispatch calls)
  guards            dynamo's guard check of (step, state, batch), alone
  dynamo call       the torch.compile'd function: guards, AOT runtime wrappers, the output pytree
  tk.jit call       the whole JittedStep call (donated), the LR round trip and the context included
  tk.jit, K=8       the same per step when one call runs 8 steps (steps_per_call=8)
  map_lr in + out   the LR float -> 0-d tensor -> float round trip alone
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import WORKLOADS, make_batches, train_step  # noqa: E402

import trainkit as tk  # noqa: E402
from trainkit.transforms import jit as jit_mod  # noqa: E402


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--cpp-wrapper", action="store_true", help="also time tk.jit(step, options={'cpp_wrapper': True})")
    p.add_argument("--schedule", action="store_true", help="Adam under a cosine schedule (default: a constant LR)")
    args = p.parse_args(argv)
    backend = "aot_eager" if args.smoke else "inductor"
    rounds, calls = (2, 20) if args.smoke else (args.rounds, args.calls)
    w = WORKLOADS["mlp-32-64-10"]
    torch.manual_seed(0)
    model = w.make()
    batches = make_batches(w, 8, 0)

    # inductor's compiled graph and its inputs, as the AOT wrappers call it (the first call of the one-step graph)
    captured: dict[str, Any] = {}
    from torch._inductor.output_code import CompiledFxGraph

    graph_call = CompiledFxGraph.__call__

    def capturing(self: Any, inputs: Any) -> Any:
        captured.setdefault("graph", (self, list(inputs)))
        return graph_call(self, inputs)

    CompiledFxGraph.__call__ = capturing  # type: ignore[method-assign]
    try:
        one = tk.jit(train_step, backend=backend)
        eight = tk.jit(train_step, backend=backend, steps_per_call=8)
        lr = tk.optim.cosine_decay_schedule(1e-3, 10**6) if args.schedule else 1e-3
        s1 = tk.TrainState.create(copy.deepcopy(model), tk.optim.adam(lr))
        s8 = tk.TrainState.create(copy.deepcopy(model), tk.optim.adam(lr))
        with tk.donating():
            s1, _ = one(s1, batches[0])
            for _ in range(2):
                s8, _ = eight(s8, batches)
    finally:
        CompiledFxGraph.__call__ = graph_call  # type: ignore[method-assign]
    graph, flat = captured.get("graph", (None, []))
    # a state as the dynamo call sees it (the LR a tensor), fed back to itself
    raw = s1.replace(opt_state=tk.optim.map_lr(s1.opt_state, jit_mod._lr_tensor))
    entry = torch._dynamo.eval_frame._debug_get_cache_entry_list(one._code)[0]
    ctx = tk.StepContext(donate=True)
    state_box = {"one": s1, "eight": s8, "raw": raw}

    def call_jit() -> None:
        state_box["one"] = one(state_box["one"], batches[0])[0]

    def call_eight() -> None:
        state_box["eight"] = eight(state_box["eight"], batches)[0]

    def call_dynamo() -> None:
        with tk.use_context(ctx):
            state_box["raw"] = one._compiled(one.step, state_box["raw"], batches[0])[0]

    def call_guards() -> None:
        entry.guard_manager.check({"step": one.step, "state": state_box["raw"], "batch": batches[0]})

    def call_graph() -> None:
        with torch.no_grad():  # as the AOT runtime wrapper calls it: the step's autograd is inside the graph
            graph.current_callable(list(flat))

    def lr_round_trip() -> None:
        st = tk.optim.map_lr(s1.opt_state, jit_mod._lr_tensor)
        tk.optim.map_lr(st, jit_mod._lr_float)

    try:
        call_graph()
        has_graph = True
    except Exception as e:  # noqa: BLE001 - the wrappers' calling convention differs between backends
        print(f"graph only: not measured ({type(e).__name__}: {e})")
        has_graph = False
    extra: dict[str, Callable[[], None]] = {}
    if args.cpp_wrapper and not args.smoke:
        cpp = tk.jit(train_step, options={"cpp_wrapper": True})
        t0 = time.perf_counter()
        with tk.donating():
            state_box["cpp"] = cpp(tk.TrainState.create(copy.deepcopy(model), tk.optim.adam(1e-3)), batches[0])[0]
        print(f"cpp_wrapper compile: {time.perf_counter() - t0:.1f} s")

        def call_cpp() -> None:
            state_box["cpp"] = cpp(state_box["cpp"], batches[0])[0]

        extra["tk.jit call, cpp_wrapper"] = call_cpp
    pieces = {
        **({"graph only": call_graph} if has_graph else {}),
        "guards": call_guards,
        "dynamo call": call_dynamo,
        "tk.jit call": call_jit,
        "tk.jit, K=8 (per step)": call_eight,
        "map_lr in + out": lr_round_trip,
        **extra,
    }
    times: dict[str, list[float]] = {k: [] for k in pieces}
    with tk.donating():
        for r in range(rounds):
            names = list(pieces)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                n = calls // 8 if "K=8" in name else calls
                us = per_call_us(pieces[name], n)
                times[name].append(us / 8 if "K=8" in name else us)
    med = {k: statistics.median(v) for k, v in times.items()}
    what = "cosine schedule" if args.schedule else "constant LR"
    print(f"tk.jit per-call cost, {w.name}, Adam ({what}), torch {torch.__version__}, {backend}, {rounds} rounds (median us/call)")
    for k, v in med.items():
        print(f"  {k:24s} {v:8.1f} us")
    if has_graph:
        print(f"  => dynamo + AOT wrappers around the graph: {med['dynamo call'] - med['graph only']:.1f} us")
    print(f"  => trainkit's wrapper around the dynamo call: {med['tk.jit call'] - med['dynamo call']:.1f} us")
    return med


if __name__ == "__main__":
    main()

"""K steps in one compiled call: unrolled (what tk.jit(steps_per_call=K) does) against torch's loop
higher-order op (torch._higher_order_ops.scan), cold compile seconds and steps/s (CPU).

    python benchmarks/multistep.py              # K=8, 32-64-10 MLP, batch 64, Adam: each compile cold, in its own process
    python benchmarks/multistep.py --smoke      # aot_eager, K=2: a check that it runs

Each measurement runs in a fresh process with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), so its
compile is cold, as a user's first run. Contenders:

  tk.jit K=1           tk.jit(train_step): one step per call (the one-step graph)
  tk.jit K=<k>         tk.jit(train_step, steps_per_call=k): k steps unrolled into one graph (on CPU
                       with inductor's C++ wrapper, jit's default for a K-step graph)
  tk.jit python wrapper K=<k>  the same with options={"cpp_wrapper": False}: inductor's Python wrapper
  functional unrolled  a hand-written functional step (torch.func.grad_and_value + Adam on tensors) looped k
                       times in one torch.compile'd function: the unrolled graph without trainkit
  functional scan      the same step as the body of torch._higher_order_ops.scan over k stacked batches

A trainkit step cannot be a scan body (the measured reasons are printed by --why-not-scan): scan traces
its body functionally, so the torch.autograd.grad of tk.value_and_grad ("element 0 of tensors does not
require grad"), the in-place donated update and the state's Python ints (step, count, a schedule's
float(schedule(count))) cannot be in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _functional_step() -> tuple[Any, Any]:
    import torch
    import torch.nn.functional as F

    def loss_fn(params: list, x: Any, y: Any) -> Any:
        for i in range(0, len(params), 2):
            x = x @ params[i].t() + params[i + 1]
            if i < len(params) - 2:
                x = torch.relu(x)
        return F.cross_entropy(x, y)

    def step(carry: tuple, x: Any, y: Any, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> tuple:
        params, mu, nu, t = carry
        grads, loss = torch.func.grad_and_value(loss_fn)(list(params), x, y)
        t = t + 1
        mu = [b1 * m + (1 - b1) * g for m, g in zip(mu, grads, strict=True)]
        nu = [b2 * v + (1 - b2) * g * g for v, g in zip(nu, grads, strict=True)]
        c1, c2 = 1 - b1**t, 1 - b2**t
        params = [p - lr * (m / c1) / ((v / c2).sqrt() + eps) for p, m, v in zip(params, mu, nu, strict=True)]
        return (params, mu, nu, t), loss

    return step, loss_fn


def measure(kind: str, k: int, backend: str, steps: int) -> dict[str, Any]:
    """One contender, in this process: compile seconds (the first call) and steps/s after it (``steps`` steps)."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    from suite import WORKLOADS, make_batches, train_step

    import trainkit as tk

    w = WORKLOADS["mlp-32-64-10"]
    torch.manual_seed(0)
    model = w.make()
    batches = make_batches(w, 32, 0)
    calls = max(1, steps // k)
    if kind.startswith("tk.jit"):
        options = {"cpp_wrapper": False} if "python wrapper" in kind and backend == "inductor" else None
        jitted = tk.jit(train_step, backend=backend, steps_per_call=k, options=options)
        state = tk.TrainState.create(model, tk.optim.adam(1e-3))
        groups = [batches[i : i + k] for i in range(0, 32, k)] if k > 1 else batches
        with tk.donating():
            if k > 1:  # the first group runs as single calls (it learns whether the step draws random numbers)
                state, _ = jitted(state, groups[0])
            t0 = time.perf_counter()
            state, _ = jitted(state, groups[1 % len(groups)])
            compile_s = time.perf_counter() - t0
            for i in range(2):  # warm: the first calls after a compile are slower
                state, _ = jitted(state, groups[i % len(groups)])
            t0 = time.perf_counter()
            for i in range(calls):
                state, _ = jitted(state, groups[i % len(groups)])
            dt = time.perf_counter() - t0
        return {"compile_s": compile_s, "steps_per_s": calls * k / dt, "graphs": jitted.compiles}
    step, _ = _functional_step()
    params = [p.detach().clone() for p in model.parameters()]
    carry = (params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], torch.tensor(0.0))
    xs = [torch.stack([b[0] for b in batches[i : i + k]]) for i in range(0, 32, k)]
    ys = [torch.stack([b[1] for b in batches[i : i + k]]) for i in range(0, 32, k)]
    if kind == "functional scan":
        from torch._higher_order_ops.scan import scan

        def many(carry: tuple, X: Any, Y: Any) -> tuple:
            return scan(lambda c, xy: step(c, xy[0], xy[1]), carry, (X, Y))
    else:

        def many(carry: tuple, X: Any, Y: Any) -> tuple:
            losses = []
            for i in range(k):
                carry, loss = step(carry, X[i], Y[i])
                losses.append(loss)
            return carry, torch.stack(losses)

    compiled = torch.compile(many, backend=backend, fullgraph=True)
    t0 = time.perf_counter()
    carry, _ = compiled(carry, xs[0], ys[0])
    compile_s = time.perf_counter() - t0
    for i in range(2):
        carry, _ = compiled(carry, xs[i % len(xs)], ys[i % len(ys)])
    t0 = time.perf_counter()
    for i in range(calls):
        carry, _ = compiled(carry, xs[i % len(xs)], ys[i % len(ys)])
    dt = time.perf_counter() - t0
    return {"compile_s": compile_s, "steps_per_s": calls * k / dt}


def why_not_scan() -> str:
    """The error of a trainkit step as a scan body (aot_eager: it fails while tracing)."""
    import torch
    from torch._higher_order_ops.scan import scan

    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    from suite import WORKLOADS, make_batches

    import trainkit as tk

    w = WORKLOADS["mlp-32-64-10"]
    model = w.make()
    x, y = make_batches(w, 1, 0)[0]
    params = dict(model.named_parameters())

    def body(p: dict, xy: tuple) -> tuple:
        import torch.nn.functional as F

        loss, g = tk.value_and_grad(lambda q: F.cross_entropy(torch.func.functional_call(model, q, (xy[0],)), xy[1]))(p)
        return {k: v - 1e-3 * g[k] for k, v in p.items()}, loss

    torch._dynamo.config.trace_autograd_ops = True
    try:
        torch.compile(lambda p, X, Y: scan(body, p, (X, Y)), backend="aot_eager", fullgraph=True)(
            {k: v.detach() for k, v in params.items()}, x[None].repeat(2, 1, 1), y[None].repeat(2, 1)
        )
    except Exception as e:  # noqa: BLE001 - the point is the message
        lines = str(e).splitlines()
        return f"{type(e).__name__}: " + next((ln.strip() for ln in lines if "got RuntimeError" in ln), str(e)[:300])
    return "no error (scan took the step)"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=3200, help="timed steps after the compile (steps // K calls)")
    p.add_argument("--smoke", action="store_true", help="aot_eager, K=2, a few calls: a check, not a measurement")
    p.add_argument("--only", nargs="+", default=None, help="contenders to run (default: all)")
    p.add_argument("--one", nargs=2, metavar=("KIND", "K"), help=argparse.SUPPRESS)  # a child process
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--why-not-scan", action="store_true", help="print the error of a trainkit step inside scan")
    args = p.parse_args(argv)
    if args.why_not_scan:
        print(why_not_scan())
        return []
    if args.one:
        print("RESULT " + json.dumps(measure(args.one[0], int(args.one[1]), args.backend, args.steps)), flush=True)
        return []
    k, backend, steps = (2, "aot_eager", 8) if args.smoke else (args.k, "inductor", args.steps)
    plan = [("tk.jit K=1", 1), (f"tk.jit K={k}", k), (f"tk.jit python wrapper K={k}", k)]
    plan += [("functional unrolled", k), ("functional scan", k)]
    if args.only:
        plan = [(n, kk) for n, kk in plan if any(o in n for o in args.only)]
    rows = []
    for name, kk in plan:
        with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            cmd = [sys.executable, __file__, "--one", name.split(" K=")[0], str(kk), "--backend", backend, "--steps", str(steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row: dict[str, Any] = {"contender": name, "k": kk}
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row["error"] = tail[:300]
        else:
            row.update(json.loads(line[7:]))
        rows.append(row)
        if "error" in row:
            got = f"failed: {row['error']}"
        else:
            got = f"cold compile {row['compile_s']:6.1f} s, {row['steps_per_s']:8,.0f} steps/s"
        print(f"{name:28s} {got}", flush=True)
    return rows


if __name__ == "__main__":
    main()

"""AOTInductor against torch.compile for one small train step: what a call costs without dynamo (CPU).

    python benchmarks/aoti.py            # 32-64-10 MLP, batch 64, an SGD step returning new params
    python benchmarks/aoti.py --smoke    # fewer calls: a check that it runs

``torch.export`` cannot trace a step that calls ``torch.autograd.grad`` (as ``tk.value_and_grad``
does): it fails with "We found a fake tensor in the exported program constant's list". Traced first
by ``make_fx`` (which records the backward as aten ops), the step exports, and
``torch._inductor.aoti_compile_and_package`` compiles it to a shared library called from C++, with
no guards and no Python runtime wrappers. This times that library against the same step under
``torch.compile`` (fullgraph), interleaved, median of rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import WORKLOADS, make_batches  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    rounds, calls = (2, 5) if args.smoke else (args.rounds, args.calls)
    w = WORKLOADS["mlp-32-64-10"]
    torch.manual_seed(0)
    model = w.make()
    names = [n for n, _ in model.named_parameters()]
    x, y = make_batches(w, 1, 0)[0]

    def step(x: torch.Tensor, y: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = {k: v.detach().requires_grad_() for k, v in zip(names, params, strict=True)}
        with torch.enable_grad():
            loss = F.cross_entropy(torch.func.functional_call(model, q, (x,)), y)
            grads = torch.autograd.grad(loss, list(q.values()))
        return (loss.detach(), *[v - 1e-3 * g for v, g in zip(params, grads, strict=True)])

    inputs = (x, y, *[t.detach().clone() for t in model.parameters()])

    class Traced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = make_fx(step)(*inputs)

        def forward(self, *a: Any) -> Any:
            return self.gm(*a)

    class Direct(torch.nn.Module):
        def forward(self, *a: Any) -> Any:
            return step(*a)

    try:
        torch.export.export(Direct(), inputs)
        direct = "exports"
    except Exception as e:  # noqa: BLE001 - the message is the finding
        direct = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    print(f"torch.export of the autograd.grad step directly: {direct}")
    t0 = time.perf_counter()
    exported = torch.export.export(Traced(), inputs, strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        runner = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(exported, package_path=f"{tmp}/step.pt2"))
    aoti_s = time.perf_counter() - t0
    torch._dynamo.config.trace_autograd_ops = True
    compiled = torch.compile(step, fullgraph=True)
    t0 = time.perf_counter()
    compiled(*inputs)
    compile_s = time.perf_counter() - t0
    fns = {"AOTInductor": lambda: runner(*inputs), "torch.compile": lambda: compiled(*inputs)}
    for f in fns.values():
        for _ in range(20):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in list(fns.items())[:: 1 if r % 2 else -1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times[k].append((time.perf_counter() - t0) / calls * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"compile: AOTInductor (make_fx + export + aoti_compile_and_package) {aoti_s:.1f} s, torch.compile {compile_s:.1f} s")
    for k, v in med.items():
        print(f"  {k:14s} {v:8.1f} us per call (median of {rounds} interleaved rounds)")
    return med


if __name__ == "__main__":
    main()

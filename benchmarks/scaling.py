"""tk.distributed on the CPU: steps/s of 1 and 2 ranks (gloo, loopback) and the communication cost per step.

    python benchmarks/scaling.py [--steps 60] [--rounds 5] [--batch 64] [--sharding-only]

One rank is this process: the bare step, then the same step under ``tk.distributed``
on a group of one (what the hooks and buckets cost without any peer). Two ranks are
started with torchrun (``python -m torch.distributed.run --standalone --nproc-per-node 2``);
each trains on its own batch of ``--batch`` rows (weak scaling: the global batch is
twice as large), and measures, interleaved in rounds so that they share the machine's
state:

* ``overlap``: buckets all-reduced during backward (the default);
* ``no-overlap``: all buckets all-reduced after backward;
* ``bare``: the bare step on each rank at the same time, no communication (what two
  processes sharing the machine cost each other);
* ``ddp``: the reference, torch's ``DistributedDataParallel`` with ``torch.optim.Adam`` in a
  hand-written loop (DDP's metrics are not averaged across ranks; trainkit's are);
* ``comm only``: the all-reduce of one gradient-sized buffer, alone: the communication
  cost of a step, with no compute to hide it behind.

Every process uses one thread (``torch.set_num_threads(1)``), so 2 ranks use the two
cores of these machines and 1 rank uses one. Numbers are medians over rounds.

Then **sharded params** (``params="fsdp"``) against replicated, on 1, 2 and 4 ranks
(torchrun, each rank its own batch of ``--batch`` rows): ms per step and the bytes of
params + optimizer state each rank holds (the largest rank's), for ``tk.distributed``
replicated, ``params="fsdp"`` with and without prefetched gathers (``overlap``), and
torch's own FSDP2 (``fully_shard`` on each Linear and the root, ``torch.optim.Adam``) as
the reference. CPU only: no GPU in this measurement; 4 ranks on 2 cores share them, so
their times measure contention as much as scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import trainkit as tk


def make_state() -> tk.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return tk.TrainState.create(model, tk.optim.adam(1e-3))


def train_step(state: tk.TrainState, batch: tuple) -> tuple[tk.TrainState, dict]:
    x, y = batch
    loss, grads = tk.value_and_grad(lambda p: F.cross_entropy(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def batches(n: int, size: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 784, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def time_steps(step, data: list) -> float:
    """Seconds per step over ``data``, the state donated as fit does."""
    state = make_state()
    with tk.donating():
        state, m = step(state, data[0])  # warm-up
        t0 = time.perf_counter()
        for b in data:
            state, m = step(state, b)
        float(m["loss"])
    return (time.perf_counter() - t0) / len(data)


def time_ddp(data: list) -> float:
    """The reference: torch's DistributedDataParallel and torch.optim.Adam, a hand-written loop."""
    model = torch.nn.parallel.DistributedDataParallel(tk.to_module(make_state()).train())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one(b: tuple) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(b[0]), b[1])
        loss.backward()
        opt.step()
        return loss

    one(data[0])
    t0 = time.perf_counter()
    for b in data:
        loss = one(b)
    float(loss.detach())
    return (time.perf_counter() - t0) / len(data)


def time_comm(numel: int, steps: int) -> float:
    buf = torch.zeros(numel)
    torch.distributed.all_reduce(buf)
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.distributed.all_reduce(buf)
    return (time.perf_counter() - t0) / steps


def worker(args: argparse.Namespace) -> None:
    """One of the 2 ranks (under torchrun)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = torch.distributed.get_rank()
    data = batches(args.steps, args.batch, seed=rank)
    numel = sum(p.numel() for p in make_state().params.values())
    contenders = {
        "bare": lambda: time_steps(train_step, data),
        "overlap": lambda: time_steps(tk.distributed(train_step), data),
        "no-overlap": lambda: time_steps(tk.distributed(train_step, overlap=False), data),
        "no-metrics": lambda: time_steps(tk.distributed(train_step, reduce_metrics=False), data),
        "ddp": lambda: time_ddp(data),
        "comm only": lambda: time_comm(numel, args.steps),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for k in order:
            torch.distributed.barrier()
            times[k].append(contenders[k]())
    if rank == 0:
        Path(args.worker).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    torch.distributed.destroy_process_group()


def time_fsdp2(data: list) -> tuple[float, int]:
    """The reference: torch's FSDP2 (fully_shard per Linear, then the root) and torch.optim.Adam; (s/step, local bytes)."""
    from torch.distributed.fsdp import fully_shard

    model = tk.to_module(make_state()).train()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one(b: tuple) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(b[0]), b[1])
        loss.backward()
        opt.step()
        return loss

    one(data[0])
    t0 = time.perf_counter()
    for b in data:
        loss = one(b)
    float(loss.detach())
    elapsed = (time.perf_counter() - t0) / len(data)
    tensors = [*model.parameters(), *(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return elapsed, sum(t.numel() * t.element_size() for t in local)


def time_sharded(step, data: list) -> tuple[float, int]:
    """(seconds per step, bytes of params + optimizer state on this rank), the state donated as fit does."""
    from trainkit.transforms.distributed import local_state_bytes

    state = make_state()
    with tk.donating():
        state, m = step(state, data[0])  # warm-up (and, for fsdp, the sharding of the state)
        t0 = time.perf_counter()
        for b in data:
            state, m = step(state, b)
        float(m["loss"])
    return (time.perf_counter() - t0) / len(data), local_state_bytes(state)


def shard_worker(args: argparse.Namespace) -> None:
    """One rank of the sharding table (under torchrun, 1, 2 or 4 ranks)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    data = batches(args.steps, args.batch, seed=rank)
    contenders = {
        "replicated": lambda: time_sharded(tk.distributed(train_step), data),
        "fsdp": lambda: time_sharded(tk.distributed(train_step, params="fsdp"), data),
        "fsdp, no overlap": lambda: time_sharded(tk.distributed(train_step, params="fsdp", overlap=False), data),
        "FSDP2 + torch.optim (reference)": lambda: time_fsdp2(data),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    nbytes: dict[str, int] = {}
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for k in order:
            torch.distributed.barrier()
            t, b = contenders[k]()
            times[k].append(t)
            nbytes[k] = b
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, {k: (statistics.median(v), nbytes[k]) for k, v in times.items()})
    if rank == 0:
        Path(args.shard_worker).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def sharding_table(args: argparse.Namespace) -> None:
    worlds: dict[int, list] = {}
    with tempfile.TemporaryDirectory() as d:
        for world in (1, 2, 4):
            out = Path(d) / f"shard{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), __file__,
                   "--steps", str(args.steps), "--rounds", str(args.rounds), "--batch", str(args.batch),
                   "--shard-worker", str(out)]
            proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"scaling.py: the {world}-rank run failed:\n{proc.stderr[-4000:]}")
            worlds[world] = json.loads(out.read_text())
    numel = sum(t.numel() for t in make_state().params.values())
    print(f"\nsharded params (params='fsdp') vs replicated, CPU only (no GPU here), gloo; {numel:,} params, Adam, "
          f"{args.batch} rows per rank per step; 4 ranks share 2 cores")
    print("bytes = params + optimizer state held by the largest rank; ms = median over ranks of each rank's median")
    print(f"{'':34s} " + " ".join(f"{f'{w} rank' + ('s' if w > 1 else ''):>19s}" for w in worlds))
    print(f"{'':34s} " + " ".join(f"{'ms/step':>8s} {'MB/rank':>10s}" for _ in worlds))
    for k in worlds[1][0]:
        cells = []
        for ranks in worlds.values():
            ms = statistics.median(r[k][0] for r in ranks) * 1e3
            mb = max(r[k][1] for r in ranks) / 2**20
            cells.append(f"{ms:8.2f} {mb:10.2f}")
        print(f"{k:34s} " + " ".join(cells))
    for w, ranks in worlds.items():
        rep, sh = max(r["replicated"][1] for r in ranks), max(r["fsdp"][1] for r in ranks)
        print(f"{w} rank{'s' if w > 1 else ''}: fsdp holds {sh / rep:.3f} of the replicated bytes per rank (1/{w} = {1 / w:.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sharding-only", action="store_true", help="only the sharded-vs-replicated table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shard-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.shard_worker:
        return shard_worker(args)
    if args.sharding_only:
        return sharding_table(args)

    torch.set_num_threads(1)
    data = batches(args.steps, args.batch, seed=0)
    numel = sum(t.numel() for t in make_state().params.values())
    # One rank: the bare step, and tk.distributed on a group of one, interleaved.
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    one = {"bare step": [], "distributed, 1 rank": []}
    for r in range(args.rounds):
        order = list(one) if r % 2 == 0 else list(one)[::-1]
        for k in order:
            one[k].append(time_steps(train_step if k == "bare step" else tk.distributed(train_step), data))
    torch.distributed.destroy_process_group()
    one_t = {k: statistics.median(v) for k, v in one.items()}

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "two.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--steps", str(args.steps), "--rounds", str(args.rounds), "--batch", str(args.batch), "--worker", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        two = json.loads(out.read_text())

    print(f"tk.distributed on CPU (gloo, loopback): MLP 784-512-512-10 ({numel:,} params, {numel * 4 / 2**20:.1f} MB of gradients), "
          f"Adam, {args.batch} rows per rank per step, 1 thread per process")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"median of {args.rounds} rounds of {args.steps} steps\n")
    base = one_t["bare step"]
    rows = [
        ("1 rank: bare step", 1, one_t["bare step"]),
        ("1 rank: tk.distributed (group of one)", 1, one_t["distributed, 1 rank"]),
        ("2 ranks: bare step each, no communication", 2, two["bare"]),
        ("2 ranks: tk.distributed, overlap", 2, two["overlap"]),
        ("2 ranks: tk.distributed, no overlap", 2, two["no-overlap"]),
        ("2 ranks: tk.distributed, reduce_metrics=False", 2, two["no-metrics"]),
        ("2 ranks: torch DDP + torch.optim (reference)", 2, two["ddp"]),
    ]
    print(f"{'':46s} {'ms/step':>8s} {'steps/s':>8s} {'rows/s':>8s} {'vs 1 rank':>9s}")
    for name, world, t in rows:
        print(f"{name:46s} {t * 1e3:8.2f} {1 / t:8.1f} {world * args.batch / t:8.0f} {world * base / t:8.2f}x")
    print(f"\ncommunication per step, 2 ranks: all-reduce of {numel * 4 / 2**20:.1f} MB alone: {two['comm only'] * 1e3:.2f} ms; "
          f"a 2-rank step costs {(two['overlap'] - two['bare']) * 1e3:+.2f} ms with overlap, "
          f"{(two['no-overlap'] - two['bare']) * 1e3:+.2f} ms without, over the same ranks' bare step")
    sharding_table(args)

if __name__ == "__main__":
    main()

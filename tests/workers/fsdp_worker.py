"""One rank of the sharded-params tests (tests/test_fsdp.py starts them under torchrun).

    torchrun --standalone --nproc-per-node 4 fsdp_worker.py save4 OUT
    torchrun --standalone --nproc-per-node 2 fsdp_worker.py equal OUT      (after save4: it resumes ck4)
    torchrun --nnodes 2 ... fsdp_worker.py multinode OUT                   (two agents on this machine)
    torchrun --max-restarts 1 ... fsdp_worker.py elastic OUT replicated|fsdp
    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python fsdp_worker.py loop OUT [timeout]

Each rank writes what it saw to OUT/<mode>-rank{r}.pt; the test compares it with one process.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import dataset, eval_step, global_batches, make_state, train_step  # noqa: E402

import trainkit as tk  # noqa: E402
from trainkit.sharded_checkpoint import ShardedCheckpointer  # noqa: E402
from trainkit.transforms import distributed as D  # noqa: E402


def clipped_adam():
    return tk.optim.chain(tk.optim.clip_by_global_norm(0.5), tk.optim.adam(1e-2))


def local(batch, rank, world):
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def run(step, state, batches, rank, world):
    metrics = []
    for b in batches:
        state, m = step(state, local(b, rank, world))
        metrics.append({k: v.item() for k, v in m.items()})
    return state, metrics


def whole(state):
    full = D.gather_state(state)
    return {"params": full.params, "opt_state": full.opt_state, "step": full.step}


def save4(out: Path, rank: int, world: int) -> dict:
    step = tk.distributed(train_step, params="fsdp", timeout=60)
    state, _ = run(step, make_state(tx=clipped_adam()), global_batches(world)[:3], rank, world)
    ck = ShardedCheckpointer(out / "ck4")
    ck.save(state, meta={"epoch": 0, "batch": 3, "history": []})
    return {"state": whole(state), "bytes": D.local_state_bytes(state),
            "bytes_replicated": D.local_state_bytes(make_state(tx=clipped_adam())), "latest": str(ck.latest())}


def equal(out: Path, rank: int, world: int) -> dict:
    result: dict = {}
    # (1) Adam + clip_by_global_norm, several steps
    step = tk.distributed(train_step, params="fsdp", timeout=60)
    state, metrics = run(step, make_state(tx=clipped_adam()), global_batches(world), rank, world)
    result["adam_clip"] = {**whole(state), "metrics": metrics, "bytes": D.local_state_bytes(state),
                           "bytes_replicated": D.local_state_bytes(make_state(tx=clipped_adam())),
                           "local_shapes": {n: tuple(t.to_local().shape) for n, t in state.params.items()}}

    lazy = tk.distributed(train_step, params="fsdp", overlap=False, timeout=60)  # no prefetch: gathered as each module runs
    result["no_overlap"] = whole(run(lazy, make_state(tx=clipped_adam()), global_batches(world), rank, world)[0])

    # (2) mixed_precision(bfloat16) inside: sharded and replicated on the same ranks, same batches
    from trainkit.transforms.mixed_precision import mixed_precision

    bf = {}
    for mode in ("fsdp", "replicated"):  # float32 params: autocast computes the linears in bfloat16
        s = tk.compose(tk.distributed(params=mode, timeout=60), mixed_precision(dtype=torch.bfloat16))(train_step)
        state32 = make_state(dtype=torch.float32)
        bf[mode] = D.gather_state(run(s, state32, global_batches(world, torch.float32), rank, world)[0]).params
    result["bf16"] = bf

    # (3) gradient accumulation (MultiSteps every 2) with Adam
    ms = make_state(tx=tk.optim.MultiSteps(tk.optim.adam(1e-2), every_k=2))
    result["multisteps"] = whole(run(step, ms, global_batches(world)[:4], rank, world)[0])

    # (4) evaluation of a sharded state: one gather, then each rank its own number of batches
    val = DataLoader(dataset(21, 2), batch_size=5)
    shard_val = tk.dist.shard_loader(val, train=False)
    result["eval"] = {"sharded": tk.evaluate(eval_step, state, shard_val),
                      "whole": tk.evaluate(eval_step, D.gather_state(state), shard_val), "batches": len(shard_val)}

    # (5) a rank built with another model: the error names the param and the ranks, on every rank
    torch.manual_seed(0)
    width = 16 if rank == 0 else 17
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))
    try:
        D.shard_state(tk.TrainState.create(model, tk.optim.adam(1e-2), dtype=torch.float64))
        result["mismatch"] = "no error"
    except ValueError as e:
        result["mismatch"] = str(e)

    # (6) resume ck4 (saved by 4 ranks) on 2; and the same point reached without DCP, for comparison
    ck = ShardedCheckpointer(out / "ck4")
    like = D.shard_state(make_state(tx=clipped_adam()))
    resumed, meta = ck.load_run(ck.latest(), like=like)
    rest = global_batches(world)[3:]
    result["resumed"] = {**whole(run(step, resumed, rest, rank, world)[0]), "meta": meta}
    point = torch.load(out / "save4-rank0.pt", weights_only=False)["state"]
    same = make_state(tx=clipped_adam()).replace(step=point["step"], params=point["params"], opt_state=point["opt_state"])
    result["uninterrupted"] = whole(run(step, same, rest, rank, world)[0])
    return result


def multinode(out: Path, rank: int, world: int) -> dict:
    result = {"world": world}
    for mode in ("fsdp", "replicated"):
        step = tk.distributed(train_step, params=mode, timeout=60)
        result[mode] = whole(run(step, make_state(tx=clipped_adam()), global_batches(world), rank, world)[0])
    return result


ELASTIC_KILL_STEP = 5  # rank 1 dies here on the first attempt: mid-epoch 2 (4 batches an epoch)


def elastic(out: Path, rank: int, world: int, mode: str) -> dict:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    loader = DataLoader(dataset(60, 1), batch_size=8, shuffle=True)
    state = make_state(tx=tk.optim.adam(1e-2))

    def checkpointer(name):
        kind = ShardedCheckpointer if mode == "fsdp" else tk.Checkpointer
        return kind(out / name, every_n_steps=2, keep_last=2)

    ck = checkpointer(f"ck-{mode}")
    latest_at_start = str(ck.latest())
    inner = train_step
    if attempt == 0 and rank == 1 and mode == "replicated":

        def inner(state, batch):  # SIGKILL mid-epoch 2, in a step
            if state.step == ELASTIC_KILL_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_step(state, batch)

    if attempt == 0 and rank == 1 and mode == "fsdp":  # SIGKILL in the middle of the save at step 6
        from torch.distributed.checkpoint import FileSystemWriter

        real = FileSystemWriter.write_data

        def dying(self, plan, planner):
            if f"step-{ELASTIC_KILL_STEP + 1:09d}" in str(self.path):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, plan, planner)

        FileSystemWriter.write_data = dying
    final, history = tk.fit(tk.distributed(inner, params=mode, timeout=30), state, loader, epochs=3, checkpoint=ck,
                            resume="latest", progress=False)
    # the same run, uninterrupted, for comparison
    plain, _ = tk.fit(tk.distributed(train_step, params=mode, timeout=30), state, loader, epochs=3,
                      checkpoint=checkpointer(f"ck-{mode}-plain"), progress=False)
    return {"attempt": attempt, "latest_at_start": latest_at_start, "params": whole(final)["params"],
            "uninterrupted": whole(plain)["params"], "history": history}


def loop(out: Path, rank: int, timeout: float) -> None:
    step = tk.distributed(train_step, params="fsdp", timeout=timeout)
    state = make_state()
    b = local(global_batches()[0], rank, 2)
    for i in range(1_000_000):
        state, _ = step(state, b)
        if i == 3:
            (out / f"ready-{rank}").write_text(str(os.getpid()))
        time.sleep(0.002)


def main() -> None:
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if mode == "loop":
        loop(out, rank, float(sys.argv[3]) if len(sys.argv) > 3 else 600.0)
        return
    if mode == "save4":
        result = save4(out, rank, world)
    elif mode == "equal":
        result = equal(out, rank, world)
    elif mode == "multinode":
        result = multinode(out, rank, world)
    elif mode == "elastic":
        result = elastic(out, rank, world, sys.argv[3])
        mode = f"elastic-{sys.argv[3]}"
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.save(result, out / f"{mode}-rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

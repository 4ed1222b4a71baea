"""One rank of the distributed tests (tests/test_distributed.py starts 2 of them).

    python -m torch.distributed.run --standalone --nproc-per-node 2 dist_worker.py train OUT
    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python dist_worker.py loop OUT [timeout]

`train`: (A) N steps of tk.distributed(step) on each rank's half of fixed global batches, with
several bucket settings; (B) tk.fit over a shuffled DataLoader that the runner shards, with a
logger and checkpoints (rank 0 only), each rank recording the rows it trained on; (C) the same
run stopped mid-epoch and resumed; (D) early_stop and mixed_precision composed. Each rank saves
what it saw to OUT/rank{r}.pt for the test to compare with one process on the global batch.

`loop`: steps forever (a little sleep each), writing OUT/ready-{rank} after step 3, so that the
test can kill or stop one rank mid-run; the survivor must exit with a DistributedError.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk
from trainkit.transforms.distributed import DistributedError

LOCAL = 6  # rows per rank per step
STEPS = 5


def make_state(seed: int = 0, tx=None, dtype=torch.float64) -> tk.TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    return tk.TrainState.create(model, tx or tk.optim.adam(1e-2), dtype=dtype, seed=seed)


def train_step(state, batch):
    x, y = batch

    def loss_fn(p):
        logits, buffers = state.apply(p, x, train=True)
        return F.cross_entropy(logits, y), (logits, buffers)

    (loss, (logits, buffers)), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    acc = (logits.argmax(-1) == y).to(logits.dtype).mean()
    return state.apply_gradients(grads, buffers=buffers), {"loss": loss, "acc": acc}


def eval_step(state, batch):
    x, y = batch
    logits, _ = state.apply(None, x)
    return {"loss": F.cross_entropy(logits, y)}


def global_batches(world: int = 2, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    n = world * LOCAL
    return [(torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)) for _ in range(STEPS)]


def dataset(n: int, seed: int, dtype=torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


class Recording:
    """The rows each step trained on, in order."""

    def __init__(self, step):
        self.step, self.rows = step, []

    def __call__(self, state, batch):
        self.rows.append(batch[0].clone())
        return self.step(state, batch)


def train(out: Path) -> None:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    result: dict = {"rank": rank, "world": world}

    # (A) the transform alone, on this rank's half of each global batch
    variants = {"default": {}, "small_buckets": {"bucket_cap_mb": 0.0005}, "no_overlap": {"bucket_cap_mb": 0.0005, "overlap": False}}
    for name, kw in variants.items():
        step = tk.distributed(train_step, timeout=60, **kw)
        state = make_state()
        metrics = []
        for i, (x, y) in enumerate(global_batches(world)):
            local = (x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL])
            if i == 0:
                tk.testing.check_step(step, state, local)
            state, m = step(state, local)
            metrics.append({k: v.item() for k, v in m.items()})
        result[f"A_{name}"] = {"params": state.params, "opt_state": state.opt_state, "metrics": metrics}

    # (A2) parameters that get a gradient on rank 0 only (their hooks never fire on rank 1): no hang
    def branchy(state, batch):
        x, y = batch

        def loss_fn(p):
            if rank == 0:
                return F.cross_entropy(state.apply(p, x)[0], y)
            return (p["0.weight"] ** 2).sum()  # rank 1: no other parameter gets a gradient

        loss, g = tk.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(g), {"loss": loss}

    state = make_state()
    x, y = global_batches(world)[0]
    state, _ = tk.distributed(branchy, bucket_cap_mb=0.0005)(state, (x[:LOCAL], y[:LOCAL]))
    result["A2_params"] = state.params

    # (B) fit shards a shuffled DataLoader; logs and checkpoints on rank 0 only
    train_ds, val_ds = dataset(60, 1), dataset(21, 2)
    train_loader = DataLoader(train_ds, batch_size=8, shuffle=True)
    val_loader = DataLoader(val_ds, batch_size=5)
    rec = Recording(train_step)
    # Per-rank folders, only so that the test can tell who wrote (a real script gives every rank the same).
    logger = tk.CSVLogger(out / f"logs-rank{rank}", name="run")
    ck = tk.Checkpointer(out / f"ckpt-rank{rank}", every_n_steps=3, keep_last=10)
    state = make_state(tx=tk.optim.sgd(0.1, momentum=0.9))
    final, history = tk.fit(tk.distributed(rec), state, train_loader, epochs=2, eval_step=eval_step, val_loader=val_loader,
                            logger=logger, checkpoint=ck, log_every=2, progress=False)
    logger.close()
    result["B"] = {"params": final.params, "history": history, "rows": rec.rows, "epochs_len": len(rec.rows)}

    # (C) the same run, stopped mid-epoch 2 and resumed from rank 0's checkpoint
    class Interrupted(Exception):
        pass

    def interrupted(state, batch):
        if state.step == 5:  # mid-epoch 2, on every rank (as when torchrun stops the group)
            raise Interrupted
        return train_step(state, batch)

    ck2 = tk.Checkpointer(out / "ckpt2", every_n_steps=1, keep_last=2)
    try:
        tk.fit(tk.distributed(interrupted), state, train_loader, epochs=2, eval_step=eval_step,
               val_loader=val_loader, checkpoint=ck2, progress=False)
    except Interrupted:
        pass
    torch.distributed.barrier()  # a new launch would find rank 0's files complete; here we wait for them
    resumed, history_c = tk.fit(tk.distributed(train_step), state, train_loader, epochs=2, eval_step=eval_step,
                                val_loader=val_loader, checkpoint=ck2, resume="latest", progress=False)
    result["C"] = {"params": resumed.params, "history": history_c}

    # (D) compositions: mixed_precision inside, early_stop around the epoch (decided alike on every rank)
    from trainkit.transforms.early_stop import early_stop
    from trainkit.transforms.mixed_precision import mixed_precision

    state32 = make_state(tx=tk.optim.sgd(0.0), dtype=torch.float32)  # lr 0: val_loss never improves
    loader32 = DataLoader(dataset(40, 3, torch.float32), batch_size=8, shuffle=True)
    val32 = DataLoader(dataset(13, 4, torch.float32), batch_size=8)
    batch_step = tk.compose(tk.distributed(), mixed_precision(dtype=torch.bfloat16))(train_step)
    epoch = early_stop(tk.epoch_step(batch_step, eval_step), monitor="val_loss", patience=2)
    stopped, history_d = tk.fit(epoch, state32, loader32, epochs=10, val_loader=val32, progress=False)
    result["D"] = {"history": history_d, "stopped": tk.should_stop(stopped), "slot": stopped.slots.get("early_stop")}

    # (F) gradient accumulation: optim.MultiSteps(every_k=2) under distributed; the non-final
    # micro-steps run no collective (as DDP's no_sync), counted on the real all_reduce
    calls = []
    real_all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return real_all_reduce(*args, **kwargs)

    ms_step = tk.distributed(train_step, reduce_metrics=False)
    ms_state = make_state(tx=tk.optim.MultiSteps(tk.optim.adam(1e-2), every_k=2))
    ms_step(ms_state, (x[:LOCAL], y[:LOCAL]))  # the first call checks that the ranks start alike: not counted
    torch.distributed.all_reduce = counting_all_reduce
    per_step = []
    try:
        for gx, gy in global_batches()[:4]:
            before = len(calls)
            ms_state, _ = ms_step(ms_state, (gx[rank * LOCAL : (rank + 1) * LOCAL], gy[rank * LOCAL : (rank + 1) * LOCAL]))
            per_step.append(len(calls) - before)
    finally:
        torch.distributed.all_reduce = real_all_reduce
    result["F"] = {"params": ms_state.params, "collectives": per_step}

    # (E) ranks that do not start from the same state are told so, on every rank
    try:
        tk.distributed(train_step)(make_state(seed=rank), (x[:LOCAL], y[:LOCAL]))
        result["E"] = "no error"
    except DistributedError as e:
        result["E"] = str(e)

    torch.save(result, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def loop(out: Path, timeout: float) -> None:
    rank = int(os.environ["RANK"])
    step = tk.distributed(train_step, timeout=timeout)
    state = make_state()
    x, y = global_batches()[0]
    local = (x[rank * LOCAL : (rank + 1) * LOCAL], y[rank * LOCAL : (rank + 1) * LOCAL])
    for i in range(1_000_000):
        state, _ = step(state, local)
        if i == 3:
            (out / f"ready-{rank}").write_text(str(os.getpid()))
        time.sleep(0.002)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "train":
        train(out)
    elif mode == "loop":
        loop(out, float(sys.argv[3]) if len(sys.argv) > 3 else 600.0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

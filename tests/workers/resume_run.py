"""A training run for the exact-resume test: demo CNN (BatchNorm, dropout), shuffled loader,
checkpoints every 7 steps. `--die-at N` SIGKILLs this very process after step N (mid-epoch)."""

import argparse
import os
import signal

import torch

import trainkit as tk
from trainkit.demo import CNN, train_step

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--out", required=True)
p.add_argument("--die-at", type=int, default=None)
p.add_argument("--resume", action="store_true")
args = p.parse_args()

torch.manual_seed(0)
splits = tk.data.digits()
x, y = splits.train
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:320], y[:320]), batch_size=32, shuffle=True)
state = tk.TrainState.create(CNN(width=8), tk.optim.adamw(tk.optim.cosine_decay_schedule(3e-3, 40)), seed=7)


def step(state, batch):
    state, metrics = train_step(state, batch)
    if args.die_at is not None and state.step == args.die_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a real, unclean death: no finally, no flush
    return state, metrics


ck = tk.Checkpointer(args.ckpt, every_n_steps=7, keep_last=2)
state, history = tk.fit(step, state, loader, epochs=4, checkpoint=ck, resume="latest" if args.resume else None, progress=False)
tk.save(state, args.out, meta={"history": history})

"""One rank of tests/test_daily.py's torchrun test: predict and whole-set metrics on 2 gloo ranks.

    python -m torch.distributed.run --standalone --nproc-per-node 2 wholeset_worker.py OUT

Each rank predicts its share of a DataLoader (tk.predict gathers them in order) and runs an
epoch whose validation F1 and AUROC are computed from Cat statistics of every rank's samples.
Rank r writes what it got to OUT/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk


def data(n: int = 45, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    return TensorDataset(x, y)


def make_state() -> tk.TrainState:
    torch.manual_seed(0)
    return tk.TrainState.create(torch.nn.Linear(4, 2), tk.optim.sgd(0.1))


def train_step(state, batch):
    x, y = batch
    loss, g = tk.value_and_grad(lambda p: F.cross_entropy(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(g), {"loss": loss}


def eval_step(state, batch):
    x, y = batch
    logits = state.apply(None, x)[0]
    return {"loss": F.cross_entropy(logits, y), "score": tk.metrics.Cat(logits.softmax(-1)[:, 1]), "label": tk.metrics.Cat(y)}


def finalize(stats):
    from sklearn.metrics import f1_score, roc_auc_score

    score, label = stats["score"].numpy(), stats["label"].numpy()
    return {"f1": float(f1_score(label, score > 0.5)), "auroc": float(roc_auc_score(label, score)), "n": float(len(label))}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = DataLoader(data(), batch_size=8)
    state = make_state()
    preds = tk.predict(lambda s, b: s.apply(None, b[0])[0], state, loader)
    epoch = tk.epoch_step(tk.distributed(train_step), eval_step, finalize=finalize)
    trained, history = tk.fit(epoch, state, DataLoader(data(32, 1), batch_size=8), val_loader=loader, epochs=1, progress=False)
    torch.save({"preds": preds, "history": history, "params": trained.params}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))

"""The demo: a small CNN (BatchNorm, dropout) on real handwritten digits, with validation,
TensorBoard logs and a held-out test accuracy.

    python -m trainkit.demo                  # scikit-learn's digits, shipped, no network
    python -m trainkit.demo --mnist ~/data   # MNIST from a local folder of IDX files
    python -m trainkit.demo --precision bf16 --early-stop --find-lr   # the one-device transforms

The step functions here are the ones the tests check with trainkit.testing.check_step.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trainkit as tk


class CNN(nn.Module):
    """Two conv blocks with BatchNorm, then dropout and a linear classifier; any input size >= 8x8."""

    def __init__(self, num_classes: int = 10, width: int = 32, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_step(state: tk.TrainState, batch: tuple[Tensor, Tensor]) -> tuple[tk.TrainState, dict[str, Tensor]]:
    """One optimizer step of cross-entropy; metrics stay tensors."""
    x, y = batch

    def loss_fn(params: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        logits, buffers = state.apply(params, x, train=True)
        return F.cross_entropy(logits, y), (logits, buffers)

    (loss, (logits, buffers)), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads, buffers=buffers)
    return state, {"loss": loss, "acc": (logits.argmax(-1) == y).float().mean()}


def eval_step(state: tk.TrainState, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """Loss and accuracy in eval mode (BatchNorm running stats, no dropout)."""
    x, y = batch
    logits, _ = state.apply(None, x)
    return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}


def make_state(lr: float = 3e-3, epochs: int = 15, steps_per_epoch: int = 20, seed: int = 0) -> tk.TrainState:
    """The demo's initial state: CNN, AdamW with a one-cycle schedule over the run."""
    torch.manual_seed(seed)
    schedule = tk.optim.one_cycle_schedule(lr, total_steps=max(2, epochs * steps_per_epoch))
    return tk.TrainState.create(CNN(), tk.optim.adamw(schedule, weight_decay=1e-4), seed=seed)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m trainkit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak LR of the one-cycle schedule")
    p.add_argument("--mnist", metavar="DIR", help="train on MNIST from this folder instead of the digits")
    p.add_argument("--logdir", default="runs", help="TensorBoard logs go to LOGDIR/demo/version_N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", choices=["32", "bf16", "fp16"], default="32",
                   help="autocast dtype of the train step (params stay float32; fp16 is for GPUs, slow on CPU)")
    p.add_argument("--early-stop", type=int, nargs="?", const=3, default=None, metavar="PATIENCE",
                   help="stop when val_loss has not improved for PATIENCE epochs (default 3); keep the best epoch's params")
    p.add_argument("--find-lr", action="store_true", help="run the LR range test first and train at its suggested LR")
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    splits = tk.data.mnist(args.mnist) if args.mnist else tk.data.digits(seed=args.seed)
    train, val, test = tk.data.loaders(splits, args.batch_size)
    logger = tk.TensorBoardLogger(args.logdir, name="demo")
    step = train_step  # each feature is a transform of the step
    if args.precision != "32":
        step = tk.mixed_precision(train_step, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
    lr = args.lr
    if args.find_lr:  # on a copy of the state: nothing to undo afterwards
        found = tk.find_lr(step, make_state(args.lr, args.epochs, len(train), args.seed), train)
        lr = found.suggestion if found.suggestion is not None else args.lr
        if logger.log_dir is not None:  # None off rank 0 under torchrun: rank 0 alone writes files
            found.plot(logger.log_dir / "lr_find.png")
            print(f"find_lr: {found.message}; training at lr {lr:.3g} (plot in {logger.log_dir / 'lr_find.png'})")
    state = make_state(lr, args.epochs, len(train), args.seed)
    if args.early_stop is not None:
        step = tk.early_stop(tk.epoch_step(step, eval_step), monitor="val_loss", patience=args.early_stop, restore_best=True)
    hparams = {"lr": lr, "epochs": args.epochs, "batch_size": args.batch_size, "data": "mnist" if args.mnist else "digits",
               "precision": args.precision, "early_stop": str(args.early_stop), "find_lr": args.find_lr}
    logger.log_hyperparams(hparams)

    t0 = time.perf_counter()
    state, history = tk.fit(
        step, state, train, epochs=args.epochs, eval_step=None if args.early_stop is not None else eval_step, val_loader=val,
        logger=logger, progress=not args.no_progress, log_every=10,
    )
    seconds = time.perf_counter() - t0
    if args.early_stop is not None:
        stopped = state.slots["early_stop"]
        state = tk.early_stop.best_state(state)  # the best epoch's params (already there if it stopped)
        print(stopped["reason"] or f"early_stop: ran all {args.epochs} epochs; best val_loss at epoch {stopped['best_evaluation']}")
    test_metrics = tk.evaluate(eval_step, state, test)
    logger.log_metrics({"test/acc": test_metrics["acc"], "test/loss": test_metrics["loss"]}, state.step)
    logger.close()
    last = history[-1]
    print(f"trained {state.step} steps in {seconds:.1f}s: val_acc {last['val_acc']:.4f}, val_loss {last['val_loss']:.4f}")
    print(f"test accuracy {test_metrics['acc']:.4f} (loss {test_metrics['loss']:.4f}); logs in {logger.log_dir}")
    return {"test_acc": test_metrics["acc"], "history": history, "seconds": seconds, "log_dir": str(logger.log_dir),
            "lr": lr, "state": state}


if __name__ == "__main__":
    main(sys.argv[1:])

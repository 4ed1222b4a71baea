"""The demo: a small CNN (BatchNorm, dropout) on real handwritten digits, with validation,
TensorBoard logs and a held-out test accuracy.

    python -m trainkit.demo                  # scikit-learn's digits, shipped, no network
    python -m trainkit.demo --mnist ~/data   # MNIST from a local folder of IDX files
    python -m trainkit.demo --precision bf16 --early-stop --find-lr   # the one-device transforms
    python -m trainkit.demo --data-dir ~/photos --model resnet18      # a torchvision model on your image folder

``--data-dir`` needs torchvision (a build matching torch: torch 2.9.0 + torchvision 0.24.0, or
torch 2.14.1 + torchvision 0.29.1); the digits and MNIST demos do not.

The step functions here are the ones the tests check with trainkit.testing.check_step.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

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


def make_state(
    lr: float = 3e-3, epochs: int = 15, steps_per_epoch: int = 20, seed: int = 0, model: Callable[[], nn.Module] = CNN
) -> tk.TrainState:
    """The demo's initial state: ``model()`` (the CNN), AdamW with a one-cycle schedule over the run.

    ``model`` is built after seeding, so the same seed gives the same initial weights.

    >>> make_state(epochs=1).step, type(make_state(model=lambda: nn.Linear(2, 2)).module).__name__
    (0, 'Linear')
    """
    torch.manual_seed(seed)
    schedule = tk.optim.one_cycle_schedule(lr, total_steps=max(2, epochs * steps_per_epoch))
    return tk.TrainState.create(model(), tk.optim.adamw(schedule, weight_decay=1e-4), seed=seed)


def vision_model(name: str, num_classes: int) -> Callable[[], nn.Module]:
    """A factory of the ``torchvision.models`` classifier ``name`` (e.g. ``resnet18``), untrained, with ``num_classes`` outputs.

    Checked at once (the name, torchvision importing); the model itself is built when called.
    Models with a fixed input size (``inception_v3``, the ViTs) need ``--image-size`` to match.
    (Skipped as a doctest: the main test venv's torch 2.13 CPU wheel has no torchvision.)

    >>> vision_model("resnet18", num_classes=3)().fc  # doctest: +SKIP
    Linear(in_features=512, out_features=3, bias=True)
    """
    models = tk.data.require_torchvision("demo --model").models
    names = models.list_models(module=models)  # the classifiers: detection/segmentation live in submodules
    if name not in names:
        raise ValueError(f"demo: --model must name a torchvision.models classifier, got {name!r}. Choose one of: {', '.join(names)}.")
    return lambda: models.get_model(name, weights=None, num_classes=num_classes)


def _data(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, DataLoader | None, Callable[[], nn.Module]]:
    """The loaders (train, val, test or None) and the model factory the arguments ask for."""
    if args.data_dir:  # a torchvision model on the user's image folder: train / val, no test split
        splits = tk.data.image_folder(args.data_dir, image_size=args.image_size, seed=args.seed)
        model = vision_model(args.model, len(splits.classes))
        return (*tk.data.folder_loaders(splits, args.batch_size), None, model)
    splits = tk.data.mnist(args.mnist) if args.mnist else tk.data.digits(seed=args.seed)
    return (*tk.data.loaders(splits, args.batch_size), CNN)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m trainkit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak LR of the one-cycle schedule")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--mnist", metavar="DIR", help="train on MNIST from this folder instead of the digits")
    data.add_argument("--data-dir", metavar="DIR",
                      help="train a torchvision model on this image folder (one subfolder per class) instead; needs torchvision")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="with --data-dir: a torchvision.models classifier (default resnet18), num_classes from the folder")
    p.add_argument("--image-size", type=int, default=None, metavar="SIZE",
                   help="with --data-dir: images are resized to SIZE x SIZE (default 32)")
    p.add_argument("--logdir", default="runs", help="TensorBoard logs go to LOGDIR/demo/version_N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", choices=["32", "bf16", "fp16"], default="32",
                   help="autocast dtype of the train step (params stay float32; fp16 is for GPUs, slow on CPU)")
    p.add_argument("--early-stop", type=int, nargs="?", const=3, default=None, metavar="PATIENCE",
                   help="stop when val_loss has not improved for PATIENCE epochs (default 3); keep the best epoch's params")
    p.add_argument("--find-lr", action="store_true", help="run the LR range test first and train at its suggested LR")
    args = p.parse_args(argv)
    if not args.data_dir and (args.model is not None or args.image_size is not None):
        p.error("--model and --image-size choose the torchvision model trained on --data-dir DIR; give --data-dir too")
    args.model, args.image_size = args.model or "resnet18", args.image_size or 32

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, val, test, model = _data(args)
    logger = tk.TensorBoardLogger(args.logdir, name="demo")
    step = train_step  # each feature is a transform of the step
    if args.precision != "32":
        step = tk.mixed_precision(train_step, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
    lr = args.lr
    if args.find_lr:  # on a copy of the state: nothing to undo afterwards
        found = tk.find_lr(step, make_state(args.lr, args.epochs, len(train), args.seed, model), train)
        lr = found.suggestion if found.suggestion is not None else args.lr
        if logger.log_dir is not None:  # None off rank 0 under torchrun: rank 0 alone writes files
            found.plot(logger.log_dir / "lr_find.png")
            print(f"find_lr: {found.message}; training at lr {lr:.3g} (plot in {logger.log_dir / 'lr_find.png'})")
    state = make_state(lr, args.epochs, len(train), args.seed, model)
    if args.early_stop is not None:
        step = tk.early_stop(tk.epoch_step(step, eval_step), monitor="val_loss", patience=args.early_stop, restore_best=True)
    hparams = {"lr": lr, "epochs": args.epochs, "batch_size": args.batch_size, "data": "mnist" if args.mnist else "digits",
               "precision": args.precision, "early_stop": str(args.early_stop), "find_lr": args.find_lr}
    if args.data_dir:
        hparams.update(data="folder", model=args.model, image_size=args.image_size)
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
    test_metrics = None if test is None else tk.evaluate(eval_step, state, test)  # an image folder has no test split
    if test_metrics is not None:
        logger.log_metrics({"test/acc": test_metrics["acc"], "test/loss": test_metrics["loss"]}, state.step)
    logger.close()
    last = history[-1]
    print(f"trained {state.step} steps in {seconds:.1f}s: val_acc {last['val_acc']:.4f}, val_loss {last['val_loss']:.4f}")
    if test_metrics is None:
        print(f"{args.model} on {args.data_dir}: val accuracy {last['val_acc']:.4f}; logs in {logger.log_dir}")
    else:
        print(f"test accuracy {test_metrics['acc']:.4f} (loss {test_metrics['loss']:.4f}); logs in {logger.log_dir}")
    return {"test_acc": None if test_metrics is None else test_metrics["acc"], "history": history, "seconds": seconds,
            "log_dir": str(logger.log_dir), "lr": lr, "state": state}


if __name__ == "__main__":
    main(sys.argv[1:])

"""torchvision.transforms inside a DataLoader (worker processes included), on trainkit's one-process path.

Outside torch.distributed, fit uses the loader as it is (no sharding); it seeds torch's RNG from
(state.rng, epoch) around each epoch, so the shuffle, the workers' seeds and hence the random
augmentations are the same on every run: two fits give the same params, bit for bit.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import trainkit as tk
from trainkit.demo import CNN, eval_step, train_step


class Augmented(Dataset):
    """In-memory images with a torchvision transform applied per item (as a user's own dataset would)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def test_random_transforms_in_worker_processes_train_reproducibly():
    s = tk.data.digits(seed=0)
    augment = transforms.Compose([transforms.RandomCrop(8, padding=1), transforms.RandomRotation(10),
                                  transforms.Normalize((0.3,), (0.3,))])
    x, y = s.train[0][:256], s.train[1][:256]
    loader = DataLoader(Augmented(x, y, augment), batch_size=64, shuffle=True, num_workers=2)
    assert tk.dist.shard_loader(loader, train=True) is loader  # the sharding-free path: the loader as it is
    val = DataLoader(Augmented(*s.val, transforms.Normalize((0.3,), (0.3,))), batch_size=256)

    def run() -> tuple[tk.TrainState, list[dict[str, float]]]:
        torch.manual_seed(0)
        state = tk.TrainState.create(CNN(width=8), tk.optim.adam(3e-3), seed=0)
        return tk.fit(train_step, state, loader, epochs=3, eval_step=eval_step, val_loader=val, progress=False)

    (a, history), (b, _) = run(), run()
    tk.testing.assert_trees_equal(a.params, b.params)  # same batches, same augmentations
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.3  # 12 steps on augmented real digits: well above chance (0.1)

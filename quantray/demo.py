"""The demo model: a small CNN for scikit-learn's 8x8 digits, trained here on first use.

    python -m quantray.demo      # train (or load) the checkpoint and print its test accuracy

`digits_cnn()` is the factory `jobs/digits.toml` names. Its checkpoint is cached under
$QUANTRAY_CACHE (default ~/.cache/quantray) and trained in a few seconds when missing: nothing is
downloaded. Training uses the same fixed train/test split as the `digits` data source.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .cache import cache_dir

__all__ = ["DigitsCNN", "digits_cnn", "train"]

CHECKPOINT = "digits_cnn-v1.pth"


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.avg(self.relu(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def digits_cnn() -> DigitsCNN:
    """The trained demo model; trains and caches its checkpoint the first time (atomic write)."""
    path = cache_dir() / CHECKPOINT
    if not path.is_file():
        train(path)
    model = DigitsCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def train(path: Path, epochs: int = 30, seed: int = 0) -> float:
    """Train on the digits train split; write the state_dict to `path` atomically; return test top-1."""
    from .data import digits

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_set, test_set = digits("train"), digits("test")
    x, y = train_set.tensors
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        tx, ty = test_set.tensors
        accuracy = (model(tx).argmax(1) == ty).float().mean().item()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return accuracy


if __name__ == "__main__":
    target = cache_dir() / CHECKPOINT
    if target.is_file():
        print(f"{target} exists")
    else:
        print(f"trained {target}: test top-1 {train(target):.4f}")

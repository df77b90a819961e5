"""The demo model: a small CNN for scikit-learn's 8x8 digits, with its trained checkpoint shipped.

    python -m quantray.demo                 # check the shipped checkpoint and print its test accuracy
    python -m quantray.demo --train OUT.pth # train it again here (how the shipped one was made)

`digits_cnn()` is the factory `jobs/digits.toml` names. Its weights ship inside the package
(`assets/digits_cnn-v1.pth`, 99.6 KB) and are checked against their sha256 on load, so the demo
gives the same checkpoint, accuracies and qparams digest on every machine of the pinned stack.
Training is not machine-independent (float kernels differ between CPUs), which is why the result
of one training, on the project's 2-core x86-64 machine, is shipped rather than trained on first use.
"""

from __future__ import annotations

import argparse
import io
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .digest import sha256_bytes
from .errors import QuantrayError

__all__ = ["DigitsCNN", "digits_cnn", "train", "CHECKPOINT", "CHECKPOINT_SHA256"]

CHECKPOINT = "digits_cnn-v1.pth"
CHECKPOINT_SHA256 = "c8b935c2d3bafb9e08e4e9802e62d7a040eaf30e5c6a2d5b3e48a4c2e5f7c919"


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
    """The trained demo model, from the checkpoint shipped in the package (sha256 checked)."""
    payload = resources.files("quantray").joinpath("assets", CHECKPOINT).read_bytes()
    if sha256_bytes(payload) != CHECKPOINT_SHA256:
        raise QuantrayError(f"quantray/assets/{CHECKPOINT}: sha256 differs from the one quantray ships; "
                            "reinstall quantray")
    model = DigitsCNN()
    model.load_state_dict(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
    return model.eval()


def train(epochs: int = 30, seed: int = 0) -> tuple[dict, float]:
    """Train on the digits train split (Adam, batches of 64); return the state_dict and test top-1."""
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
    return model.state_dict(), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", metavar="OUT", help="train the model here and save its state_dict to OUT")
    args = parser.parse_args()
    from .data import digits

    if args.train:
        from .store import Store

        state, accuracy = train()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        out = Path(args.train).absolute()
        Store(out.parent, "--train").write(buffer.getvalue(), out.name)
        print(f"trained {out}: test top-1 {accuracy:.4f}, sha256 {sha256_bytes(buffer.getvalue())}")
        return
    model = digits_cnn()
    tx, ty = digits("test").tensors
    with torch.inference_mode():
        accuracy = (model(tx).argmax(1) == ty).float().mean().item()
    print(f"shipped {CHECKPOINT} (sha256 {CHECKPOINT_SHA256[:16]}...): test top-1 {accuracy:.4f}")


if __name__ == "__main__":
    main()

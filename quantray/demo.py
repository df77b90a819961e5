"""The demo models for scikit-learn's 8x8 digits, with their trained checkpoints shipped.

    python -m quantray.demo                          # check the shipped checkpoints, print their test top-1
    python -m quantray.demo --train OUT.pth [--model digits_mobilenet]   # train one again here

`digits_cnn()` is the factory `jobs/digits.toml` names: a small CNN (`assets/digits_cnn-v1.pth`,
99.6 KB). `digits_mobilenet()` is `jobs/digits_mobile.toml`'s: torchvision's mobilenet_v3_large at
width 0.5 with a one-channel, stride-1 stem for 8x8 inputs (`assets/digits_mobilenet-v1.pth`,
4.6 MB), the case `quantray tune` is shown on (README, "Recovering lost accuracy"). Both were
trained with the same recipe (Adam 3e-3, batches of 64, 30 epochs, seed 0, one thread) and are
checked against their sha256 on load, so the jobs give the same checkpoints, accuracies and qparams
digests on every machine of the pinned stack. Training is not machine-independent (float kernels
differ between CPUs), which is why the result of one training, on the project's 2-core x86-64
machine, is shipped rather than trained on first use.
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

__all__ = ["DigitsCNN", "digits_cnn", "digits_cnn_relu6", "digits_cnn_spread", "digits_mobilenet", "train", "shipped",
           "save_state", "CHECKPOINTS"]

# factory name -> (architecture, shipped checkpoint, its sha256)
CHECKPOINTS = {
    "digits_cnn": ("digits_cnn-v1.pth", "c8b935c2d3bafb9e08e4e9802e62d7a040eaf30e5c6a2d5b3e48a4c2e5f7c919"),
    "digits_mobilenet": ("digits_mobilenet-v1.pth", "d9035c2913d7818cc5d677afefc9607dcb7b52475a18028ed4b6adcb48f9dcc1"),
}


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


def _mobilenet() -> nn.Module:
    """torchvision's mobilenet_v3_large, width 0.5, 10 classes, its stem made one-channel and
    stride 1 (8x8 digits would otherwise be 4x4 after it)."""
    import torchvision

    model = torchvision.models.mobilenet_v3_large(num_classes=10, width_mult=0.5)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stride=1, padding=stem.padding, bias=False)
    return model


_ARCHITECTURES = {"digits_cnn": DigitsCNN, "digits_mobilenet": _mobilenet}


def _shipped(name: str) -> nn.Module:
    return shipped(*CHECKPOINTS[name], _ARCHITECTURES[name])


def shipped(file: str, sha256: str, build) -> nn.Module:
    """`build()` with the weights of quantray/assets/`file`, checked against `sha256`, in eval mode."""
    payload = resources.files("quantray").joinpath("assets", file).read_bytes()
    if sha256_bytes(payload) != sha256:
        raise QuantrayError(f"quantray/assets/{file}: sha256 differs from the one quantray ships; reinstall quantray")
    model = build()
    model.load_state_dict(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
    return model.eval()


def digits_cnn() -> DigitsCNN:
    """The trained demo CNN, from the checkpoint shipped in the package (sha256 checked)."""
    return _shipped("digits_cnn")


def digits_cnn_relu6() -> DigitsCNN:
    """The trained demo CNN with its ReLU swapped for ReLU6 (FP32 test top-1 96.4%, against 98.9%):
    `jobs/digits_qnnpack_relu6.toml`'s model, on which qnnpack's quantized ReLU6 is wrong on x86 CPUs
    (torch 2.14.1) while the reference quantization is right; the engine check's shipped case."""
    model = _shipped("digits_cnn")
    model.relu = nn.ReLU6()
    return model


def digits_cnn_spread(decades: float = 3.0, seed: int = 0) -> DigitsCNN:
    """The trained demo CNN, the same function with its channels rescaled: `jobs/digits_spread.toml`'s
    model, the case cross-layer equalization is shown on. Through each ReLU (and max pool), output
    channel c of conv1 and of conv2 is multiplied by s_c and the next convolution's input channel c
    divided by it (f(s x) = s f(x) for s > 0), s log-uniform over `decades` (seeded): per-channel
    weight ranges then differ by up to 10^decades, the spread Nagel et al. (2019, Fig. 2) show in
    BN-folded MobileNetV2. FP32 outputs are unchanged up to float rounding; per-tensor INT8 is not."""
    model = _shipped("digits_cnn")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in ((model.conv1, model.conv2), (model.conv2, model.conv3)):
            s = 10 ** ((torch.rand(a.out_channels, generator=generator) - 0.5) * decades)
            a.weight.mul_(s.view(-1, 1, 1, 1))
            a.bias.mul_(s)
            b.weight.div_(s.view(1, -1, 1, 1))
    return model


def digits_mobilenet() -> nn.Module:
    """The trained digits MobileNetV3 (module docstring), from its shipped checkpoint (sha256 checked)."""
    return _shipped("digits_mobilenet")


def train(name: str = "digits_cnn", epochs: int = 30, seed: int = 0) -> tuple[dict, float]:
    """Train one architecture on the digits train split (Adam, batches of 64, one thread); return
    the state_dict and test top-1."""
    from .inputs.data import digits

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = _ARCHITECTURES[name]()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_set, test_set = digits("train"), digits("test")
    x, y = train_set.tensors
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


def save_state(state: dict, path: str) -> tuple[Path, str]:
    """Write a trained state_dict to `path` atomically: (where, its sha256, for CHECKPOINTS)."""
    from .storage.store import Store

    buffer = io.BytesIO()
    torch.save(state, buffer)
    out = Path(path).absolute()
    Store(out.parent, "--train").write(buffer.getvalue(), out.name)
    return out, sha256_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", metavar="OUT", help="train the model here and save its state_dict to OUT")
    parser.add_argument("--model", choices=list(CHECKPOINTS), default="digits_cnn")
    args = parser.parse_args()
    from .inputs.data import digits

    if args.train:
        state, accuracy = train(args.model)
        out, sha256 = save_state(state, args.train)
        print(f"trained {out}: test top-1 {accuracy:.4f}, sha256 {sha256}")
        return
    tx, ty = digits("test").tensors
    for name, (file, sha256) in CHECKPOINTS.items():
        with torch.inference_mode():
            accuracy = (_shipped(name)(tx).argmax(1) == ty).float().mean().item()
        print(f"shipped {file} (sha256 {sha256[:16]}...): test top-1 {accuracy:.4f}")


if __name__ == "__main__":
    main()

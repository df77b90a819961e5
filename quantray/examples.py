"""Shipped models and real data for the tasks beyond classification, their checkpoints shipped as
the demo's are (quantray/demo.py): nothing is downloaded, every number is reproducible.

    python -m quantray.examples                       # check the shipped checkpoints, print their figures
    python -m quantray.examples --train OUT.pth --model diabetes_mlp   # train one again here

`diabetes_mlp()` is `jobs/diabetes_regression.toml`'s model: an MLP (10 -> 64 -> 64 -> 1) on
scikit-learn's diabetes data (442 patients, 10 measurements, disease progression a year on), the
output in the target's own unit. `photo_autoencoder()` is `jobs/photos_agreement.toml`'s: a small
convolutional autoencoder over 32x32 patches of scikit-learn's two sample photos, returning a dict
{"image": reconstruction, "code": bottleneck}; its test set has no labels (the label-free,
INT8-against-FP32 case a nightly refresh on production samples is). `scene_segmenter()` and
`scene_tagger()` are `jobs/scenes_segmentation.toml`'s and `jobs/scenes_multilabel.toml`'s: scenes
of one to three of the shipped digits (`digit_scenes`), segmented per pixel by torchvision's LR-ASPP
on a width-0.5 mobilenet_v3_large (it returns {"out": ...}, as torchvision's segmentation models
do), and tagged with the digits they hold by a small CNN. All read scikit-learn's own data files
without importing scikit-learn; every checkpoint is checked against its sha256. As for the demo,
training is not bit-reproducible across CPUs: the result of one training on the project's 2-core
x86-64 machine is shipped (recipes in `train`, EPOCHS).
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .demo import save_state, shipped
from .inputs.data import sklearn_file

__all__ = ["diabetes", "photo_patches", "DiabetesMLP", "PhotoAutoencoder", "diabetes_mlp", "photo_autoencoder",
           "train", "CHECKPOINTS"]

SPLIT_SEED, TEST_FRACTION = 0, 0.2
PATCH = 32

# factory name -> (shipped checkpoint, its sha256)
CHECKPOINTS = {
    "diabetes_mlp": ("diabetes_mlp-v1.pth", "1186b445281fcfadf34e7d49d1ec40acce4ffc03967dd8256fddfa67e56f795e"),
    "photo_autoencoder": ("photo_autoencoder-v1.pth", "2f32ef4054bfdaea53edf5cfcbff19b051a91052ffc037314aba3700e17809df"),
    "scene_segmenter": ("scene_segmenter-v1.pth", "38c33e03209807f0bf8ac0bc2d402d714eb2f213bdcde01e3a633ef948d0ce0b"),
    "scene_tagger": ("scene_tagger-v1.pth", "0c5c5f4ee854c9abc36d186a924d802d54007cee220701ab8d4de7d06de96d05"),
}


def _split(n: int, split: str) -> torch.Tensor:
    """A fixed split of range(n): 20% test, the rest train, ascending."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(n * TEST_FRACTION)
    return {"test": order[:n_test], "train": order[n_test:], "all": order}[split].sort().values


@functools.lru_cache(maxsize=1)
def _diabetes_raw() -> tuple[torch.Tensor, torch.Tensor]:
    import gzip

    import numpy as np

    with gzip.open(sklearn_file("diabetes_data_raw.csv.gz", "the diabetes source"), "rt") as f:
        x = np.loadtxt(f)
    with gzip.open(sklearn_file("diabetes_target.csv.gz", "the diabetes source"), "rt") as f:
        y = np.loadtxt(f)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1)


def diabetes(split: str = "all") -> TensorDataset:
    """scikit-learn's diabetes data (what `load_diabetes(scaled=False)` reads): 10 measurements per
    patient, standardized with the train split's mean and deviation, and the target (disease
    progression, 25-346) as a (1,) float tensor; 20% test (88 patients) by a fixed seed."""
    x, y = _diabetes_raw()
    train = x[_split(len(x), "train")]
    x = (x - train.mean(0)) / train.std(0)
    chosen = _split(len(x), split)
    return TensorDataset(x[chosen], y[chosen])


@functools.lru_cache(maxsize=1)
def _patches() -> torch.Tensor:
    from PIL import Image

    tiles = []
    for name in ("china.jpg", "flower.jpg"):
        with Image.open(sklearn_file(name, "the photos source", folder="images")) as image:
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            hwc = pixels.reshape(image.height, image.width, 3)
        rows, cols = image.height // PATCH, image.width // PATCH
        grid = hwc[:rows * PATCH, :cols * PATCH].reshape(rows, PATCH, cols, PATCH, 3)
        tiles.append(grid.permute(0, 2, 4, 1, 3).reshape(rows * cols, 3, PATCH, PATCH))
    return torch.cat(tiles).float() / 255.0


class _Inputs(torch.utils.data.Dataset):
    """Inputs alone: samples are tensors with no target (label-free data)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def photo_patches(split: str = "all") -> _Inputs:
    """32x32 RGB patches (values in [0, 1]) of scikit-learn's two sample photos (china.jpg and
    flower.jpg, 427x640 each): 520 patches, 20% test (104) by a fixed seed. No labels."""
    x = _patches()
    return _Inputs(x[_split(len(x), split)])


SCENE_CELL, SCENE_GRID = 16, 3          # a scene: a 3x3 grid of 16x16 cells, 48x48 pixels
SCENES = {"train": 1200, "test": 300}   # drawn from the digits train and test splits respectively
INK, BACKGROUND, IGNORE = 0.3, 0, 255   # mask: digit d is class d + 1 where the pixel is above INK


class _Scenes(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@functools.lru_cache(maxsize=2)
def _scenes(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N, 1, 48, 48), masks (N, 48, 48) int64, present (N, 10) float) for `split`."""
    from .inputs.data import digits

    x, y = digits(split).tensors
    g = torch.Generator().manual_seed(SPLIT_SEED + (split == "test"))
    n, side = SCENES[split], SCENE_CELL * SCENE_GRID
    images = torch.zeros(n, 1, side, side)
    masks = torch.full((n, side, side), BACKGROUND, dtype=torch.int64)
    present = torch.zeros(n, 10)
    for k in range(n):
        count = int(torch.randint(1, 4, (1,), generator=g))
        cells = torch.randperm(SCENE_GRID * SCENE_GRID, generator=g)[:count].tolist()
        picks = torch.randint(0, len(y), (count,), generator=g).tolist()
        for cell, pick in zip(cells, picks):
            digit = x[pick, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)   # 8x8 -> 16x16
            r, c = cell // SCENE_GRID * SCENE_CELL, cell % SCENE_GRID * SCENE_CELL
            images[k, 0, r:r + SCENE_CELL, c:c + SCENE_CELL] = digit
            label = int(y[pick])
            cell_mask = masks[k, r:r + SCENE_CELL, c:c + SCENE_CELL]
            cell_mask[digit > INK] = label + 1
            cell_mask[(digit > 0) & (digit <= INK)] = IGNORE   # faint edges: neither ink nor background
            present[k, label] = 1.0
    return images, masks, present


def digit_scenes(split: str = "train", target: str = "mask") -> _Scenes:
    """Scenes of one to three of scikit-learn's real digits (each 2x upscaled to 16x16, in random cells
    of a 3x3 grid, 48x48 in all), drawn from the digits train split (1,200 scenes) or test split (300),
    a fixed seed each. `target = "mask"`: per-pixel classes (0 background, d + 1 for digit d where
    its ink is above 0.3, 255 at fainter edge pixels); `target = "labels"`: which digits are in the
    scene, as ten 0/1 values."""
    if target not in ("mask", "labels"):
        raise ValueError(f"target = {target!r}: mask or labels")
    images, masks, present = _scenes(split)
    return _Scenes(images, masks if target == "mask" else present)


class _Stages(nn.Module):
    """A MobileNetV3's feature blocks up to `high`, returning {"low": block `low`'s output, "high": the last}."""

    def __init__(self, features: nn.Sequential, low: int, high: int):
        super().__init__()
        self.blocks, self.low = features[:high + 1], low

    def forward(self, x):
        out = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.low:
                out["low"] = x
        out["high"] = x
        return out


def _scene_segmenter() -> nn.Module:
    """torchvision's LR-ASPP (`models.segmentation.LRASPP`, the head of lraspp_mobilenet_v3_large) on
    a mobilenet_v3_large backbone at width 0.5, dilated as torchvision builds it, with a one-channel,
    stride-1 stem for 48x48 scenes; 11 classes (background and ten digits). It returns a dict {"out": ...}."""
    import torchvision
    from torchvision.models.segmentation import LRASPP

    features = torchvision.models.mobilenet_v3_large(width_mult=0.5, dilated=True).features
    stem = features[0][0]
    features[0][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stride=1, padding=stem.padding, bias=False)
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    low, high = stages[-4], stages[-1]   # torchvision's choice: C2 (output stride 8 there, 4 here) and C5
    return LRASPP(_Stages(features, low, high), features[low].out_channels, features[high].out_channels, 11)


class SceneTagger(nn.Module):
    """Which digits are in a 48x48 scene: a small CNN whose features are pooled to the 3x3 grid of
    cells, ten digit logits per cell (a 1x1 convolution), the largest over the cells per digit: ten
    logits, a label on where sigmoid >= 0.5."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.cells = nn.Conv2d(64, 10, 1)
        self.pool = nn.AdaptiveMaxPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(self.cells(self.features(x))), 1)


class DiabetesMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)


class PhotoAutoencoder(nn.Module):
    """3x32x32 -> a 32x8x8 code -> 3x32x32; returns {"image": reconstruction, "code": code}."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.decode = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                                    nn.Upsample(scale_factor=2), nn.Conv2d(16, 3, 3, padding=1), nn.Sigmoid())

    def forward(self, x):
        code = self.encode(x)
        return {"image": self.decode(code), "code": code}


_ARCHITECTURES = {"diabetes_mlp": DiabetesMLP, "photo_autoencoder": PhotoAutoencoder,
                  "scene_segmenter": _scene_segmenter, "scene_tagger": SceneTagger}


def _shipped(name: str) -> nn.Module:
    return shipped(*CHECKPOINTS[name], _ARCHITECTURES[name])


def diabetes_mlp() -> DiabetesMLP:
    """The trained diabetes regressor (module docstring), from its shipped checkpoint."""
    return _shipped("diabetes_mlp")


def photo_autoencoder() -> PhotoAutoencoder:
    """The trained photo-patch autoencoder (module docstring), from its shipped checkpoint."""
    return _shipped("photo_autoencoder")


def scene_segmenter() -> nn.Module:
    """The trained digit-scene LR-ASPP segmenter (`_scene_segmenter`), from its shipped checkpoint."""
    return _shipped("scene_segmenter")


def scene_tagger() -> SceneTagger:
    """The trained digit-scene tagger (multi-label), from its shipped checkpoint."""
    return _shipped("scene_tagger")


EPOCHS = {"diabetes_mlp": 10, "photo_autoencoder": 40, "scene_segmenter": 40, "scene_tagger": 15}  # the diabetes MLP overfits past ~10 (test RMSE 57.7 at 10, 64.1 at 40)


def train(name: str, epochs: int | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Train one model on its train split (Adam 3e-3, batches of 32, MSE, one thread, EPOCHS); return the
    state_dict and its figures on the test split. The regressor learns the standardized target and
    its last layer is then rescaled, so that it outputs the target's own unit."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = _ARCHITECTURES[name]()
    generator = torch.Generator().manual_seed(seed)
    epochs = EPOCHS[name] if epochs is None else epochs
    if name == "diabetes_mlp":
        x, y = diabetes("train").tensors
        mean, std = y.mean(), y.std()
        target = (y - mean) / std
    elif name == "photo_autoencoder":
        x = target = photo_patches("train").x
    else:
        scenes = digit_scenes("train", "mask" if name == "scene_segmenter" else "labels")
        x, target = scenes.x, scenes.y
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            optimizer.zero_grad()
            out = model(x[batch])
            if name == "scene_segmenter":
                loss = nn.functional.cross_entropy(out["out"], target[batch], ignore_index=IGNORE)
            elif name == "scene_tagger":
                loss = nn.functional.binary_cross_entropy_with_logits(out, target[batch])
            else:
                loss = nn.functional.mse_loss(out["image"] if isinstance(out, dict) else out, target[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    if name == "diabetes_mlp":
        with torch.no_grad():
            last = model.net[-1]
            last.weight.mul_(std)
            last.bias.mul_(std).add_(mean)
    return model.state_dict(), _figures(name, model)


def _figures(name: str, model: nn.Module) -> dict:
    with torch.inference_mode():
        if name == "scene_segmenter":
            scenes = digit_scenes("test", "mask")
            keep = scenes.y != IGNORE
            predicted = torch.cat([model(x)["out"].argmax(1) for x in scenes.x.split(100)])
            p, t = predicted[keep], scenes.y[keep]
            iou = [((p == c) & (t == c)).sum().item() / ((p == c) | (t == c)).sum().item() for c in range(11)]
            return {"test_miou": sum(iou) / 11, "test_pixel_accuracy": (p == t).double().mean().item()}
        if name == "scene_tagger":
            scenes = digit_scenes("test", "labels")
            on = model(scenes.x).sigmoid() >= 0.5
            y = scenes.y.bool()
            tp, fp, fn = (on & y).sum().item(), (on & ~y).sum().item(), (~on & y).sum().item()
            return {"test_micro_f1": 2 * tp / (2 * tp + fp + fn)}
        if name == "diabetes_mlp":
            x, y = diabetes("test").tensors
            error = model(x) - y
            return {"test_rmse": error.pow(2).mean().sqrt().item(), "test_mae": error.abs().mean().item()}
        x = photo_patches("test").x
        return {"test_rmse": (model(x)["image"] - x).pow(2).mean().sqrt().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", metavar="OUT", help="train the model here and save its state_dict to OUT")
    parser.add_argument("--model", choices=list(_ARCHITECTURES), default="diabetes_mlp")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    if args.train:
        state, figures = train(args.model, **({"epochs": args.epochs} if args.epochs else {}))
        out, sha256 = save_state(state, args.train)
        print(f"trained {out}: {figures}, sha256 {sha256}")
        return
    for name, (file, sha256) in CHECKPOINTS.items():
        print(f"shipped {file} (sha256 {sha256[:16]}...): {_figures(name, _shipped(name))}")


if __name__ == "__main__":
    main()

"""The image transforms a `transform` preset names, shared by every source that decodes images
(torchvision datasets, ImageFolder, Parquet shards of image files)."""

from __future__ import annotations

__all__ = ["make_transform", "split_transform", "PRESETS", "IMAGENET_MEAN", "IMAGENET_STD"]

PRESETS = ("imagenet_eval", "to_tensor", "none")  # spec.TRANSFORMS (a test pins them)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the seed article has 0.465 for 0.456: a typo
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_transform(preset: str | None):
    """The torchvision transform a `transform` preset names (None for "none")."""
    import torchvision.transforms as T

    if preset not in (None, *PRESETS):
        raise ValueError(f"unknown transform preset {preset!r}; valid: {', '.join(PRESETS)}")
    if preset in (None, "none"):
        return None
    if preset == "to_tensor":
        return T.ToTensor()
    # The seed article's eval transform, with the standard ImageNet mean.
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


_EXACT_MODES = ("L", "RGB")  # PIL modes whose pixels ToTensor turns into uint8 / 255 (loaders give RGB)


def split_transform(preset: str | None):
    """The preset cut where its result is still exact in uint8: `(first, finish)`, with `first` a
    per-image transform (Resize and CenterCrop, then the pixels of an L or RGB image as a uint8
    (C, H, W) tensor) and `finish` a function of one image's or a batch's tensor, so that
    finish(first(image)) is make_transform(preset)(image) bit for bit (ToTensor's division by 255
    and Normalize are elementwise). None for a preset with nothing to cut ("none").
    An image of another mode comes out of `first` as ToTensor makes it (float): `finish` only
    normalizes it, and a decoded store keeps no batch that holds one."""
    import torch
    import torchvision.transforms as T

    if preset in (None, "none"):
        return None
    if preset not in PRESETS:
        raise ValueError(f"unknown transform preset {preset!r}; valid: {', '.join(PRESETS)}")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD) if preset == "imagenet_eval" else None

    def finish(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(dtype=torch.get_default_dtype()).div(255)  # as ToTensor divides
        return normalize(x) if normalize is not None else x

    first = _Pixels() if preset == "to_tensor" else T.Compose([T.Resize(256), T.CenterCrop(224), _Pixels()])
    return first, finish


class _Pixels:
    """An L or RGB image's pixels as a uint8 (C, H, W) tensor; anything else as ToTensor makes it."""

    def __call__(self, pic):
        import torchvision.transforms.functional as F
        from PIL import Image

        if isinstance(pic, Image.Image) and pic.mode in _EXACT_MODES:
            return F.pil_to_tensor(pic)
        return F.to_tensor(pic)

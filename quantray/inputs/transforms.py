"""The image transforms a `transform` preset names, shared by every source that decodes images
(torchvision datasets, ImageFolder, Parquet shards of image files)."""

from __future__ import annotations

__all__ = ["make_transform", "PRESETS", "IMAGENET_MEAN", "IMAGENET_STD"]

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

"""The image transforms a `transform` preset names, shared by every source that decodes images
(torchvision datasets, ImageFolder, Parquet shards of image files)."""

from __future__ import annotations

__all__ = ["make_transform", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the seed article has 0.465 for 0.456: a typo
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_transform(preset: str | None):
    """The torchvision transform a `transform` preset names (None for "none")."""
    import torchvision.transforms as T

    if preset in (None, "none"):
        return None
    if preset == "to_tensor":
        return T.ToTensor()
    # The seed article's eval transform, with the standard ImageNet mean.
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

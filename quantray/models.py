"""Build the FP32 model a job names: a torchvision architecture or a factory, plus a checkpoint."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import SpecError
from .spec import ModelSpec

__all__ = ["build_model", "resolve_callable"]


def build_model(spec: ModelSpec, job_path: Path | str = "job") -> nn.Module:
    """The FP32 model in eval mode, with the checkpoint's weights loaded (`weights_only=True`)."""
    if spec.arch is not None:
        import torchvision

        kwargs = dict(spec.kwargs)
        if spec.num_classes is not None:
            kwargs["num_classes"] = spec.num_classes
        try:
            model = torchvision.models.get_model(spec.arch, weights=None, **kwargs)
        except TypeError as e:
            raise SpecError(f"{job_path}: [model] kwargs: torchvision {spec.arch} rejected them: {e}") from None
    else:
        fn = resolve_callable(spec.factory, f"{job_path}: [model] factory")
        model = fn(**spec.kwargs)
        if not isinstance(model, nn.Module):
            raise SpecError(f"{job_path}: [model] factory = {spec.factory!r} returned "
                            f"{type(model).__name__}, expected a torch.nn.Module")
    if spec.checkpoint is not None:
        _load_checkpoint(model, spec.checkpoint, job_path)
    return model.eval()


def resolve_callable(ref: str, where: str):
    """Import `package.module:function`; the current directory is importable, as with `python -m`."""
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"{where} = {ref!r}: cannot import {module_name!r} ({e}); "
                        "is it installed or in the current directory?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"{where} = {ref!r}: {module_name!r} has no callable {attr!r}")
    return fn


def _load_checkpoint(model: nn.Module, path: Path, job_path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of code, a truncated file, not a torch file at all
        raise SpecError(f"{job_path}: [model] checkpoint = {str(path)!r}: cannot load as a state_dict "
                        f"with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model_state_dict": ...}.
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise SpecError(f"{job_path}: [model] checkpoint = {str(path)!r}: holds a {type(state).__name__}, "
                        "expected a state_dict (save it with torch.save(model.state_dict(), path))")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        first = next((l.strip() for l in str(e).splitlines() if "size mismatch" in l), str(e).splitlines()[0])
        raise SpecError(f"{job_path}: [model] checkpoint = {str(path)!r} does not fit the model: {first[:300]} "
                        "(check arch and num_classes)") from None
    if result.missing_keys or result.unexpected_keys:
        raise SpecError(f"{job_path}: [model] checkpoint = {str(path)!r} does not fit the model: "
                        f"missing {_few(result.missing_keys)}, unexpected {_few(result.unexpected_keys)} "
                        "(check arch and num_classes)")


def _few(keys) -> str:
    keys = list(keys)
    return "none" if not keys else ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

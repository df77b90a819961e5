"""Build the FP32 model a job names: a torchvision architecture or a factory, plus a checkpoint."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import SpecError
from ..spec import ModelSpec, suggest

__all__ = ["build_model", "check_model", "resolve_callable", "call_user"]


def build_model(spec: ModelSpec, job_path: Path | str = "job") -> nn.Module:
    """The FP32 model in eval mode, with the checkpoint's weights loaded (`weights_only=True`).
    It is built under `torch.manual_seed(spec.seed)` (the caller's random state is left as it was),
    so a model without a checkpoint has the same weights on every run."""
    check_model(spec, f"{job_path}: [model]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = _construct(spec, job_path)
    if spec.checkpoint is not None:
        _load_checkpoint(model, spec.checkpoint, job_path)
    return model.eval()


def check_model(spec: ModelSpec, where: str) -> None:
    """What a ModelSpec cannot check without torch: that `arch` names a torchvision architecture.
    `where` ("JOB: [model]") starts the error line."""
    if spec.arch is None:
        return
    import torchvision

    archs = torchvision.models.list_models()
    if spec.arch not in archs:
        raise SpecError(f"{where} arch = {spec.arch!r}: unknown torchvision architecture{suggest(spec.arch, archs)}; "
                        f"valid: any name in torchvision.models.list_models() ({len(archs)} names, e.g. resnet18, "
                        "resnet50, mobilenet_v3_large)")


def _construct(spec: ModelSpec, job_path) -> nn.Module:
    if spec.arch is not None:
        import torchvision

        kwargs = dict(spec.kwargs)
        if spec.num_classes is not None:
            kwargs["num_classes"] = spec.num_classes
        try:
            return torchvision.models.get_model(spec.arch, weights=None, **kwargs)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{job_path}: [model] kwargs: torchvision {spec.arch} rejected them: {_line(e)}") from None
    fn = resolve_callable(spec.factory, f"{job_path}: [model] factory")
    model = call_user(fn, spec.kwargs, f"{job_path}: [model] factory = {spec.factory!r}")
    if not isinstance(model, nn.Module):
        raise SpecError(f"{job_path}: [model] factory = {spec.factory!r} returned "
                        f"{type(model).__name__}, expected a torch.nn.Module")
    return model


def call_user(fn, kwargs: dict, where: str):
    """Call a user's factory; whatever it raises becomes one line naming it (exit 2: the job's input)."""
    try:
        return fn(**kwargs)
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"{where} raised {type(e).__name__}: {_line(e)}; fix the factory or its kwargs") from None


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
    where = f"{job_path}: [model] checkpoint = {str(path)!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of code, a truncated file, not a torch file at all
        raise SpecError(f"{where}: {_unreadable(e)}; save the weights with torch.save(model.state_dict(), path) "
                        "and point checkpoint at that file") from None
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


def _unreadable(error: Exception) -> str:
    """What a checkpoint that weights-only loading refused holds, as far as its error tells."""
    text = _plain(str(error))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:  # the first object weights-only loading would not unpickle
        return (f"holds a pickled {found.group(1)} object, not just weights (saved with torch.save(model) or with "
                "other objects), which weights-only loading refuses for safety: unpickling it can run code")
    if isinstance(error, pickle.UnpicklingError):  # e.g. "Unsupported operand": not written by torch.save
        return ("holds a pickle that weights-only loading refuses for safety (written by pickle.dump rather than "
                "torch.save, or holding Python objects or code besides tensors: unpickling it can run code)")
    if "TorchScript archive" in text:
        return "is a TorchScript archive (torch.jit.save), not a state_dict"
    return f"not a readable torch file ({type(error).__name__}: {_line(error).split('. ')[0][:160]})"


def _plain(text: str) -> str:
    """`text` without terminal colour codes (torch's weights_only message has them)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _line(error: BaseException) -> str:
    text = _plain(str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _few(keys) -> str:
    keys = list(keys)
    return "none" if not keys else ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

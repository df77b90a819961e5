"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): data-free and exact.

    model, done = equalize(fp32)    # a GraphModule computing what fp32 does; done: what was changed

BatchNorm is folded into the convolution before it first (`torch.fx.experimental.optimization.fuse`,
as `prepare_fx` would fold it). Then each pair of layers A -> B (Conv1d/2d/3d or Linear) joined only
through positively homogeneous, channel-wise steps (ReLU, LeakyReLU, max and average pooling,
Identity, Dropout: f(s x) = s f(x) for s > 0) is rescaled per channel c: A's output channel c (its
weights and bias) divided by s_c, B's input channel c multiplied by s_c, with
s_c = sqrt(r_A[c] / r_B[c]) where r are the channels' largest absolute weights. Both ranges become
sqrt(r_A r_B): per-tensor weight quantization then wastes no levels on a channel whose weights are
small. The model computes the same function, up to float rounding. Pairs that share a layer (a
chain) are swept again until no scale moves by more than `TOLERANCE`. ReLU6 and hardswish are not
homogeneous (they clip): pairs through them are left alone, and the result says so.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

__all__ = ["equalize", "TOLERANCE"]

TOLERANCE = 1e-6
_SWEEPS = 50
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                        nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)
_HOMOGENEOUS_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.nn.functional.leaky_relu,
                          torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
                          torch.nn.functional.adaptive_avg_pool2d, operator.getitem)
_CLIPPING = (nn.ReLU6, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh)


def equalize(model: nn.Module) -> tuple[fx.GraphModule, dict]:
    """The equalized copy of `model` (a GraphModule; `model` is untouched) and what was done:
    {"pairs": [[A, B], ...], "folded_batchnorm": n, "sweeps": n, "skipped": [why, ...]}."""
    from torch.fx.experimental.optimization import fuse

    from .tracing import without_stack_traces

    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with without_stack_traces():
        folded = fuse(copy.deepcopy(model).eval())
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    pairs, skipped = _pairs(folded)
    sweeps = 0
    with torch.no_grad():
        for sweeps in range(1, _SWEEPS + 1):
            moved = max((_equalize_pair(folded.get_submodule(a), folded.get_submodule(b)) for a, b in pairs), default=0.0)
            if moved < TOLERANCE:
                break
    return folded, {"pairs": [list(p) for p in pairs], "folded_batchnorm": before - after,
                    "sweeps": sweeps if pairs else 0, "skipped": skipped}


def _pairs(model: fx.GraphModule) -> tuple[list[tuple[str, str]], list[str]]:
    """(A, B) module names joined only through homogeneous single-user steps, in graph order; and,
    for people, the layer pairs left alone because a clipping activation sits between them."""
    pairs, skipped = [], []
    for node in model.graph.nodes:
        if not _is_layer(model, node):
            continue
        current, clipped = node, None
        while len(current.users) == 1:
            (user,) = current.users
            if _is_layer(model, user):
                a, b = model.get_submodule(node.target), model.get_submodule(user.target)
                if clipped is None and _channels_out(a) == _channels_in(b):
                    pairs.append((node.target, user.target))
                elif clipped is not None:
                    skipped.append(f"{node.target} -> {user.target}: through {clipped}, which clips")
                break
            if _homogeneous(model, user):
                current = user
                continue
            if clipped is None and user.op == "call_module" and isinstance(model.get_submodule(user.target), _CLIPPING):
                clipped, current = type(model.get_submodule(user.target)).__name__, user
                continue
            break
    return pairs, skipped


def _is_layer(model: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(model.get_submodule(node.target), _LAYERS)


def _homogeneous(model: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS and node.target is not operator.getitem
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _channels_out(layer: nn.Module) -> int:
    return layer.weight.shape[0]


def _channels_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _input_view(layer: nn.Module) -> torch.Tensor:
    """B's weight as [groups, out per group, in per group, *kernel]: input channel c is (c // in_g, c % in_g)."""
    w = layer.weight
    groups = 1 if isinstance(layer, nn.Linear) else layer.groups
    return w.view(groups, w.shape[0] // groups, *w.shape[1:])


def _equalize_pair(a: nn.Module, b: nn.Module) -> float:
    """Rescale A's output channels and B's input channels to equal ranges; the largest |s - 1|."""
    out_dims = tuple(range(1, a.weight.dim()))
    range_a = a.weight.abs().amax(dim=out_dims)
    view = _input_view(b)
    range_b = view.abs().amax(dim=(1, *range(3, view.dim()))).reshape(-1)
    s = torch.where((range_a > 0) & (range_b > 0), torch.sqrt(range_a / range_b.clamp_min(1e-30)), torch.ones_like(range_a))
    a.weight.div_(s.view(-1, *[1] * (a.weight.dim() - 1)))
    if a.bias is not None:
        a.bias.div_(s)
    groups = view.shape[0]
    view.mul_(s.view(groups, 1, -1, *[1] * (view.dim() - 3)))
    return float((s - 1).abs().max())

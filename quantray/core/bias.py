"""Bias correction: each quantized layer's mean output error from its weights, folded into its bias.

    sums = InputSums(prepared)                       # on a worker
    with sums.recording() as batch: prepared(x)      # per calibration batch: {layer: (sum, count)}
    total = merge_sums(per_batch_in_batch_order)     # on the driver
    done = correct_biases(int8, prepared, total)     # after convert_fx: biases corrected in place

A conv or linear layer with FP32 weights W computes y = W * x + b; with its quantized weights Wq the
INT8 layer computes W * x + b - (W - Wq) * x, off by E[(W - Wq) * x] on average, per output channel.
That mean is linear in x, so it needs of the calibration data only S, the sum over every sample and
output position of the input patch each weight meets (for a linear layer, the sum of its inputs),
and the count of positions: correction[c] = sum over (i, k) of (W - Wq)[c, i, k] S[i, k] / count.
S does not depend on how weights are quantized: one calibration serves per-tensor and per-channel
trials alike. Sums are float64 per batch (each batch is computed whole by one worker, with the
same thread count everywhere), added on the driver in batch order: the merged sums, and the
corrected biases, are the same bits for any worker count, shard order or batch order. Inputs are
the FP32 values the calibration forward sees (the observers are identities then), as in the
classic empirical correction with FP32 upstream layers. Pure torch: no Ray.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["InputSums", "merge_sums", "correct_biases", "corrected_layers"]

_CHUNK_BYTES = 64 << 20  # an unfolded chunk of inputs at most


def _float_layer(module: nn.Module) -> nn.Module | None:
    """The float Conv1d/Conv2d/Linear a prepared module is or holds first (fused: ConvReLU2d[0])."""
    inner = module[0] if isinstance(module, nn.Sequential) and len(module) else module
    if isinstance(inner, (nn.Conv1d, nn.Conv2d)) and inner.padding_mode == "zeros":
        return inner
    return inner if isinstance(inner, nn.Linear) else None


def corrected_layers(prepared: fx.GraphModule) -> dict[str, nn.Module]:
    """The layers whose input sums are gathered: call_module targets of the prepared graph whose
    module is (or starts with) a Conv1d/Conv2d with zero padding or a Linear."""
    out = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target not in out:
            layer = _float_layer(prepared.get_submodule(node.target))
            if layer is not None:
                out[node.target] = layer
    return out


def _patch_sum(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """S (float64) and the count of output positions for one batch of `layer`'s input."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return rows.double().sum(0), rows.shape[0]
    if isinstance(layer, nn.Conv1d):  # as a 2-d convolution of height 1
        x = x.unsqueeze(2)
        kernel, dilation, padding, stride = ((1, layer.kernel_size[0]), (1, layer.dilation[0]), (0, layer.padding[0]),
                                             (1, layer.stride[0]))
    else:
        kernel, dilation, padding, stride = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    if isinstance(padding, str):  # "same" / "valid": the padding torch computes for them
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)) if padding == "same" else (0, 0)
    per_sample = x[0].numel() * 8 * kernel[0] * kernel[1]
    step = max(1, _CHUNK_BYTES // max(1, per_sample))
    total, count = None, 0
    for chunk in x.split(step):  # fixed chunks of a fixed batch: the same order of additions every time
        patches = F.unfold(chunk.double(), kernel, dilation=dilation, padding=padding, stride=stride)
        part = patches.sum((0, 2))
        total = part if total is None else total + part
        count += patches.shape[0] * patches.shape[2]
    return total.view(x.shape[1], *kernel), count


class InputSums:
    """Forward pre-hooks on the prepared model's layers that sum their inputs' patches while recording."""

    def __init__(self, prepared: fx.GraphModule):
        self.layers = corrected_layers(prepared)
        self._batch: dict | None = None
        for name, layer in self.layers.items():
            prepared.get_submodule(name).register_forward_pre_hook(self._hook(name, layer))

    def _hook(self, name: str, layer: nn.Module):
        def hook(module, args):
            if self._batch is not None and name not in self._batch:  # a module called twice: its first call
                self._batch[name] = _patch_sum(layer, args[0])
        return hook

    @contextlib.contextmanager
    def recording(self):
        """Yields the batch's {layer: (S, count)}, filled by the forward run inside."""
        self._batch = {}
        try:
            yield self._batch
        finally:
            self._batch = None


def merge_sums(batches) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-batch sums, given in batch order, added in that order."""
    total: dict[str, list] = {}
    for batch in batches:
        for name, (s, n) in batch.items():
            if name in total:
                total[name][0] = total[name][0] + s
                total[name][1] += n
            else:
                total[name] = [s.clone(), n]
    return {name: (s, n) for name, (s, n) in total.items()}


def correct_biases(int8: fx.GraphModule, prepared: fx.GraphModule, sums: dict) -> dict:
    """Add each quantized conv/linear layer's mean weight-quantization error (module docstring) to
    its bias, in place. Returns {"layers": n, "mean_abs_correction": x, "not_corrected": [why]}."""
    import torch.ao.nn.quantized as nnq

    corrected, sizes, skipped = 0, [], []
    floats = corrected_layers(prepared)
    for name, module in int8.named_modules():
        if not isinstance(module, (nnq.Conv1d, nnq.Conv2d, nnq.Linear)):
            continue
        if name not in sums or name not in floats:
            skipped.append(f"{name}: no input sums (a layer the calibration did not see)")
            continue
        s, count = sums[name]
        if count == 0:
            continue
        w = floats[name].weight.detach().double()
        delta = w - module.weight().dequantize().double()
        if isinstance(module, nnq.Linear):
            correction = delta @ s / count
        else:
            groups = module.groups
            out_g, in_g = delta.shape[0] // groups, delta.shape[1]
            if delta.dim() == 3:  # Conv1d: S was taken as height 1
                delta = delta.unsqueeze(2)
            d = delta.reshape(groups, out_g, in_g, -1)
            correction = torch.einsum("goik,gik->go", d, s.reshape(groups, in_g, -1)).reshape(-1) / count
        bias = module.bias()
        new = correction.float() if bias is None else bias.detach() + correction.float()
        module.set_weight_bias(module.weight(), new)
        corrected += 1
        sizes.append(float(correction.abs().mean()))
    return {"layers": corrected, "mean_abs_correction": sum(sizes) / len(sizes) if sizes else 0.0,
            "not_corrected": skipped}

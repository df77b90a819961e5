"""Per-layer diagnostics: where does INT8 lose accuracy? SQNR of each quantized layer's output.

    result = LayerLogger(fp32, int8_graph).log(x, batch)[1]      # on a worker, per batch
    rows = layer_rows(merge_layers([result, ...]))                # on the driver

torch's Numeric Suite (`torch.ao.ns._numeric_suite_fx`) pairs each quantized node of the converted
graph with the FP32 subgraph it replaced (conv+bn+relu with ConvReLU2d, add+relu with add_relu,
...) and logs both outputs. Both models see the same input, so the error is the error that has
built up to that layer, as the logits' SQNR is for the whole model. Per batch, in float64, we keep
the FP32 output's energy (signal) and that of INT8 minus FP32 (noise); the driver sums batches in
batch order, so the result does not depend on how batches were spread over workers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..inputs import data as data_mod

__all__ = ["LayerResult", "LayerLogger", "layer_errors", "merge_layers", "layer_rows", "isolated_errors"]


@dataclass
class LayerResult:
    """`layers`: (name, module, fp32 type, int8 type, quantized) in graph order (module: the INT8
    module's qualified name, "" for a function such as add_relu; quantized: whether the INT8
    model's output there is a quantized tensor, False for a layer the qconfig kept in FP32); `batches`: the first sample index of
    each batch; `signal[b][l]`, `noise[b][l]`: float64 sums for batch b and layer l."""

    layers: list[tuple[str, str, str, str, bool]] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    signal: list[list[float]] = field(default_factory=list)
    noise: list[list[float]] = field(default_factory=list)


class LayerLogger:
    """Both models with loggers on every paired layer output (torch's Numeric Suite); `log` runs
    one batch through both and returns the FP32 logits (the logged FP32 model computes exactly
    the FP32 model's outputs) with that batch's per-layer result."""

    def __init__(self, fp32: torch.nn.Module, int8: torch.fx.GraphModule):
        import torch.ao.ns._numeric_suite_fx as ns

        from .tracing import TURNS, without_stack_traces

        self._modules = {n.name: str(n.target) for n in int8.graph.nodes if n.op == "call_module"}
        with TURNS.alone(), without_stack_traces(), _fusions_listed_once():  # add_loggers traces both models with FX
            self._fp32, self._int8 = ns.add_loggers("fp32", fp32, "int8", int8, _copying_logger())

    def log(self, x: torch.Tensor, batch: list[int]) -> tuple[torch.Tensor, LayerResult]:
        import torch.ao.ns._numeric_suite_fx as ns

        with torch.inference_mode():
            logits = self._fp32(x)
            self._int8(x)
            info = ns.extract_logger_info(self._fp32, self._int8, ns.OutputLogger, "int8")
            layers, signal, noise = [], [], []
            for name, entry in info.items():
                pair = entry.get("node_output", {})
                if not pair.get("fp32") or not pair.get("int8"):
                    continue
                ref, out = pair["fp32"][0], pair["int8"][0]
                a, b = _tensor(ref["values"]), _tensor(out["values"])
                if a is None or b is None or a.shape != b.shape:
                    continue
                layers.append((name, self._modules.get(out["ref_node_name"], ""), _short(ref["ref_node_target_type"]),
                               _short(out["ref_node_target_type"]), out["values"][0].is_quantized))
                signal.append(float((a ** 2).sum()))
                noise.append(float(((b - a) ** 2).sum()))
            for logger in (*_loggers(self._fp32), *_loggers(self._int8)):
                logger.stats.clear()
        return logits, LayerResult(layers, [batch[0]], [len(batch)], [signal], [noise])


_FUSIONS: list = []


@contextlib.contextmanager
def _fusions_listed_once():
    """torch's graph matcher rebuilds the list of fusion patterns (from the default backend config,
    the same list every time) for each node it matches: 288 times, 2.5 s of the 3.7 s that pairing
    mobilenet_v2's layers took here. The list is built once per process and handed out while
    add_loggers runs; nothing else is changed, and the pairs found are the same."""
    from torch.ao.ns.fx import graph_matcher, pattern_utils

    if not _FUSIONS:
        _FUSIONS.extend(pattern_utils.get_reversed_fusions())
    rebuilding = graph_matcher.get_reversed_fusions
    graph_matcher.get_reversed_fusions = lambda: _FUSIONS
    try:
        yield
    finally:
        graph_matcher.get_reversed_fusions = rebuilding


def _copying_logger():
    """torch's OutputLogger keeps the tensor it is given, which the next module may then overwrite
    in place (Hardswish(inplace=True) after a conv: the conv's logged output became the activation's,
    -0.7 dB on digits_mobile's first conv); this one keeps a copy."""
    import torch.ao.ns._numeric_suite_fx as ns

    class CopyingLogger(ns.OutputLogger):
        def forward(self, x):
            if self.enabled and self.save_activations and isinstance(x, torch.Tensor):
                self.stats.append(x.detach().clone())
                return x
            return super().forward(x)

    return CopyingLogger


def layer_errors(fp32: torch.nn.Module, int8: torch.fx.GraphModule, dataset, batches: list[list[int]]) -> LayerResult:
    """`LayerLogger` over `batches` of `dataset`, merged."""
    logger = LayerLogger(fp32, int8)
    return merge_layers(logger.log(data_mod.load_batch(dataset, batch)[0], batch)[1] for batch in batches)


def _tensor(values) -> torch.Tensor | None:
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        return None
    t = values[0]
    return (t.dequantize() if t.is_quantized else t).double()


def _loggers(model):
    import torch.ao.ns._numeric_suite_fx as ns

    return [m for m in model.modules() if isinstance(m, ns.OutputLogger)]  # the copying subclass too


def _short(target_type: str) -> str:
    """'torch.ao.nn.intrinsic.quantized.modules.conv_relu.ConvReLU2d' -> 'quantized ConvReLU2d'."""
    base = target_type.rsplit(".", 1)[-1]
    return f"quantized {base}" if ".quantized." in target_type and "." in target_type else base


def merge_layers(results) -> LayerResult:
    """Gather every worker's batches in batch order (first sample index)."""
    results = [r for r in results if r.batches]
    merged = LayerResult(layers=results[0].layers if results else [])
    rows = sorted((b, n, s, e) for r in results for b, n, s, e in zip(r.batches, r.samples, r.signal, r.noise))
    if len({row[0] for row in rows}) != len(rows):
        raise ValueError("a batch was diagnosed by more than one worker")
    if any(r.layers != merged.layers for r in results):
        raise ValueError("workers logged different layers")
    for b, n, s, e in rows:
        merged.batches.append(b)
        merged.samples.append(n)
        merged.signal.append(s)
        merged.noise.append(e)
    return merged


def layer_rows(merged: LayerResult) -> list[dict]:
    """One row per paired layer in graph order (layers kept in FP32 too: error reaches them from
    upstream, `quantized` says which is which): sums over every batch (in batch order) and SQNR in dB
    (None where INT8 equals FP32 exactly)."""
    rows = []
    samples = sum(merged.samples)
    for k, (name, module, fp32_type, int8_type, quantized) in enumerate(merged.layers):
        signal = math.fsum(b[k] for b in merged.signal)
        noise = math.fsum(b[k] for b in merged.noise)
        rows.append({"position": k, "layer": name, "module": module, "fp32_type": fp32_type, "int8_type": int8_type,
                     "quantized": quantized, "samples": samples, "signal": signal, "noise": noise,
                     "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else None})
    return rows


class _SkipObservers(torch.fx.Interpreter):
    """The prepared model's FP32 forward with its observers as identities (their state untouched)."""

    def call_module(self, target, args, kwargs):
        from torch.ao.quantization.observer import ObserverBase

        module = self.fetch_attr(target)
        if isinstance(module, ObserverBase):
            return args[0]
        return super().call_module(target, args, kwargs)


def isolated_errors(prepared: torch.fx.GraphModule, int8: torch.fx.GraphModule, x: torch.Tensor,
                    names: list[str]) -> dict[str, tuple[float, float]]:
    """Each named quantized layer alone: its INT8 module on the FP32 input (quantized with the scale
    and zero point the INT8 model gives that input) against the FP32 output, for batch `x`:
    {name: (signal, noise)}, float64 sums. The prepared model (its modules fused as the INT8 model's
    are) gives the FP32 inputs and outputs of the same modules; error from upstream layers is not in
    it, which is what a search needs to rank layers in one pass."""
    int8_modules, fp32_modules = dict(int8.named_modules()), dict(prepared.named_modules())
    names = [n for n in names if n in int8_modules and n in fp32_modules]
    qparams, captured, hooks = {}, {}, []

    def input_qparams(name):
        def hook(module, args):
            if _is_quantized(args[0]):
                qparams.setdefault(name, (args[0].q_scale(), args[0].q_zero_point(), args[0].dtype))
        return hook

    def fp32_input(name):
        def hook(module, args):
            captured.setdefault(name, [args[0].detach().clone()])
        return hook

    def fp32_output(name):
        def hook(module, args, out):
            if len(captured.get(name, ())) == 1:
                captured[name].append(out.detach().clone())
        return hook

    for name in names:
        hooks.append(int8_modules[name].register_forward_pre_hook(input_qparams(name)))
        hooks.append(fp32_modules[name].register_forward_pre_hook(fp32_input(name)))
        hooks.append(fp32_modules[name].register_forward_hook(fp32_output(name)))
    try:
        with torch.inference_mode():
            int8(x)
            _SkipObservers(prepared).run(x)
            out = {}
            for name in names:
                if name not in qparams or len(captured.get(name, ())) != 2:
                    continue
                x_fp, y_fp = captured[name]
                y = int8_modules[name](torch.quantize_per_tensor(x_fp, *qparams[name]))
                y = y.dequantize() if y.is_quantized else y
                a, b = y_fp.double(), y.double()
                out[name] = (float((a ** 2).sum()), float(((b - a) ** 2).sum()))
    finally:
        for h in hooks:
            h.remove()
    return out


def _is_quantized(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_quantized and t.qscheme() == torch.per_tensor_affine

"""The engine check: do the INT8 kernels compute what the quantization says they should?

    check = EngineCheck(int8)                        # on a worker, once per INT8 model
    result = check.run(x, batch, labels)             # one batch -> EngineResult
    verdict = engine_verdict(merge_engine([...]), backend)   # on the driver: a dict for metrics.json

Every node of the INT8 graph whose output is a per-tensor quantized tensor and that has a reference
here (convolutions, linear layers, batch norms, activations, add/mul, and the float ops FX leaves
to run on quantized tensors: pooling, flatten, cat, view ...) is run twice on
the same input, the engine's input to that node (on the first `CHECK_SAMPLES` samples of the
first test batch): once by the engine (the quantized kernel), once as
torch's reference quantized model defines it (`torch.ao.nn.quantized.reference`: dequantize, the
float op with the dequantized INT8 weights, quantize with the node's own output scale and zero
point). Both end in integers on the same grid, so they are compared in quantization steps.

Two correct implementations round at most once each: they may differ by one step, never by two.
Measured on torch 2.14.1 (this x86 CPU, 64 digits samples): the digits CNN, the digits MobileNetV3,
mobilenet_v2 and resnet18, under both the x86 and the qnnpack engines, every checked node of every
healthy kernel differed by at most 1 step, on at most 0.15% of its elements. qnnpack's ReLU6 here
differed by up to 131 steps on 71% of its elements (INT8 top-1 10.9% against the reference's
91.9%). A node is called a fault when more than `FAULT_FRACTION` of its elements differ by
`FAULT_STEPS` or more. Where the check finds a fault on a batch, the worker also runs the
reference forward whole (each checked node's output replaced by its reference) to give the
reference's top-1 beside the engine's. Pure torch: no Ray.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["EngineCheck", "EngineResult", "merge_engine", "engine_rows", "engine_verdict", "FAULT_STEPS",
           "FAULT_FRACTION", "CHECK_SAMPLES"]

FAULT_STEPS = 2          # rounding explains a difference of one step (module docstring)
FAULT_FRACTION = 1e-3    # of a node's output elements, over every checked batch
CHECK_SAMPLES = 8        # of a batch, node by node: a faulty kernel is wrong on every sample


@dataclass
class EngineResult:
    """`layers`: (node, module, type) of each checked node in graph order (module: the INT8 module's
    qualified name, "" for a function); per batch (first sample index, samples) and per layer: output
    elements, elements `FAULT_STEPS` or more steps off, the most steps off, and the sums of the
    reference's squared integers (signal) and of engine minus reference, squared (noise), in
    quantization steps (exact integers). `reference`: per batch that
    ran it, (samples, reference top-1 correct, engine top-1 correct). `unchecked`: the types of
    quantized nodes with no reference here."""

    layers: list[tuple[str, str, str]] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    elements: list[list[int]] = field(default_factory=list)
    off: list[list[int]] = field(default_factory=list)
    worst: list[list[int]] = field(default_factory=list)
    signal: list[list[int]] = field(default_factory=list)
    noise: list[list[int]] = field(default_factory=list)
    reference: list[tuple[int, int, int] | None] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)


def _relu_if(fused: bool, y: torch.Tensor) -> torch.Tensor:
    return F.relu(y) if fused else y


def _module_reference(module: nn.Module, x: torch.Tensor):
    """The float computation a quantized module stands for, on the dequantized input; None: no reference."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    convs = {nnq.Conv1d: F.conv1d, nnq.Conv2d: F.conv2d, nnq.Conv3d: F.conv3d}
    for cls, conv in convs.items():
        if isinstance(module, cls):
            if module.padding_mode != "zeros":
                return None
            fused = isinstance(module, (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d))
            return _relu_if(fused, conv(x, module.weight().dequantize(), module.bias(), module.stride, module.padding,
                                        module.dilation, module.groups))
    if isinstance(module, nnq.Linear):
        return _relu_if(isinstance(module, nniq.LinearReLU), F.linear(x, module.weight().dequantize(), module.bias()))
    if isinstance(module, (nnq.BatchNorm2d, nnq.BatchNorm3d)):
        y = F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps)
        return _relu_if(isinstance(module, (nniq.BNReLU2d, nniq.BNReLU3d)), y)
    activations = {nnq.ReLU6: F.relu6, nnq.Dropout: lambda t: t, nnq.Hardswish: F.hardswish, nnq.Sigmoid: torch.sigmoid,
                   nnq.ELU: lambda t: F.elu(t, module.alpha),
                   nnq.LeakyReLU: lambda t: F.leaky_relu(t, module.negative_slope)}
    for cls, fn in activations.items():
        if type(module) is cls:
            return fn(x)
    if type(module).__module__.startswith("torch.nn.modules"):  # a float module run on quantized tensors
        return module(x)
    return None


def _function_reference(target, args, kwargs):
    """The float computation of a quantized function node (the engine's arguments), or None."""
    q = torch.ops.quantized
    pairs = {q.add: (operator.add, False), q.add_relu: (operator.add, True),
             q.mul: (operator.mul, False), q.mul_relu: (operator.mul, True)}
    if target in pairs and _quantized(args[0]) and _quantized(args[1]):
        op, relu = pairs[target]
        return _relu_if(relu, op(args[0].dequantize(), args[1].dequantize()))
    if target in pairs:
        return None
    if getattr(target, "__module__", None) in ("torch", "torch.nn.functional", "torch._C._nn", "torch.functional") \
            or target is torch.cat:  # a float op run on quantized tensors (flatten, pooling, cat ...)
        return target(*fx.node.map_aggregate(args, _dequantized), **kwargs)
    return None


def _dequantized(value):
    return value.dequantize() if _quantized(value) else value


def _quantized(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_quantized and t.qscheme() == torch.per_tensor_affine


class _Checker(fx.Interpreter):
    """Runs the INT8 graph node by node; at each checkable node, the reference on the same input.
    With `propagate`, a checked node's output is its reference's (the reference forward)."""

    def __init__(self, module: fx.GraphModule, propagate: bool = False):
        super().__init__(module)
        self.propagate = propagate
        self.found: dict[str, tuple] = {}
        self.unchecked: set[str] = set()

    def run_node(self, node: fx.Node):
        if node.op == "call_function" and node.target in (torch.quantize_per_tensor, torch.quantize_per_channel):
            return super().run_node(node)  # the input's quantization: what the reference starts from
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        try:
            reference = self._reference(node, args, kwargs)
        except Exception:  # an op whose float form will not take these arguments: left unchecked
            reference = None
        out = getattr(self, node.op)(node.target, args, kwargs)  # after: a module may work in place
        if not _quantized(out) or node.op not in ("call_module", "call_function", "call_method"):
            return out
        if not isinstance(reference, torch.Tensor) or reference.shape != out.shape:
            self.unchecked.add(_type_name(self.module, node))
            return out
        expected = torch.quantize_per_tensor(reference.float(), out.q_scale(), out.q_zero_point(), out.dtype)
        if self.propagate:
            return expected
        # Now, not after the run: the next node may overwrite `out` in place (ReLU6(inplace=True)).
        # Both are on one grid (same scale and zero point): in integer steps, every sum is exact, and
        # the SQNR of engine against reference is that of their integers (the scale cancels).
        ref = expected.int_repr().to(torch.int16)
        diff = out.int_repr().to(torch.int16) - ref
        steps = diff.abs()
        ref = ref.to(torch.int32) - out.q_zero_point()
        diff = diff.to(torch.int32)
        self.found[node.name] = (node, steps.numel(), int((steps >= FAULT_STEPS).sum()),
                                 int(steps.max()) if steps.numel() else 0,
                                 int(torch.sum(ref * ref, dtype=torch.int64)), int(torch.sum(diff * diff, dtype=torch.int64)))
        return out


    def _reference(self, node: fx.Node, args, kwargs):
        if node.op == "call_module" and args and _quantized(args[0]):
            return _module_reference(self.module.get_submodule(node.target), args[0].dequantize())
        if node.op == "call_function":
            return _function_reference(node.target, args, kwargs)
        if node.op == "call_method" and args and _quantized(args[0]) and node.target != "dequantize":
            return getattr(args[0].dequantize(), node.target)(*fx.node.map_aggregate(args[1:], _dequantized), **kwargs)
        return None


def _type_name(module: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(module.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


class EngineCheck:
    """The INT8 model's engine against its reference, per batch (module docstring)."""

    def __init__(self, int8: fx.GraphModule):
        self._int8 = int8

    def run(self, x: torch.Tensor, batch: list[int], labels: torch.Tensor | None = None) -> EngineResult:
        """Node by node on the batch's first `CHECK_SAMPLES` samples; on a fault, the reference
        forward (and the engine's) on the whole batch, for their top-1."""
        checker = _Checker(self._int8)
        with torch.inference_mode():
            checker.run(x[:CHECK_SAMPLES])
        result = EngineResult(batches=[batch[0]], samples=[min(len(batch), CHECK_SAMPLES)],
                              unchecked=sorted(checker.unchecked))
        keys = ("elements", "off", "worst", "signal", "noise")
        row = {k: [] for k in keys}
        for name, (node, *figures) in checker.found.items():
            result.layers.append((name, str(node.target) if node.op == "call_module" else "", _type_name(self._int8, node)))
            for k, value in zip(keys, figures):
                row[k].append(value)
        for k in keys:
            getattr(result, k).append(row[k])
        faulty = any(o > FAULT_FRACTION * n for o, n in zip(row["off"], row["elements"]))
        reference = None
        if faulty and labels is not None:
            with torch.inference_mode():
                logits, ref_logits = self._int8(x), _Checker(self._int8, propagate=True).run(x)
            if all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (logits, ref_logits)):
                ref_logits = ref_logits.dequantize() if ref_logits.is_quantized else ref_logits
                logits = logits.dequantize() if logits.is_quantized else logits
                reference = (len(batch), int((ref_logits.argmax(1) == labels).sum()),
                             int((logits.argmax(1) == labels).sum()))
        result.reference.append(reference)
        return result


def merge_engine(results) -> EngineResult:
    """Every checked batch, in batch order (first sample index): the same for any worker count."""
    results = [r for r in results if r is not None and r.batches]
    merged = EngineResult(layers=results[0].layers if results else [],
                          unchecked=sorted({t for r in results for t in r.unchecked}))
    if any(r.layers != merged.layers for r in results):
        raise ValueError("workers checked different layers")
    keys = ("samples", "elements", "off", "worst", "signal", "noise", "reference")
    rows = sorted((b, *(getattr(r, k)[i] for k in keys)) for r in results for i, b in enumerate(r.batches))
    if len({row[0] for row in rows}) != len(rows):
        raise ValueError("a batch was checked by more than one worker")
    for row in rows:
        merged.batches.append(row[0])
        for k, value in zip(keys, row[1:]):
            getattr(merged, k).append(value)
    return merged


def engine_rows(merged: EngineResult) -> list[dict]:
    """One row per checked node in graph order: sums over every batch (in batch order), the fraction
    of elements off by `FAULT_STEPS` or more, and the engine-vs-reference SQNR in dB (None: equal)."""
    rows = []
    for k, (node, module, kind) in enumerate(merged.layers):
        elements = sum(b[k] for b in merged.elements)
        off = sum(b[k] for b in merged.off)
        signal = sum(b[k] for b in merged.signal)
        noise = sum(b[k] for b in merged.noise)
        rows.append({"layer": node, "module": module, "type": kind, "elements": elements, "off": off,
                     "off_fraction": off / elements if elements else 0.0,
                     "max_steps": max((b[k] for b in merged.worst), default=0),
                     "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else None,
                     "fault": elements > 0 and off > FAULT_FRACTION * elements})
    return rows


def engine_verdict(merged: EngineResult, backend: str) -> dict:
    """What metrics.json keeps as `engine_check`, and the one line a person reads when it fails."""
    rows = engine_rows(merged)
    samples = sum(merged.samples)
    out = {"ok": None, "engine": backend, "samples": samples, "layers_checked": len(rows),
           "unchecked_types": merged.unchecked, "threshold": {"steps": FAULT_STEPS, "fraction": FAULT_FRACTION},
           "first_layer": None, "reference_top1": None, "int8_top1": None, "reference_samples": 0, "message": None,
           "worst": sorted(rows, key=lambda r: (-r["off_fraction"], -r["max_steps"]))[:3]}
    if not rows:
        out["message"] = "no layer could be checked (no checked batch, or no quantized node with a reference)"
        return out
    faults = [r for r in rows if r["fault"]]
    out["ok"] = not faults
    if not faults:
        return out
    first = faults[0]
    out["first_layer"] = first
    ran = [r for r in merged.reference if r is not None]
    where = f"layer {first['module'] or first['layer']} ({first['type']})"
    figures = ""
    if ran:
        n = sum(r[0] for r in ran)
        out.update(reference_samples=n, reference_top1=sum(r[1] for r in ran) / n, int8_top1=sum(r[2] for r in ran) / n)
        figures = (f": INT8 top-1 {out['int8_top1'] * 100:.1f}% here, reference {out['reference_top1'] * 100:.1f}% "
                   f"(on {n} samples)")
    other = "x86" if backend != "x86" else "qnnpack"
    out["message"] = (f"the {backend} kernels disagree with the reference quantization from {where} on "
                      f"({first['off_fraction'] * 100:.0f}% of its outputs off by up to {first['max_steps']} steps)"
                      f"{figures}: an engine fault on this CPU, not quantization error; evaluate on the target CPU "
                      f"or use backend {other}")
    return out

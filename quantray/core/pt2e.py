"""The PT2E flow (`[quantization] flow = "pt2e"`): torch.export, torchao's X86InductorQuantizer,
prepare_pt2e / convert_pt2e, and torch.compile with freezing as the INT8 runtime.

    prepared = prepare(fp32, quant, example)   # export (non-strict, else strict) + prepare_pt2e
    int8 = convert(prepared)                   # convert_pt2e on a copy: quantize/dequantize ops around FP32 ops
    blob = save_program(int8, example)         # torch.export.save of the INT8 program, dynamic batch
    runtime = Compiled(load_program(blob))     # torch.compile (freezing): inductor's fused INT8 kernels

prepare_pt2e puts torchao's observers (the same buffers and arithmetic as torch's, other classes)
into the exported graph as call_module nodes, as prepare_fx does, so `sites`, `probes` and `merge`
serve both flows: the same exact, replay and fast merges. Unlike FX, weights are observed in the
graph too (`sites.weight_observers`); qparams.parquet keeps to activations.

The converted program is torch's reference representation: each quantized op is dequantize, the
FP32 op, quantize. It is what a PT2E user deploys (`torch.export.load`) and, run as it is, the
simulated quantization (slower than FP32). The INT8 speed comes from `torch.compile` with freezing,
whose lowering fuses those patterns into oneDNN INT8 kernels; compiling takes seconds per batch
size, reported apart from latency (`Compiled.compile_s`).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import time
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from ..errors import QuantrayError, SpecError
from ..spec import QuantSpec
from . import sites
from .ranges import RangeMethod

__all__ = ["TORCHAO", "prepare", "convert", "save_program", "load_program", "Compiled", "quantizer",
           "export_how", "module_types"]

TORCHAO = "0.18.0"  # the torchao this flow is built and tested on (pyproject pins it)


def _import_torchao():
    """torchao, or one line saying why this torch/torchao cannot run the PT2E flow."""
    pytree = logging.getLogger("torch.utils._pytree")  # torchao 0.18 registers an Enum torch 2.14 warns about
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.quantization.pt2e import observer
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except Exception as e:  # ImportError, or torchao built for another torch
        raise QuantrayError(f"flow = \"pt2e\" needs torchao {TORCHAO} beside torch {torch.__version__}: importing it "
                            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"pip install torchao=={TORCHAO}, or use flow = \"fx\"") from None
    finally:
        pytree.setLevel(level)
    return torchao, observer, prepare_pt2e, convert_pt2e, x86_inductor_quantizer


_torchao, _obs, _prepare_pt2e, _convert_pt2e, _xiq = _import_torchao()


class RangeObserverPT2E(RangeMethod, _obs.HistogramObserver):
    """torchao's HistogramObserver whose range comes from `method` (`ranges.RangeObserver`'s twin)."""


sites.register_observers(_obs.ObserverBase, {
    _obs.HistogramObserver: sites.HISTOGRAM, RangeObserverPT2E: sites.HISTOGRAM,
    _obs.MinMaxObserver: sites.MINMAX, _obs.PerChannelMinMaxObserver: sites.MINMAX,
    _obs.MovingAverageMinMaxObserver: sites.MINMAX, _obs.MovingAveragePerChannelMinMaxObserver: sites.MINMAX,
    _obs.FixedQParamsObserver: sites.STATELESS, _obs.PlaceholderObserver: sites.STATELESS,
    _obs.NoopObserver: sites.STATELESS, _obs.ReuseInputObserver: sites.STATELESS}, _obs.PerChannelMinMaxObserver)


def module_types() -> list[str]:
    """The torch.nn classes X86InductorQuantizer takes a per-type config for."""
    return sorted({t.__name__ for t in _xiq.X86InductorQuantizer.module_function_to_aten_operator_type
                   if isinstance(t, type) and issubclass(t, nn.Module)})


def quantizer(quant: QuantSpec):
    """X86InductorQuantizer with the spec's global choice and per-type / per-name overrides: the
    activation observer (histogram with its range method, minmax, moving_average) and the weight
    scheme (per-channel or per-tensor symmetric INT8); "fp32" leaves a type or module unquantized."""
    q = _xiq.X86InductorQuantizer()
    q.set_global(_config({"activation": quant.activation, "weight": quant.weight,
                          "activation_range": quant.activation_range}, quant.percentile))
    for type_name, choice in quant.module_types.items():
        cls = getattr(nn, type_name, None)
        if cls not in _xiq.X86InductorQuantizer.module_function_to_aten_operator_type:
            raise SpecError(f"[quantization] module_types.{type_name}: X86InductorQuantizer takes no per-type config for "
                            f"it under flow = \"pt2e\" (it does for {', '.join(module_types())}); use module_names, "
                            "or flow = \"fx\"")
        q.set_module_type_qconfig(cls, _config(choice, quant.percentile))
    for name, choice in quant.module_names.items():
        q.set_module_name_qconfig(name, _config(choice, quant.percentile))
    return q


def _config(choice, percentile: float):
    """One QuantizationConfig: torchao's x86 default (uint8 activations 0..255, eps 2**-12) with the
    spec's observer and weight scheme; None for "fp32"."""
    if choice == "fp32":
        return None
    base = _xiq.get_default_x86_inductor_quantization_config()
    act, weight = base.input_activation, base.weight
    kind, method = choice.get("activation"), choice.get("activation_range")
    eps = {"eps": 2 ** -12}
    if method in ("percentile", "mse", "entropy"):
        ctr = RangeObserverPT2E.with_args(method=method, percentile=float(choice.get("percentile", percentile)), **eps)
    elif kind == "minmax" or method == "minmax":
        ctr = _obs.MinMaxObserver.with_args(**eps)
    elif kind == "moving_average":
        ctr = _obs.MovingAverageMinMaxObserver.with_args(**eps)
    else:
        ctr = _obs.HistogramObserver.with_args(**eps)
    act = dataclasses.replace(act, observer_or_fake_quant_ctr=ctr)
    if choice.get("weight") == "per_tensor":
        weight = dataclasses.replace(weight, qscheme=torch.per_tensor_symmetric, ch_axis=None,
                                     observer_or_fake_quant_ctr=_obs.MinMaxObserver.with_args(**eps))
    return dataclasses.replace(base, input_activation=act, output_activation=act, weight=weight)


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    """torch.export specializes a dimension whose example size is 1: export at batch 2, batch dynamic."""
    return torch.cat([example[:1], example[:1]])


def _dynamic_batch():
    return ({0: torch.export.Dim("batch", min=1)},)


def prepare(model: nn.Module, quant: QuantSpec, example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """`model` exported (non-strict first; strict where non-strict export or prepare_pt2e fails, as
    for torchvision's resnet18, whose blocks call one ReLU module twice) and prepared with
    `quantizer(quant)`. `export_how(prepared)` says which export was used."""
    failures = []
    example = _batch_of_two(example_inputs)
    for strict in (False, True):
        how = "strict" if strict else "non-strict"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = torch.export.export(copy.deepcopy(model).eval(), (example,), dynamic_shapes=_dynamic_batch(),
                                               strict=strict)
        except Exception as e:
            failures.append(f"{how} export: {_first_line(e)}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prepared = _prepare_pt2e(exported.module(), quantizer(quant))
        except SpecError:
            raise
        except Exception as e:
            failures.append(f"{how} export, then prepare_pt2e: {_first_line(e)}")
            continue
        prepared.quantray_flow, prepared.quantray_export = "pt2e", how
        return prepared
    raise SpecError(f"[model] cannot be quantized with flow = \"pt2e\": {'; '.join(failures)}; "
                    "use flow = \"fx\" (FX graph mode traces it another way)")


def _first_line(e: Exception) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:200]}"


def export_how(model: nn.Module) -> str | None:
    """"strict" or "non-strict": the torch.export call a PT2E model was made with (None under FX)."""
    return getattr(model, "quantray_export", None)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`convert_pt2e` on a copy (it mutates the model it is given)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = _convert_pt2e(copy.deepcopy(prepared))
    int8.quantray_flow, int8.quantray_export = "pt2e", export_how(prepared)
    return int8


def save_program(int8: torch.fx.GraphModule, example_inputs: torch.Tensor) -> bytes:
    """The INT8 program as `torch.export.save` writes it, batch size dynamic: loadable with
    `torch.export.load(path).module()` in a process that has torch and torchao. The FP32 weights
    convert_pt2e leaves behind (unread: the graph reads their INT8 copies) are dropped first."""
    int8 = copy.deepcopy(int8)
    read = {node.target for node in int8.graph.nodes if node.op == "get_attr"}
    for name, _ in [*int8.named_parameters(), *int8.named_buffers()]:
        if name not in read:
            owner, _, leaf = name.rpartition(".")
            delattr(int8.get_submodule(owner), leaf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(int8, (_batch_of_two(example_inputs),), dynamic_shapes=_dynamic_batch(),
                                      strict=False)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program(blob: bytes) -> torch.fx.GraphModule:
    """The INT8 program saved by `save_program`, as a module (the reference representation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(io.BytesIO(blob)).module()


class Compiled:
    """The INT8 runtime: `torch.compile(program, dynamic=False)` run under inductor's `freezing`
    (set by `torch._inductor.config.patch`: torchao's x86 lowering passes read the global config,
    and fail on onednn's weight prepack when freezing comes in `options` only).

    Inductor's quantized conv lowering fails with a dynamic batch here (torch 2.14.1: a stride
    assertion in the fused kernel), so each batch size is compiled once; a batch smaller than the
    largest compiled size (the last test batch) is padded to it and the padding's outputs dropped,
    so that an evaluation compiles once, plus once for batch-1 latency. `compile_s`: the first call's
    time at each batch size (compiling and one forward), which latency figures leave out."""

    def __init__(self, program: torch.fx.GraphModule):
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
        self.program = program
        self.compile_s: dict[int, float] = {}
        self._fn = torch.compile(program, dynamic=False)

    def warm(self, x: torch.Tensor) -> float:
        """Compile for `x`'s batch size if a call on it would (seconds spent; 0.0 if not)."""
        n = x.shape[0]
        if n in self.compile_s or (n > 1 and any(s > n for s in self.compile_s)):
            return 0.0
        self(x)
        return self.compile_s[n]

    def __call__(self, x: torch.Tensor):
        n = x.shape[0]
        sizes = [s for s in self.compile_s if s > n and n > 1]
        if n not in self.compile_s and sizes:
            pad = min(sizes)
            filler = x[:1].expand(pad - n, *x.shape[1:])
            # every output's first n rows, whatever the structure (a tensor, or a dict or tuple of them)
            return tree_map_only(torch.Tensor, lambda t: t[:n], self(torch.cat([x, filler])))
        with torch.no_grad(), torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if n in self.compile_s:
                return self._fn(x)
            started = time.perf_counter()
            out = self._fn(x)
            self.compile_s[n] = round(time.perf_counter() - started, 3)
            return out

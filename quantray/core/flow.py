"""The quantization flow: how a model is prepared, converted and rebuilt. FX graph mode here;
`[quantization] flow = "pt2e"` sends prepare and convert to `pt2e` (torch.export + torchao).

    prepared = prepare(fp32, quant, example)   # prepare_fx with the spec's QConfigMapping, on a copy
    int8 = convert(prepared)                   # convert_fx, on a copy
    int8 = rebuild_int8(fp32, quant, example, state_dict)   # the seed's way back from model_int8.pth

Everything that knows about FX quantization lives here, and everything about PT2E in `pt2e`.
Calibration and merging work on observer buffers, which both flows share.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import warnings
import weakref

import torch
import torch.nn
from torch import nn
from torch.ao.quantization import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QConfig,
    QConfigMapping,
    default_per_channel_weight_observer,
    default_weight_observer,
    get_default_qconfig,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.observer import HistogramObserver
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

from ..errors import QuantrayError, SpecError
from ..spec import QuantSpec, suggest
from .ranges import RangeObserver, l2_remembered, settle
from .standins import fill, stand_in
from .tracing import TURNS, without_stack_traces

__all__ = ["base_model", "flow_of", "runtime_name", "config_key", "prepare", "convert", "reference", "rebuild_int8", "quantized_layers", "qconfig_mapping", "check_quant", "set_engine",
           "ACTIVATION_OBSERVERS", "WEIGHT_OBSERVERS",
           "quiet_torch_warnings", "without_stack_traces"]

# Warnings torch 2.14 prints on every FX-quantization or TorchScript call, in every process; the
# README says once that FX quantization is deprecated upstream (torchao PT2E is the successor).
_KNOWN_WARNINGS = (".*quant_min and quant_max.*", ".*torch.jit.* is deprecated.*", ".*quantize_per_tensor.*",
                   ".*TypedStorage is deprecated.*", ".*TorchScript type system.*", ".*torchao.*",
                   ".*must run observer before calling calculate_qparams.*",
                   # mapping = "global" gives fixed-qparams ops (hardsigmoid, ...) the global qconfig, which
                   # torch ignores for them, saying so once per op and per prepare
                   ".*QConfig must specify a FixedQParamsObserver.*")
# The observer kinds and weight schemes a spec names (spec.ACTIVATIONS, spec.WEIGHTS: a test pins them).
ACTIVATION_OBSERVERS = {"histogram": HistogramObserver, "minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver}
WEIGHT_OBSERVERS = {"per_channel": default_per_channel_weight_observer, "per_tensor": default_weight_observer}


def quiet_torch_warnings() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
    for message in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def set_engine(backend: str) -> None:
    """The quantized kernels must match the qconfig's backend wherever an INT8 model runs."""
    if backend not in torch.backends.quantized.supported_engines:
        raise QuantrayError(f"quantized engine {backend!r} is not available in this torch build "
                            f"(available: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = backend


def _quant(quant: QuantSpec | str) -> QuantSpec:
    return QuantSpec(backend=quant) if isinstance(quant, str) else quant


def qconfig_mapping(quant: QuantSpec | str) -> QConfigMapping:
    """The seed's mapping (`set_global(get_default_qconfig(backend))`) or torch's default mapping,
    with the spec's activation/weight choices and per-type / per-name overrides on top."""
    quant = _quant(quant)
    base = get_default_qconfig(quant.backend)
    mapping = get_default_qconfig_mapping(quant.backend) if quant.mapping == "default" else QConfigMapping()
    mapping.set_global(_qconfig(base, quant.backend, {"activation": quant.activation, "weight": quant.weight,
                                                      "activation_range": quant.activation_range,
                                                      "percentile": quant.percentile}))
    for type_name, choice in quant.module_types.items():
        mapping.set_object_type(_module_class(type_name), _qconfig(base, quant.backend, choice, quant.percentile))
    for module_name, choice in quant.module_names.items():
        mapping.set_module_name(module_name, _qconfig(base, quant.backend, choice, quant.percentile))
    return mapping


def check_quant(quant: QuantSpec) -> None:
    """What a QuantSpec cannot check without torch: that each `module_types` key is a torch.nn class."""
    for type_name in quant.module_types:
        _module_class(type_name)


def _module_class(name: str) -> type:
    cls = getattr(torch.nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        classes = [n for n in dir(torch.nn) if isinstance(getattr(torch.nn, n), type)]
        raise SpecError(f"[quantization] module_types.{name}: not a torch.nn module class{suggest(name, classes)}; "
                        "e.g. Conv2d, Linear")
    return cls


def _qconfig(base: QConfig, backend: str, choice, percentile: float = 99.99) -> QConfig | None:
    if choice == "fp32":
        return None  # the module stays in floating point
    activation, weight = base.activation, base.weight
    kind, method = choice.get("activation"), choice.get("activation_range")
    # The backend's default reduce_range: x86 keeps 7 bits of headroom, qnnpack uses all 8.
    reduce_range = backend == "x86"
    if method in ("percentile", "mse", "entropy"):
        activation = RangeObserver.with_args(method=method, percentile=float(choice.get("percentile", percentile)),
                                             reduce_range=reduce_range)
    elif kind or method:  # spec checks that they agree; l2 is the histogram's own search
        activation = ACTIVATION_OBSERVERS[kind or ("minmax" if method == "minmax" else "histogram")].with_args(
            reduce_range=reduce_range)
    if choice.get("weight"):
        weight = WEIGHT_OBSERVERS[choice["weight"]]
    return QConfig(activation=activation, weight=weight)


def base_model(model: nn.Module, quant: QuantSpec | str) -> nn.Module:
    """The FP32 model that `quant` quantizes: `model` itself, or its cross-layer-equalized copy
    (`[quantization] equalize`), which computes the same function up to float rounding."""
    quant = _quant(quant)
    if not quant.equalize:
        return model
    from .equalize import equalize

    with TURNS.alone():
        equalized, _ = equalize(model)
    equalized.quantray_transform = "equalize-v1"  # in every observed value's key (`sites`)
    return equalized


def runtime_name(flow_name: str) -> str:
    """The deployed INT8 model's key in timings and speed: TorchScript (FX) or the compiled program (PT2E)."""
    return "int8_compiled" if flow_name == "pt2e" else "int8_torchscript"


def flow_of(model: nn.Module) -> str:
    """"pt2e" for a model `pt2e` prepared or converted, else "fx"."""
    return getattr(model, "quantray_flow", "fx")


def config_key(quant: QuantSpec | str) -> str:
    """What prepare and convert make of `quant`, as text: specs that say one thing in other words
    (activation_range = "l2" and the default histogram; `mode`, which only calibration reads) share
    a key. FX: the QConfigMapping's own repr (every observer's class and arguments, per type and
    name), the backend, equalization and bias correction; PT2E: the whole spec."""
    quant = _quant(quant)
    if quant.flow == "pt2e":
        return repr(quant)
    return _config_text(quant, qconfig_mapping(quant))


def _config_text(quant: QuantSpec, mapping: QConfigMapping) -> str:
    return repr((quant.flow, quant.backend, quant.equalize, quant.bias_correction, repr(mapping)))


def prepare(model: nn.Module, quant: QuantSpec | str, example_inputs: torch.Tensor) -> nn.Module:
    """`prepare_fx` (or, under flow = "pt2e", `pt2e.prepare`) on a copy of `model` (the FP32 model
    stays untouched), equalized first where `quant` says so (`base_model`). Alone among worker
    threads, as every function here that traces or converts (`tracing.TURNS`)."""
    with TURNS.alone():
        quant = _quant(quant)
        if quant.flow == "pt2e":
            return _prepare(model, quant, example_inputs)
        mapping = qconfig_mapping(quant)
        stand = stand_in(mapping)
        given = stand.mapping if stand else mapping  # what prepare_fx runs with
        key = _template_key(model, quant, example_inputs, given)
        if key is None:
            return _prepare(model, quant, example_inputs, mapping)
        set_engine(quant.backend)
        prepared = copy.deepcopy(_template(model, quant, example_inputs, key, given))
        return fill(prepared, stand) if stand else prepared


_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # FP32 model -> {its state and config: prepared}


def _template_key(model: nn.Module, quant: QuantSpec, example_inputs, mapping: QConfigMapping) -> tuple | None:
    """What a template is valid for: the config as prepare_fx gets it (`mapping`: activation
    observers stood in for, `standins`), the example input, the version of every parameter and
    buffer; None where that cannot be told (tensors made under inference mode keep no version)."""
    if not isinstance(example_inputs, torch.Tensor):
        return None
    try:
        version = tuple(t._version for t in (*model.parameters(), *model.buffers()))
        example = hashlib.sha256(example_inputs.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                                 .numpy().tobytes()).hexdigest()
    except RuntimeError:
        return None
    return _config_text(quant, mapping), tuple(example_inputs.shape), str(example_inputs.dtype), example, version


def _template(model: nn.Module, quant: QuantSpec, example_inputs: torch.Tensor, key: tuple,
              mapping: QConfigMapping) -> nn.Module:
    """prepare_fx's result for this model, config and input, made once per process and copied out
    (a deep copy of mobilenet_v3's prepared model costs 0.05 s, preparing it 0.26 s): the driver,
    each worker of its pool (threads of one process, `cluster.driver`), the engine check and the
    trial of the job's own config prepare the same, and so do configs that differ only in their
    activation observers (`standins`: tune's range trials). Keyed by every parameter's and buffer's
    version counter too (an in-place change of a weight bumps it), so a changed model is prepared
    afresh; the last 4 configs per model are kept."""
    kept = _TEMPLATES.setdefault(model, {})
    if key not in kept:
        if len(kept) >= 4:
            kept.pop(next(iter(kept)))
        kept[key] = _prepare(model, quant, example_inputs, mapping)
    return kept[key]


def _prepare(model: nn.Module, quant: QuantSpec | str, example_inputs: torch.Tensor,
             mapping: QConfigMapping | None = None) -> nn.Module:
    quant = _quant(quant)
    set_engine(quant.backend)
    model = base_model(model, quant)
    modules = dict(model.named_modules())
    for name in quant.module_names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            raise SpecError(f"[quantization] module_names.{name}: the model has no module {name!r}"
                            + (f"; close: {', '.join(close)}" if close else ""))
    if quant.flow == "pt2e":
        from . import pt2e

        prepared = pt2e.prepare(model, quant, example_inputs)
    else:
        with warnings.catch_warnings(), without_stack_traces():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch points to torchao's PT2E flow
            prepared = _prepare_fx(model, quant, example_inputs, mapping)
    transform = getattr(model, "quantray_transform", None)
    if transform is not None:  # on the input nodes, whose meta copies of the graph keep (`sites` reads it)
        for node in prepared.graph.nodes:
            if node.op == "placeholder":
                node.meta["quantray_transform"] = transform
    return prepared


def _prepare_fx(model: nn.Module, quant: QuantSpec, example_inputs: torch.Tensor,
                mapping: QConfigMapping | None = None) -> nn.Module:
    try:
        return prepare_fx(copy.deepcopy(model).eval(), mapping if mapping is not None else qconfig_mapping(quant),
                          (example_inputs,))
    except torch.fx.proxy.TraceError as e:  # symbolic tracing: data-dependent control flow
        text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise SpecError(f"[model] cannot be traced by FX for flow = \"fx\": {type(e).__name__}: {text[:200]}; "
                        "try flow = \"pt2e\" (torch.export traces it another way)") from None


def convert(prepared: nn.Module) -> nn.Module:
    """`convert_fx` (or `pt2e.convert`) on a copy: convert mutates the prepared model it is given.
    The observers' range searches first, beside other worker threads (`ranges.settle`), then the
    rest alone."""
    settle(prepared)
    with TURNS.alone():
        if flow_of(prepared) == "pt2e":
            from . import pt2e

            return pt2e.convert(prepared)
        with warnings.catch_warnings(), l2_remembered():
            warnings.simplefilter("ignore")
            return convert_fx(copy.deepcopy(prepared)).eval()


def reference(prepared: nn.Module) -> nn.Module:
    """torch's reference quantized model of `prepared` (`convert_to_reference_fx`, on a copy): the same
    scales and zero points, quantization simulated in float, no INT8 kernel involved. Under PT2E,
    convert_pt2e's program is that reference representation itself."""
    if flow_of(prepared) == "pt2e":
        return convert(prepared)
    settle(prepared)
    with TURNS.alone(), warnings.catch_warnings(), l2_remembered():
        warnings.simplefilter("ignore")
        return convert_to_reference_fx(copy.deepcopy(prepared)).eval()


def rebuild_int8(fp32: nn.Module, quant: QuantSpec | str, example_inputs: torch.Tensor, state_dict: dict) -> nn.Module:
    """The seed's way back to an INT8 GraphModule: prepare_fx, convert_fx without calibrating, then
    load the INT8 state_dict (a converted GraphModule does not unpickle, so workers rebuild it)."""
    int8 = convert(prepare(fp32, quant, example_inputs))
    int8.load_state_dict(state_dict)
    return int8


_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def quantized_layers(model: nn.Module, quant: QuantSpec | str, example_inputs: torch.Tensor) -> list[str]:
    """The modules with weights that `quant` quantizes, by name in the model's order (a fused module
    under its first module's name): the layers a search may keep in FP32."""
    converted = dict(convert(prepare(model, quant, example_inputs)).named_modules())
    return [name for name, module in model.named_modules()
            if isinstance(module, _LAYER_TYPES) and ".quantized" in type(converted.get(name)).__module__]

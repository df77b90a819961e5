"""What each observer of a prepared model observes: the FP32 graph value it watches.

    observed = observed_values(prepared)
    observed["activation_post_process_3"].values
        # (Value("conv2@1f0c...", "layer conv2 (ConvReLU2d)"), Value("pool@9ab2...", "layer pool (MaxPool2d)"))

Statistics are gathered and stored per value, not per generated observer name, so any quantization
config over the same FP32 model (a module kept in FP32, other weight observers) finds them again.
A value's key is its node's name in the fused FP32 graph and a digest of everything upstream that
decides what it computes: each node's operation, its module's class and settings (its repr), and
the nodes it reads (observers are identities during calibration and are looked through). A config
whose prepare_fx fused differently upstream gives another key, so reuse is refused, never wrong.
Weights are not in the key: stored statistics are keyed by the FP32 state_dict besides (`stats`);
a transform of those weights before prepare_fx (`flow.base_model`: equalization) is, at the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.ao.quantization.observer import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    NoopObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    ReuseInputObserver,
)

from ..digest import digest
from ..errors import CalibrationError
from .ranges import RangeObserver

__all__ = ["Value", "Observed", "observed_values", "observer_calls", "find_observers", "kind_of", "reduction_of", "observer_aliases", "signature",
           "register_observers", "is_observer", "weight_observers",
           "HISTOGRAM", "MINMAX", "STATELESS", "TENSOR"]

HISTOGRAM, MINMAX, STATELESS = "histogram", "minmax", "stateless"
TENSOR = "tensor"  # the reduction of a per-tensor observer: torch.aminmax over the whole value
# Exact types, not isinstance: MovingAverageMinMaxObserver subclasses MinMaxObserver, and a
# subclass we have not checked could hold state that our merge would silently get wrong.
_KINDS = {HistogramObserver: HISTOGRAM, RangeObserver: HISTOGRAM, MinMaxObserver: MINMAX, PerChannelMinMaxObserver: MINMAX,
          MovingAverageMinMaxObserver: MINMAX, MovingAveragePerChannelMinMaxObserver: MINMAX,
          FixedQParamsObserver: STATELESS, PlaceholderObserver: STATELESS, NoopObserver: STATELESS,
          ReuseInputObserver: STATELESS}
_BASES: tuple[type, ...] = (ObserverBase,)
_PER_CHANNEL: tuple[type, ...] = (PerChannelMinMaxObserver,)  # and its moving-average subclass


def register_observers(base: type, kinds: dict[type, str], per_channel: type) -> None:
    """Another library's observer classes (torchao's, for the PT2E flow: the same buffers and
    arithmetic as torch's, separate classes), by exact type as above."""
    global _BASES, _PER_CHANNEL
    if base not in _BASES:
        _BASES, _PER_CHANNEL = (*_BASES, base), (*_PER_CHANNEL, per_channel)
    _KINDS.update(kinds)


def is_observer(module) -> bool:
    return isinstance(module, _BASES)


@dataclass(frozen=True)
class Value:
    """One FP32 graph value: `key` for storage and matching, `label` for people."""

    key: str
    label: str


@dataclass(frozen=True)
class Observed:
    """One observer instance: its first attribute name (the name in qparams.parquet), the other
    names it is reachable by, its kind, the reduction its statistics need ("tensor", or
    "channel:AXIS"), its histogram bins, and the values it is called on, in call order."""

    name: str
    aliases: tuple[str, ...]
    cls: str
    kind: str
    reduction: str
    bins: int | None
    values: tuple[Value, ...]


def find_observers(model: nn.Module) -> dict[str, nn.Module]:
    """Each observer instance once, under the first name it has (pooling reuses its input's observer)."""
    found, seen = {}, set()
    for name, module in model.named_modules(remove_duplicate=False):
        if is_observer(module) and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    return found


def observer_aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each observer's first name, the other names the same instance is reachable by."""
    first, aliases = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_observer(module):
            if id(module) in first:
                aliases[first[id(module)]].append(name)
            else:
                first[id(module)] = name
                aliases[name] = []
    return aliases


def kind_of(name: str, observer: ObserverBase) -> str:
    kind = _KINDS.get(type(observer))
    if kind is None:
        supported = ", ".join(sorted(t.__name__ for t in _KINDS))
        raise CalibrationError(f"observer {name} is a {type(observer).__name__}, which quantray cannot merge "
                               f"exactly; supported: {supported}")
    return kind


def reduction_of(observer) -> str:
    return f"channel:{observer.ch_axis}" if isinstance(observer, _PER_CHANNEL) else TENSOR


def observed_values(prepared: fx.GraphModule) -> dict[str, Observed]:
    """Every observer of `prepared` with the values its calls observe, in graph (= call) order."""
    observers = find_observers(prepared)
    aliases = observer_aliases(prepared)
    first_name = {id(obs): name for name, obs in observers.items()}
    calls: dict[str, list[Value]] = {name: [] for name in observers}
    for node, value in observer_calls(prepared):
        calls[first_name[id(prepared.get_submodule(node.target))]].append(value)
    result = {}
    for name, obs in observers.items():
        kind = kind_of(name, obs)
        if kind != STATELESS and not calls[name]:
            raise CalibrationError(f"observer {name} is not called from the model's graph; quantray can only "
                                   "calibrate observers that prepare_fx placed in the top-level graph")
        result[name] = Observed(name=name, aliases=tuple(aliases[name]), cls=type(obs).__name__, kind=kind,
                                reduction=reduction_of(obs), bins=getattr(obs, "bins", None) if kind == HISTOGRAM else None,
                                values=tuple(calls[name]))
    return result


def observer_calls(model: fx.GraphModule) -> list[tuple[fx.Node, Value]]:
    """Each graph node that calls an observer, with the value it observes, in graph order."""
    values = _values(model)
    return [(node, values[node]) for node in model.graph.nodes if _observer_at(model, node) is not None]


def signature(observed: dict[str, Observed]) -> list[tuple]:
    """What a worker's prepared copy must agree on with the driver's, exactly."""
    return [(o.name, o.cls, tuple(v.key for v in o.values)) for o in observed.values()]


def _observer_at(model: fx.GraphModule, node: fx.Node):
    if node.op != "call_module":
        return None
    module = model.get_submodule(node.target)
    return module if is_observer(module) else None


def weight_observers(model: fx.GraphModule) -> set[str]:
    """The observers called on a constant of the graph (a weight), not on an activation: PT2E
    observes weights in the graph, FX inside convert_fx (none here)."""
    return {node.target for node in model.graph.nodes
            if _observer_at(model, node) is not None and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"}


def _values(model: fx.GraphModule) -> dict[fx.Node, Value]:
    """A Value for every node, in one walk of the graph (nodes come in topological order)."""
    out: dict[fx.Node, Value] = {}
    keys: dict[fx.Node, str] = {}
    for node in model.graph.nodes:
        if _observer_at(model, node) is not None:  # an identity while calibrating: look through it
            source = node.args[0]
            out[node], keys[node] = out[source], keys[source]
            continue
        refer = lambda a: ("node", keys[a]) if isinstance(a, fx.Node) else a  # noqa: E731
        parts = [node.op, node.name, _target(node), fx.node.map_aggregate(node.args, refer),
                 fx.node.map_aggregate(node.kwargs, refer)]
        if node.op == "placeholder":  # a transform of the FP32 weights (equalization) changes every value
            parts.append(node.meta.get("quantray_transform"))
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            parts += [f"{type(module).__module__}.{type(module).__qualname__}", repr(module)]
        elif node.op == "get_attr":  # a constant the trace captured: not always in the state_dict
            parts.append(_attribute(model, node.target))
        keys[node] = f"{node.name}@{digest(parts)[:20]}"
        out[node] = Value(keys[node], _label(model, node))
    return out


def _attribute(model: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    value = getattr(model.get_submodule(owner), name, None)
    return value if isinstance(value, torch.Tensor) else repr(type(value))


def _target(node: fx.Node) -> str:
    target = node.target
    if callable(target):
        return f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__qualname__', repr(target))}"
    return str(target)


def _label(model: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"the model input {node.target}"
    if node.op == "call_module":
        return f"layer {node.target} ({type(model.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"function {node.name} ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method":
        return f"method {node.name} (.{node.target}())"
    return f"{node.op} {node.name}"

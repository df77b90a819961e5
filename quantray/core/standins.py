"""One prepare_fx for every activation range method: what lets `flow.prepare` share a template
between configs that differ only in their activation observers (tune's range trials: l2, minmax,
percentile, mse, entropy).

prepare_fx sees an activation observer through a few things only: whether two qconfigs are equal
(`qconfig_equals`), whether two observers have the same type (it reuses an input's observer of the
same type), and what an instance reports (dtype, qscheme, quant range, is_dynamic). `stand_in`
replaces each histogram or min/max observer of a QConfigMapping with a stand-in that keeps all of
these, and refuses (None) where one would change. `fill` then puts the real observers, fresh, in a
copy of the prepared model, and the real qconfigs where prepare recorded them. A test builds every
method both ways and compares the graph, the modules, the recorded qconfigs and the INT8 bytes.

    stand = stand_in(mapping)               # None: prepare with the mapping itself
    prepared = prepare_fx(model, stand.mapping, example)
    fill(copy.deepcopy(prepared), stand)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch.ao.quantization import MinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.observer import HistogramObserver, _PartialWrapper
from torch.ao.quantization.qconfig import _obs_or_fq_ctr_equals, qconfig_equals

from .ranges import RangeObserver

__all__ = ["StandIns", "stand_in", "fill"]

_REAL = (HistogramObserver, RangeObserver, MinMaxObserver)  # the classes stood in for (exact types)
_OWN = ("method", "percentile")  # RangeObserver's arguments: read by calculate_qparams only


class _StandIn(HistogramObserver):
    """An observer in a shared template: its `slot` names the real constructor `fill` puts in."""

    def __init__(self, slot: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.slot = slot


# One class per real class of a mapping, in order of first use: equal types stay equal, and
# different ones different, while a mapping of RangeObservers and one of HistogramObservers share.
_CLASSES = tuple(type(f"_StandIn{i}", (_StandIn,), {"__module__": __name__}) for i in range(len(_REAL)))
_SECTIONS = ("object_type_qconfigs", "module_name_regex_qconfigs", "module_name_qconfigs",
             "module_name_object_type_order_qconfigs")


@dataclass(frozen=True)
class StandIns:
    mapping: QConfigMapping          # what prepare_fx runs with
    ctors: tuple                     # slot -> the real activation constructor


def _qconfigs(mapping: QConfigMapping) -> list:
    return [mapping.global_qconfig, *itertools.chain.from_iterable(getattr(mapping, s).values() for s in _SECTIONS)]


def _replace(mapping: QConfigMapping, sub) -> QConfigMapping:
    out = QConfigMapping()
    out.global_qconfig = sub(mapping.global_qconfig)
    for section in _SECTIONS:
        for key, q in getattr(mapping, section).items():
            getattr(out, section)[key] = sub(q)
    return out


def _seen(observer) -> tuple:
    """What prepare_fx reads of an observer instance."""
    return (observer.dtype, observer.qscheme, observer.quant_min, observer.quant_max, observer.is_dynamic,
            getattr(observer, "reduce_range", None), hasattr(observer, "averaging_constant"))


def stand_in(mapping: QConfigMapping) -> StandIns | None:
    """`mapping` with stand-ins for its histogram and min/max activation observers, or None where it
    has none or a stand-in would change what prepare_fx sees."""
    ctors: list = []
    classes: list = []
    replaced: dict[int, QConfig] = {}

    def sub(q):
        act = getattr(q, "activation", None)
        if not (isinstance(act, _PartialWrapper) and act.p.func in _REAL and not act.p.args and not act.callable_args):
            return q
        if id(q) not in replaced:
            slot = next((i for i, c in enumerate(ctors) if _obs_or_fq_ctr_equals(c, act)), None)
            if slot is None:
                slot = len(ctors)
                ctors.append(act)
            if act.p.func not in classes:
                classes.append(act.p.func)
            kwargs = {k: v for k, v in act.p.keywords.items() if k not in _OWN}
            replaced[id(q)] = QConfig(activation=_CLASSES[classes.index(act.p.func)].with_args(slot=slot, **kwargs),
                                      weight=q.weight)
        return replaced[id(q)]

    standing = _replace(mapping, sub)
    if not ctors:
        return None
    real, stood = _qconfigs(mapping), _qconfigs(standing)
    if any(qconfig_equals(a, b) != qconfig_equals(c, d)
           for (a, c), (b, d) in itertools.combinations(zip(real, stood), 2)):
        return None
    for q, s in zip(real, stood):
        if q is not s:
            try:
                if _seen(q.activation()) != _seen(s.activation()):
                    return None
            except (TypeError, ValueError, AttributeError):  # arguments the stand-in does not take
                return None
    return StandIns(standing, tuple(ctors))


def fill(prepared: torch.fx.GraphModule, stand: StandIns) -> torch.fx.GraphModule:
    """The real observers (fresh) and qconfigs in `prepared`, a copy of a model prepared with
    `stand.mapping`: what prepare_fx makes with the mapping `stand` was made from."""
    def real_ctor(ctor):
        if not (isinstance(ctor, _PartialWrapper) and isinstance(ctor.p.func, type) and issubclass(ctor.p.func, _StandIn)):
            return ctor
        real = stand.ctors[ctor.p.keywords["slot"]]  # with what prepare_fx added (factory_kwargs for the device)
        return real.with_callable_args(**ctor.callable_args) if ctor.callable_args else real

    def real_qconfig(q):
        if q is None or real_ctor(q.activation) is q.activation:
            return q
        return QConfig(activation=real_ctor(q.activation), weight=q.weight)

    fresh: dict[int, torch.nn.Module] = {}  # prepare_fx registers one observer under several names where it is shared
    for name, module in list(prepared.named_modules(remove_duplicate=False)):
        if isinstance(module, _StandIn):
            parent, _, attr = name.rpartition(".")
            setattr(prepared.get_submodule(parent), attr, fresh.setdefault(id(module), stand.ctors[module.slot]()))
    for node in prepared.graph.nodes:
        info = node.meta.get("target_dtype_info")
        if info:
            node.meta["target_dtype_info"] = {k: real_ctor(v) for k, v in info.items()}
    attrs = prepared.meta.get("_observed_graph_module_attrs")
    if attrs is not None:
        attrs.node_name_to_qconfig = {n: real_qconfig(q) for n, q in attrs.node_name_to_qconfig.items()}
        attrs.qconfig_mapping = _replace(attrs.qconfig_mapping, real_qconfig)
    return prepared

"""Configs that differ only in their activation observers share one prepare_fx (`standins`): each
copy must be what prepare_fx with its own config makes, down to the INT8 bytes after convert."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization.qconfig import _obs_or_fq_ctr_equals, qconfig_equals

from quantray.core import flow, standins
from quantray.core.evaluation import state_dict_bytes
from quantray.core.ranges import METHODS
from quantray.demo import digits_mobilenet
from quantray.digest import sha256_bytes
from quantray.inputs import data
from quantray.spec import QuantSpec


class _Decoder(nn.Module):
    """ConvTranspose, LayerNorm, sigmoid and reshape: the entries of torch's default mapping that
    carry qconfigs of their own (transpose weights, reused input observers, fixed qparams)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.norm = nn.LayerNorm([4, 16, 16])
        self.head = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        x = self.norm(torch.relu(self.up(torch.relu(self.conv(x)))))
        return torch.sigmoid(self.head(x.reshape(x.shape[0], -1)))


@pytest.fixture(scope="module")
def digits():
    dataset = data.digits("train")
    return [data.load_batch(dataset, list(range(i, i + 32)))[0] for i in range(0, 96, 32)]


def _fresh(model, quant, example):
    """prepare_fx with `quant`'s own mapping, copied as `flow.prepare` copies its templates (a deep copy
    of a GraphModule keeps the submodules its graph calls: a shared observer's second name goes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(flow._prepare(model, quant, example))


def _same_ctor(a, b) -> bool:
    try:
        return _obs_or_fq_ctr_equals(a, b)
    except AttributeError:
        return a == b


def _assert_same(shared, fresh):
    assert shared.code == fresh.code
    def modules(m):  # names, types, reprs, and which names one module is registered under
        first = {}
        return [(n, type(x).__qualname__, repr(x), first.setdefault(id(x), n))
                for n, x in m.named_modules(remove_duplicate=False)]

    assert modules(shared) == modules(fresh)
    for a, b in zip(shared.graph.nodes, fresh.graph.nodes):
        x, y = a.meta.get("target_dtype_info", {}), b.meta.get("target_dtype_info", {})
        assert x.keys() == y.keys() and all(_same_ctor(x[k], y[k]) for k in x), a.name
    s, f = (m.meta["_observed_graph_module_attrs"] for m in (shared, fresh))
    assert s.node_name_to_qconfig.keys() == f.node_name_to_qconfig.keys()
    assert all(qconfig_equals(q, f.node_name_to_qconfig[n]) for n, q in s.node_name_to_qconfig.items())
    assert all(qconfig_equals(a, b) for a, b in zip(standins._qconfigs(s.qconfig_mapping),
                                                     standins._qconfigs(f.qconfig_mapping), strict=True))
    assert not any(isinstance(m, standins._StandIn) for m in shared.modules(remove_duplicate=False))


def _int8_bytes(prepared, batches) -> str:
    with torch.inference_mode():
        for x in batches:
            prepared(x)
    return sha256_bytes(state_dict_bytes(flow.convert(prepared)))


def _other(overrides: dict, method: str, **more) -> dict:
    return {**overrides, "activation_range": method, **more}


_DECODER_MIXED = {"activation_range": "percentile", "percentile": 99.9, "weight": "per_tensor",
                  "module_types": {"ConvTranspose2d": {"activation_range": "minmax", "weight": "per_tensor"},
                                   "Linear": "fp32"}}
_DECODER_NAMED = {"activation_range": "l2", "weight": "per_tensor", "module_names": {"conv": {"activation_range": "mse"}}}
CASES = [  # (model, the spec's overrides, another config whose template must serve it)
    *[("mobilenet", {"activation_range": m, "weight": "per_tensor"},
       {"activation_range": "mse" if m != "mse" else "minmax", "weight": "per_tensor"}) for m in METHODS],
    ("mobilenet", {"activation_range": "mse", "mapping": "default"}, {"activation_range": "entropy", "mapping": "default"}),
    ("decoder", {"activation_range": "entropy", "mapping": "default"}, {"activation_range": "minmax", "mapping": "default"}),
    ("decoder", _DECODER_MIXED, _other(_DECODER_MIXED, "entropy")),  # two observer classes, in the same pattern
    ("decoder", _DECODER_NAMED, _other(_DECODER_NAMED, "l2", module_names={"conv": {"activation_range": "minmax"}})),
]


@pytest.mark.parametrize("name,overrides,other", CASES, ids=[f"{n}-{o}" for n, o, _ in CASES])
def test_a_shared_template_gives_what_prepare_fx_gives_the_config_itself(name, overrides, other, digits, monkeypatch):
    torch.manual_seed(0)
    model = digits_mobilenet() if name == "mobilenet" else _Decoder().eval()
    batches = digits if name == "mobilenet" else [torch.randn(32, 1, 8, 8) for _ in range(3)]
    example = batches[0][:1]
    quant = QuantSpec(**overrides)
    flow.prepare(model, QuantSpec(**other), example)  # this config's copy comes from a template it did not make
    calls = []
    real = flow.prepare_fx
    monkeypatch.setattr(flow, "prepare_fx", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = flow.prepare(model, quant, example)
    assert calls == []  # the other config's template served
    fresh = _fresh(model, quant, example)
    _assert_same(shared, fresh)
    assert _int8_bytes(shared, batches) == _int8_bytes(fresh, batches)


def test_stand_ins_are_refused_where_prepare_fx_would_see_the_difference():
    """A stand-in keeps qconfig equality and observer types; where it cannot (another dtype), none."""
    assert standins.stand_in(flow.qconfig_mapping(QuantSpec(activation="moving_average"))) is None
    mse, l2 = (standins.stand_in(flow.qconfig_mapping(QuantSpec(activation_range=m))) for m in ("mse", "l2"))
    assert repr(mse.mapping) == repr(l2.mapping) and not _same_ctor(mse.ctors[0], l2.ctors[0])
    mixed = standins.stand_in(flow.qconfig_mapping(QuantSpec(activation_range="mse",
                                                             module_types={"Conv2d": {"activation_range": "minmax"}})))
    classes = {q.activation.p.func for q in standins._qconfigs(mixed.mapping)}
    assert len(classes) == 2  # a RangeObserver and a MinMaxObserver stay two types
    sym = flow.qconfig_mapping(QuantSpec())
    sym.set_global(torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.HistogramObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
        weight=sym.global_qconfig.weight))
    kept = standins.stand_in(sym)
    assert kept is not None and kept.mapping.global_qconfig.activation().dtype == torch.qint8
    assert standins.stand_in(flow.qconfig_mapping(QuantSpec(module_names={}))) is not None

"""The pool's workers, as the pipeline sizes and describes them: what it says when they do not
compute alike (more than one kind of CPU), which no machine here can show for real."""

from types import SimpleNamespace

from quantray.core.evaluation import cpu_kind
from quantray.pipeline.workers import cpu_kinds, mixed_cpus


def test_one_kind_of_cpu_is_silent_and_two_kinds_are_one_line_naming_them():
    here = cpu_kind()
    assert cpu_kinds(SimpleNamespace(cpus={0: here, 1: dict(here)})) == [here]
    assert mixed_cpus(SimpleNamespace(cpus={0: here, 1: dict(here)})) is None
    other = {**here, "id": "GenuineIntel/6/143/8", "model": "Intel(R) Xeon(R) Platinum 8481C", "torch_capability": "AVX512"}
    line = mixed_cpus(SimpleNamespace(cpus={0: here, 1: other, 2: dict(here)}))
    assert line.startswith("the workers ran on 2 kinds of CPU (") and "\n" not in line
    assert f"{here['model']} {here['id']} {here['torch_capability']}; Intel(R) Xeon(R) Platinum 8481C" in line
    assert "not bit-identical to a run with another worker count or shard layout" in line


def test_a_cpu_kind_names_what_decides_fp32_results():
    kind = cpu_kind()
    assert set(kind) == {"model", "id", "caches", "torch_capability", "flags"}
    assert kind["id"].count("/") == 3 and kind["model"]

"""The pool in the driver's own process, without Ray: the same calls as a Ray pool, failures named
the same way, and the driver's own torch settings left as they were."""

import pytest
import torch

from quantray.cluster.driver import DriverCluster
from quantray.cluster.names import Names
from quantray.cluster.worker import Worker, WorkerSetup
from quantray.core.calls import Call
from quantray.errors import CalibrationError, QuantrayError, SpecError
from quantray.spec import DataSpec, QuantSpec

NAMES = Names(worker=lambda w: f"worker {w}", call=lambda w, key: f"evaluate: {key}")


def _setup(model, threads=3):
    return WorkerSetup(model, torch.zeros(1, 1, 8, 8), QuantSpec(), threads, test=DataSpec(source="digits", split="test"))


def _threads(worker):
    return torch.get_num_threads(), torch.backends.quantized.engine


def _raise(worker, error):
    raise error


def test_calls_run_in_order_at_the_jobs_threads_and_the_driver_keeps_its_own(tiny_model):
    before = torch.get_num_threads(), torch.backends.quantized.engine
    with DriverCluster().pool(_setup(tiny_model), 4, wanted=4) as pool:
        assert (pool.size, pool.wanted, pool.node_alone(0)) == (1, 1, "driver")  # one worker, alone
        seen = []
        results = pool.run({0: [Call("first", _threads), Call("facts", Worker.host_facts)]},
                           on_result=lambda call, n: seen.append((call.key, n)), names=NAMES)
    assert results["first"][0] == 3 and results["facts"][3] == 3  # the job's thread count while working
    assert seen == [("first", 1), ("facts", 1)]
    assert (torch.get_num_threads(), torch.backends.quantized.engine) == before
    assert pool.share(results) is results and pool.bytes_received == 0


@pytest.mark.parametrize("error, expected_type, line", [
    (ValueError("cannot decode sample 7\nmore"), QuantrayError, "evaluate: batch 2: ValueError: cannot decode sample 7"),
    (CalibrationError("no samples"), CalibrationError, "evaluate: batch 2: no samples"),
    (SpecError("bad file"), QuantrayError, "evaluate: batch 2: bad file"),  # found while working: exit 1, not 2
])
def test_an_exception_in_a_call_is_one_line_naming_the_call(tiny_model, error, expected_type, line):
    threads = torch.get_num_threads()
    with DriverCluster().pool(_setup(tiny_model), 1) as pool:
        with pytest.raises(QuantrayError) as raised:
            pool.run({0: [Call("batch 2", _raise, (error,))]}, names=NAMES)
    assert type(raised.value) is expected_type and str(raised.value) == line
    assert torch.get_num_threads() == threads

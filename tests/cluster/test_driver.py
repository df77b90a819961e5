"""The pool in the driver's own process, without Ray: the same calls as a Ray pool, failures named
the same way, and the driver's own torch settings left as they were."""

import copy
import threading

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


def _meet(worker, barrier):
    """Returns only once every worker of the pool is in this call at once (or fails after 10 s)."""
    barrier.wait(timeout=10)
    return torch.get_num_threads(), threading.current_thread().name


def test_each_worker_runs_its_calls_in_order_on_its_own_thread_at_the_jobs_threads(tiny_model):
    """Workers compute at once, as Ray's processes do (a barrier all of them must reach), each at the
    job's thread count, while the driver keeps its own."""
    torch.set_num_threads(1)
    before = torch.get_num_threads(), torch.backends.quantized.engine
    barrier = threading.Barrier(3)
    with DriverCluster().pool(_setup(tiny_model), 3, wanted=4) as pool:
        assert (pool.size, pool.wanted, pool.node_alone(0)) == (3, 4, "driver")
        seen = []
        results = pool.run({w: [Call((w, "meet"), _meet, (barrier,)), Call((w, "facts"), Worker.host_facts)]
                            for w in range(3)},
                           on_result=lambda call, n: seen.append((call.key, n)), names=NAMES)
        assert pool.nodes == {0: "driver", 1: "driver", 2: "driver"} and set(pool.actors) == {0, 1, 2}
    assert {results[(w, "meet")][0] for w in range(3)} == {3}  # the job's thread count in each worker's thread
    assert len({results[(w, "meet")][1] for w in range(3)}) == 3  # three threads
    assert all(results[(w, "facts")][3] == 3 for w in range(3))
    for w in range(3):  # each worker's calls in order
        assert seen.index(((w, "meet"), 1)) < seen.index(((w, "facts"), 1))
    assert (torch.get_num_threads(), torch.backends.quantized.engine) == before
    assert pool.share(results) is results and pool.bytes_received == 0


def _count(worker, log, w, k):
    log.append((w, k))
    if (w, k) == (1, 1):
        raise ValueError("cannot decode sample 7")


def test_the_first_failure_is_raised_and_the_other_workers_stop(tiny_model):
    log = []
    with DriverCluster().pool(_setup(tiny_model), 2) as pool:
        with pytest.raises(QuantrayError, match=r"^evaluate: \(1, 1\): ValueError: cannot decode sample 7$"):
            pool.run({w: [Call((w, k), _count, (log, w, k)) for k in range(200)] for w in range(2)}, names=NAMES)
    assert (1, 0) in log and (1, 2) not in log  # worker 1 stopped at its failure


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


def _forwards(worker, model, x, times):
    with torch.inference_mode():
        return [model(x) for _ in range(times)]


def _trace(worker, model, times):
    """FX traces `model` as prepare_fx and Numeric Suite's loggers do, alone (`tracing.TURNS`)."""
    from quantray.core.tracing import TURNS

    for _ in range(times):
        with TURNS.alone():
            graph = torch.fx.symbolic_trace(model).code
    return graph


def test_a_worker_that_traces_while_another_computes_leaves_both_right(tiny_model):
    """FX's tracer patches torch.nn.Module for the whole process while it traces: without turns, a
    forward on the other thread meanwhile goes through the tracer and fails ("module is not
    installed as a submodule"; here, in 300 traces beside a thread of forwards, every time tried)."""
    x, other = torch.randn(4, 1, 8, 8), copy.deepcopy(tiny_model)
    expected, graph = tiny_model(x), torch.fx.symbolic_trace(other).code
    with DriverCluster().pool(_setup(tiny_model, threads=1), 2) as pool:
        results = pool.run({0: [Call(("forwards", k), _forwards, (tiny_model, x, 20)) for k in range(100)],
                            1: [Call("trace", _trace, (other, 300))]}, names=NAMES)
    assert all(torch.equal(y, expected) for k in range(100) for y in results[("forwards", k)])
    assert results["trace"] == graph

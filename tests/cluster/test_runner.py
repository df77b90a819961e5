"""The Ray shell: actors run the same protocol as the serial executor, lost workers are replaced,
and every failure of an actor or a task is one line naming where and why."""

import io
import os

import pytest
from helpers import quiet, serial_calibration
from rich.console import Console

from quantray.cluster import runner
from quantray.cluster.worker import WorkerSetup
from quantray.core import flow, merge, sites
from quantray.core.modes import MODES, Plan
from quantray.core.protocol import calibrate
from quantray.errors import CalibrationError, QuantrayError
from quantray.inputs import data
from quantray.pipeline import calibration_executor
from quantray.spec import DataSpec, QuantSpec
from quantray.testing import dies, fails

pytestmark = pytest.mark.ray  # every test here starts Ray or another process


def ray_calibration(model, example, quant, data_spec, batches, shards, *, order=None, max_attempts=3, console=None,
                    signature=None):
    prepared = flow.prepare(model, quant, example)
    observed = sites.observed_values(prepared)
    with runner.Cluster() as cluster:
        setup = WorkerSetup(model, example, quant, 1, calibration=data_spec,
                            signature=signature or sites.signature(observed))
        with runner.WorkerPool(cluster, setup, len(shards), max_attempts=max_attempts, console=console,
                               order=order) as pool:
            result = calibrate(MODES[quant.mode], calibration_executor(pool), Plan(batches, shards, observed))
    result.stats.load(prepared)
    return prepared, result, pool


def test_actors_run_the_protocol_to_the_serial_result_in_every_mode(ray_cluster, tiny_model, digits_plan):
    """The same workers serve every mode (a mode changes the passes, not the prepared model): fast
    runs last, as it leaves torch's own observer state on the workers. The workers keep pass 1's
    values for pass 2; the serial reference computes them again with a second forward."""
    spec, _, batches, example = digits_plan
    shards = data.assign_shards(len(batches), 3)
    prepared = flow.prepare(tiny_model, "x86", example)
    observed = sites.observed_values(prepared)
    with runner.Cluster() as cluster:
        setup = WorkerSetup(tiny_model, example, QuantSpec(), 1, calibration=spec, signature=sites.signature(observed),
                            memory_bytes=8 * 2 ** 30)
        with runner.WorkerPool(cluster, setup, len(shards), order=[2, 0, 1]) as pool:
            results = {mode: calibrate(MODES[mode], calibration_executor(pool), Plan(batches, shards, observed))
                       for mode in ("exact", "replay", "fast")}
    for mode, result in results.items():
        ours = flow.prepare(tiny_model, "x86", example)
        result.stats.load(ours)
        reference, _ = serial_calibration(tiny_model, example, QuantSpec(mode=mode), spec, batches, shards)
        assert merge.state_digest(ours) == merge.state_digest(reference), mode
        assert result.info["mode"] == mode
        if mode != "fast":
            assert result.info["pass2_batches"] == {"memory": len(batches), "disk": 0, "forward": 0}, mode
    assert pool.attempts == {0: 1, 1: 1, 2: 1} and pool.bytes_received > 0


def test_worker_setup_error_keeps_its_type_and_message(ray_cluster, tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    with pytest.raises(CalibrationError, match=r"^calibration shard \d: this worker's prepare_fx gave other observers"):
        ray_calibration(tiny_model, example, QuantSpec(), spec, batches[:2], [[0], [1]],
                        signature=[("activation_post_process_0", "MinMaxObserver", ())])


def _killer(kill_at: int, marker=None) -> DataSpec:
    """The digits train split from a dataset whose process dies loading sample `kill_at` (once, if a
    marker file is given: it is created first, so the retry on a new worker goes through)."""
    kwargs = {"split": "train", "kill_at": kill_at, **({"marker": str(marker)} if marker else {})}
    return DataSpec(source="factory", factory="quantray.testing:digits_killer", kwargs=kwargs, samples=200,
                    batch_size=32)


def test_killed_worker_is_replaced_and_the_result_is_bit_identical(ray_cluster, tiny_model, digits_plan, tmp_path):
    spec, _, batches, example = digits_plan
    shards = data.assign_shards(len(batches), 2)
    quant = QuantSpec()
    log = io.StringIO()
    disturbed, result, pool = ray_calibration(tiny_model, example, quant, _killer(batches[shards[1][0]][0], tmp_path / "once"),
                                        batches, shards, console=Console(file=log, width=300))
    assert (tmp_path / "once").exists()  # a worker really was killed
    assert ("the worker of calibration shard 1 died (ActorDiedError); redoing its calls on a new worker, attempt 2 of 3"
            in log.getvalue())
    assert pool.attempts == {0: 1, 1: 2}
    reference, _ = serial_calibration(tiny_model, example, quant, spec, batches, shards)
    assert merge.state_digest(disturbed) == merge.state_digest(reference)


def test_worker_that_keeps_dying_fails_the_run_naming_the_shard(ray_cluster, tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    shards = data.assign_shards(len(batches), 2)
    with pytest.raises(CalibrationError, match=r"^the worker of calibration shard 1 failed on all 2 attempts "
                                               r"\(\[run\] max_attempts\); last cause: ActorDiedError"):
        ray_calibration(tiny_model, example, QuantSpec(), _killer(batches[shards[1][0]][0]), batches, shards,
                        max_attempts=2, console=quiet())


def test_tasks_return_in_order_and_a_killed_task_is_retried(ray_cluster, tmp_path):
    marker = str(tmp_path / "died-once")
    assert runner.map_tasks(dies, [(1, marker), (2, marker), (3, marker)], describe=["a", "b", "c"]) == [2, 4, 6]
    assert os.path.exists(marker)


def test_an_exception_in_user_code_inside_a_task_is_one_line_naming_stage_and_batches(ray_cluster):
    with pytest.raises(QuantrayError) as info:
        runner.map_tasks(fails, [(1,), (2,)], describe=["evaluate: test batches 0, 2 of 4", "evaluate: test batches 1, 3 of 4"])
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 1
    assert message in ("evaluate: test batches 0, 2 of 4: ValueError: no good: 1",
                       "evaluate: test batches 1, 3 of 4: ValueError: no good: 2")


def test_a_task_whose_process_keeps_dying_is_one_line_after_its_retries(ray_cluster):
    with pytest.raises(QuantrayError) as info:
        runner.map_tasks(dies, [(1,)], describe=["evaluate: test batches 0, 1 of 2"], max_retries=1)
    assert str(info.value) == ("evaluate: test batches 0, 1 of 2: its worker process died 2 times (WorkerCrashedError); "
                               "see the Ray logs for why (out of memory is the usual cause)")
    assert info.value.exit_code == 1

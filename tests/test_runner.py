"""The Ray shell: worker failures surface as one-line quantray errors, not Ray tracebacks."""

import pytest

from quantray import runner
from quantray.errors import CalibrationError, DataError


def test_worker_setup_error_keeps_its_type_and_message(ray_cluster, tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    with runner.Cluster() as cluster:
        with pytest.raises(CalibrationError, match="^shard 1: this worker's prepare_fx gave other observers"):
            runner.calibrate(cluster, tiny_model, example, "x86", spec, batches[:2], [[0], [1]], 1,
                             signature=[("activation_post_process_0", "MinMaxObserver")], order=[1, 0])


def test_bad_sample_on_a_worker_names_shard_batch_and_sample(ray_cluster, tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    broken = [batches[0], [10**6]]  # an index past the end of the split
    with runner.Cluster() as cluster:
        with pytest.raises(DataError, match=r"^sample 1000000 failed to load: IndexError.*\(shard 1, batch 1, samples"):
            runner.calibrate(cluster, tiny_model, example, "x86", spec, broken, [[0], [1]], 1, signature=None)

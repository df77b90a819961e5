"""The Ray shell: modes on real actors, lost workers, and errors that stay one line."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from quantray import data, runner
from quantray.errors import CalibrationError, DataError
from quantray.job import run_job
from quantray.spec import QuantSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
X86 = QuantSpec()


def test_worker_setup_error_keeps_its_type_and_message(ray_cluster, tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    with runner.Cluster() as cluster:
        with pytest.raises(CalibrationError, match=r"^shard \d: this worker's prepare_fx gave other observers"):
            runner.calibrate(cluster, tiny_model, example, X86, spec, batches[:2], [[0], [1]], 1,
                             signature=[("activation_post_process_0", "MinMaxObserver")])


def test_bad_sample_on_a_worker_names_shard_batch_and_sample(ray_cluster, tiny_model, digits_plan):
    spec, _, batches, example = digits_plan
    broken = [batches[0], [10**6]]  # an index past the end of the split
    with runner.Cluster() as cluster:
        with pytest.raises(DataError, match=r"^sample 1000000 failed to load: IndexError.*\(shard 1, batch 1, samples"):
            runner.calibrate(cluster, tiny_model, example, X86, spec, broken, [[0], [1]], 1, signature=None)


def _killer_job(tmp_path: Path, marker: Path | None, mode: str = "exact", attempts: int = 3) -> Path:
    """The demo job, its calibration data served by a dataset that SIGKILLs the worker process
    loading the first sample of shard 1 of 2, once if `marker` is given, else every time."""
    spec = load_spec(ROOT / "jobs" / "digits.toml").calibration
    batches = data.make_batches(data.sample_indices(1438, spec.samples, spec.seed), spec.batch_size)
    kill_at = batches[data.assign_shards(len(batches), 2)[1][0]][0]
    kwargs = f'{{ split = "train", kill_at = {kill_at}{"" if marker is None else f", marker = {str(marker)!r}"} }}'
    text = (ROOT / "jobs" / "digits.toml").read_text()
    text = text.replace('source = "digits"\nsplit = "train"',
                        f'source = "factory"\nfactory = "quantray.testing:digits_killer"\nkwargs = {kwargs}')
    text = text.replace('backend = "x86"', f'backend = "x86"\nmode = "{mode}"')
    text = text.replace("threads = 1 ", f"threads = 1\nmax_attempts = {attempts} ")
    job = tmp_path / f"killer-{mode}-{attempts}.toml"
    job.write_text(text)
    return job


@pytest.mark.parametrize("mode", ["exact", "replay"])
def test_killed_worker_is_replaced_and_the_result_is_bit_identical(ray_cluster, tmp_path, mode):
    quiet = Console(file=io.StringIO())
    undisturbed_marker = tmp_path / "already-killed"
    undisturbed_marker.touch()  # the dataset only kills while the marker is absent
    undisturbed = run_job(load_spec(_killer_job(tmp_path, undisturbed_marker, mode)), workers=2,
                          out=tmp_path / "undisturbed", console=quiet, use_cache=False)
    log = io.StringIO()
    disturbed = run_job(load_spec(_killer_job(tmp_path, tmp_path / "kill-once", mode)), workers=2,
                        out=tmp_path / "disturbed", console=Console(file=log, width=300), use_cache=False)
    assert (tmp_path / "kill-once").exists()  # a worker really was killed
    assert "calibration worker for shard 1 died (ActorDiedError); redoing the shard" in log.getvalue()
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (undisturbed, disturbed)]
    assert manifests[0]["calibration_stats"]["attempts"] == {"0": 1, "1": 1}
    assert manifests[1]["calibration_stats"]["attempts"] == {"0": 1, "1": 2}
    assert manifests[0]["qparams_digest"] == manifests[1]["qparams_digest"]
    assert (undisturbed / "qparams.parquet").read_bytes() == (disturbed / "qparams.parquet").read_bytes()


def test_worker_that_keeps_dying_fails_the_run_naming_the_shard(ray_cluster, tmp_path):
    job = _killer_job(tmp_path, marker=None, attempts=2)
    with pytest.raises(CalibrationError, match=r"^calibration shard 1 failed on all 2 attempts \(\[run\] max_attempts\); "
                                               r"last cause: ActorDiedError"):
        run_job(load_spec(job), workers=2, out=tmp_path / "never", console=Console(file=io.StringIO()))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("mode", ["exact", "replay", "fast"])
def test_actors_give_the_serial_reference_result_in_every_mode(ray_cluster, tiny_model, digits_plan, mode):
    from quantray import calibration, observers

    spec, dataset, batches, example = digits_plan
    quant = QuantSpec(mode=mode)
    shards = data.assign_shards(len(batches), 3)
    prepared = calibration.prepare(tiny_model, quant, example)
    with runner.Cluster() as cluster:
        logs, pass2, stats = runner.calibrate(cluster, tiny_model, example, quant, spec, batches, shards, 1,
                                              observers.observer_signature(prepared))
    observers.load_merged(prepared, mode, logs, pass2)
    reference = calibration.prepare(tiny_model, quant, example)
    observers.load_merged(reference, mode, *calibration.calibrate_serial(tiny_model, example, quant, spec, batches, shards))
    assert observers.state_digest(prepared) == observers.state_digest(reference)
    assert stats["mode"] == mode and stats["bytes_from_workers"] > 0 and set(stats["attempts"].values()) == {1}
    if mode == "replay":  # and replay is torch's own single-process calibration
        torch_prepared = calibration.prepare(tiny_model, quant, example)
        for batch in batches:
            torch_prepared(data.load_batch(dataset, batch)[0])
        assert observers.state_digest(prepared) == observers.state_digest(torch_prepared)


def test_killed_evaluation_task_is_retried_and_metrics_are_identical(ray_cluster, tmp_path):
    text = (ROOT / "jobs" / "digits.toml").read_text()
    outs = {}
    for name, marker in (("undisturbed", tmp_path / "already"), ("disturbed", tmp_path / "kill-once")):
        if name == "undisturbed":
            marker.touch()
        test_section = (f'source = "factory"\nfactory = "quantray.testing:digits_killer"\n'
                        f'kwargs = {{ split = "test", kill_at = 200, marker = "{marker}" }}')
        job = tmp_path / f"{name}.toml"
        job.write_text(text.replace('[test]\nsource = "digits"\nsplit = "test"', f"[test]\n{test_section}"))
        outs[name] = run_job(load_spec(job), workers=2, out=tmp_path / name, console=Console(file=io.StringIO()))
    assert (tmp_path / "kill-once").exists()  # an evaluation worker really died
    for name in ("metrics.json", "predictions.parquet", "layers.parquet"):
        before = (outs["undisturbed"] / name).read_bytes()
        after = (outs["disturbed"] / name).read_bytes()
        if name == "metrics.json":  # latency is measured, not merged: compare everything else
            before, after = (json.loads(b) for b in (before, after))
            for m in (before, after):
                m.pop("speed")
                for model in ("fp32", "int8"):
                    m[model].pop("latency_ms"), m[model].pop("torchscript_latency_ms", None)
        assert before == after, name

"""Where a job runs: on Ray, or in the driver's process when a pool would cost more than it saves.
The choice never changes what is computed: a run in the driver gives a Ray run's files, byte for byte."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEMO_JOB, ROOT, quiet

import quantray
from quantray.errors import SpecError
from quantray.pipeline import load
from quantray.pipeline.placement import place
from quantray.spec import load_spec

SAME = ("qparams.parquet", "predictions.parquet", "model_int8.pth", "layers.parquet")


@pytest.fixture(scope="module")
def demo_job():
    return load(load_spec(DEMO_JOB))


def test_what_was_asked_is_kept_and_contradictions_are_one_line(demo_job, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert place(demo_job, executor="ray", address=None, workers=None).kind == "ray"
    assert place(demo_job, executor="driver", address=None, workers=1).record() == {
        "kind": "driver", "executor": "driver", "why": "asked for"}
    assert place(demo_job, executor="auto", address=None, workers=2).why == "2 workers asked for"
    named = place(demo_job, executor="auto", address="127.0.0.1:6379", workers=None)
    assert (named.kind, named.why) == ("ray", "a cluster is named (--address)")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a submitted job's
    assert place(demo_job, executor="auto", address=None, workers=None).why == "a cluster is named (RAY_ADDRESS)"
    with pytest.raises(SpecError, match=r"^--address 127.0.0.1:6379 with executor 'driver': the driver runs the job "
                                        r"in this process; drop one of them$"):
        place(demo_job, executor="driver", address="127.0.0.1:6379", workers=None)
    with pytest.raises(SpecError, match=r"^--workers 3 with executor 'driver': the driver is one worker"):
        place(demo_job, executor="driver", address=None, workers=3)


def test_a_job_file_names_its_executor_and_a_typo_is_one_line(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(DEMO_JOB.read_text().replace("threads = 1", 'threads = 1\nexecutor = "drivr"'))
    with pytest.raises(SpecError) as raised:
        load_spec(job)
    assert str(raised.value) == (f"{job}: [run] executor = 'drivr': one of 'auto', 'ray', 'driver' "
                                 "(did you mean 'driver'?)")
    job.write_text(DEMO_JOB.read_text().replace("threads = 1", 'threads = 1\nexecutor = "driver"'))
    assert load_spec(job).run.executor == "driver"


@pytest.mark.ray
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a pool of one saves nothing: every job is small")
def test_auto_weighs_the_measured_forwards_against_a_pools_start(tmp_path):
    """In a process without Ray: the demo (about a second of forwards) runs here, start to end without
    importing Ray; the same job whose samples each take 10 ms to load (about 14 s) goes to Ray."""
    slow = tmp_path / "slow.toml"
    slow.write_text(DEMO_JOB.read_text().replace('source = "digits"\nsplit = "train"',
                                                 'source = "factory"\nfactory = "quantray.testing:digits_slow"\n'
                                                 'kwargs = { split = "train", ms = 10 }')
                    .replace('source = "digits"\nsplit = "test"',
                             'source = "factory"\nfactory = "quantray.testing:digits_slow"\n'
                             'kwargs = { split = "test", ms = 10 }'))
    program = ("import json, sys\nfrom quantray.pipeline import load\nfrom quantray.pipeline.placement import place\n"
               "from quantray.spec import load_spec\n"
               "print(json.dumps([place(load(load_spec(p)), executor='auto', address=None, workers=None).record() "
               "for p in sys.argv[2:]] + [place(load(load_spec(sys.argv[2])), executor='auto', address=None, "
               "workers=None, test_passes=10, pools=2).record()]))\nprint('ray' in sys.modules)\n"
               "from quantray.cli import main\nprint(main(['run', sys.argv[2], '--out', sys.argv[1]]), 'ray' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["QUANTRAY_CACHE"] = str(tmp_path / "home")  # no `quantray up` cluster
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path / "run"), str(DEMO_JOB), str(slow)],
                          capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    demo, heavy, tuned = json.loads(done.stdout.splitlines()[0])
    assert demo["kind"] == "driver" and demo["estimate"]["forwards_s"] < 3, demo
    assert demo["estimate"]["pool_cost_s"] == 4.0 and demo["why"].endswith("a pool costs about 4 s to start")
    assert heavy["kind"] == "ray" and heavy["estimate"]["forwards_s"] > 10, heavy
    # tune's: 10 forwards per test sample, and on Ray two pools (its own, its best trial's run's)
    assert tuned["kind"] == "driver" and tuned["estimate"]["pool_cost_s"] == 6.0, tuned
    assert done.stdout.splitlines()[1] == "False"  # choosing imported no Ray
    assert done.stdout.splitlines()[-1] == "0 False"  # nor did the demo's whole run, in this process
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["pool"]["placement"]["kind"] == "driver"


@pytest.mark.ray
def test_a_run_in_the_driver_writes_a_ray_runs_files_byte_for_byte(ray_cluster, demo_runs, tmp_path):
    """Even with Ray initialised in this process (which `auto` would use), `executor="driver"`
    computes every statistic in this process: the 1- and 2-worker Ray runs' files, byte for byte."""
    result = quantray.run(DEMO_JOB, executor="driver", use_cache=False, out=tmp_path / "driver", console=quiet())
    for name in SAME:
        for layout in ("1 worker", "2 workers"):
            assert (tmp_path / "driver" / name).read_bytes() == (Path(demo_runs[layout].location) / name).read_bytes(), name
    pool = result.manifest["pool"]
    assert pool["placement"] == {"kind": "driver", "executor": "driver", "why": "asked for"}
    assert pool["nodes"] == {"0": "driver"} and pool["workers"] == 1 and "ray_start" not in result.manifest["timings_s"]
    left = quantray.run(DEMO_JOB, use_cache=False, out=tmp_path / "auto", console=quiet())
    assert left.manifest["pool"]["placement"]["why"] == "a cluster is named (Ray initialised in this process)"
    again = quantray.evaluate(result.location, executor="driver", use_cache=False, out=tmp_path / "again", console=quiet())
    assert again.manifest["pool"]["placement"]["kind"] == "driver"
    assert (tmp_path / "again" / "predictions.parquet").read_bytes() == (tmp_path / "driver" / "predictions.parquet").read_bytes()


@pytest.mark.ray
def test_a_failure_in_the_driver_is_the_same_one_line_as_on_ray(capsys, tmp_path):
    from quantray.cli import main

    job = tmp_path / "job.toml"
    job.write_text(DEMO_JOB.read_text().replace('[test]\nsource = "digits"\nsplit = "test"',
                                                '[test]\nsource = "factory"\nfactory = "quantray.testing:digits_failing"\n'
                                                'kwargs = { split = "test", fail_at = 2 }'))
    assert main(["run", str(job), "--out", str(tmp_path / "runs" / "r"), "--executor", "driver"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("quantray: error: evaluate: test batch 0 of 6: sample 2 failed to load: "
                       "ValueError: cannot decode sample 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "quantray-home"]

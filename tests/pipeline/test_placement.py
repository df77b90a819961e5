"""Where a job runs: on Ray where a cluster is named, else in the driver's process, its workers as
threads. The choice never changes what is computed: a run in the driver gives a Ray run's files,
byte for byte, for any count of worker threads."""

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


def test_what_was_asked_is_kept_and_contradictions_are_one_line(demo_job, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("QUANTRAY_CACHE", str(tmp_path))  # no `quantray up` cluster
    assert place(demo_job, executor="ray", address=None).kind == "ray"
    assert place(demo_job, executor="driver", address=None).record() == {
        "kind": "driver", "executor": "driver", "why": "asked for"}
    named = place(demo_job, executor="auto", address="127.0.0.1:6379")
    assert (named.kind, named.why) == ("ray", "a cluster is named (--address)")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a submitted job's
    assert place(demo_job, executor="auto", address=None).why == "a cluster is named (RAY_ADDRESS)"
    with pytest.raises(SpecError, match=r"^--address 127.0.0.1:6379 with executor 'driver': the driver runs the job "
                                        r"in this process; drop one of them$"):
        place(demo_job, executor="driver", address="127.0.0.1:6379")


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
def test_auto_runs_a_job_here_on_worker_threads_without_importing_ray(tmp_path):
    """In a process without Ray and no cluster named, the demo runs here on as many worker threads as
    this process has CPUs, start to end without importing Ray; the reason is in the manifest."""
    program = ("import json, sys\nfrom quantray.cli import main\n"
               "print(main(['run', sys.argv[2], '--out', sys.argv[1]]), 'ray' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["QUANTRAY_CACHE"] = str(tmp_path / "home")  # no `quantray up` cluster
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path / "run"), str(DEMO_JOB)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "0 False"  # the run's exit status; Ray never imported
    assert "running in this process, without Ray: no cluster is named" in " ".join(done.stderr.split())
    pool = json.loads((tmp_path / "run" / "manifest.json").read_text())["pool"]
    cpus = len(os.sched_getaffinity(0))
    assert pool["placement"] == {"kind": "driver", "executor": "auto", "why": "no cluster is named: worker threads "
                                 "here use this machine's CPUs without starting Ray and its workers"}
    assert pool["workers"] == min(cpus, 6) and set(pool["nodes"].values()) == {"driver"}  # 6 test batches


@pytest.mark.ray
def test_a_run_in_the_driver_writes_a_ray_runs_files_byte_for_byte(ray_cluster, demo_runs, tmp_path):
    """Even with Ray initialised in this process (which `auto` would use), `executor="driver"`
    computes every statistic in this process, on 1 or 3 worker threads at once: the 1- and 2-worker
    Ray runs' files, byte for byte."""
    for threads in (1, 3):
        result = quantray.run(DEMO_JOB, executor="driver", workers=threads, use_cache=False,
                              out=tmp_path / f"driver{threads}", console=quiet())
        for name in SAME:
            for layout in ("1 worker", "2 workers"):
                assert ((tmp_path / f"driver{threads}" / name).read_bytes()
                        == (Path(demo_runs[layout].location) / name).read_bytes()), (threads, name)
        pool = result.manifest["pool"]
        assert pool["placement"] == {"kind": "driver", "executor": "driver", "why": "asked for"}
        assert pool["nodes"] == {str(w): "driver" for w in range(threads)} and pool["workers"] == threads
        assert "ray_start" not in result.manifest["timings_s"]
    left = quantray.run(DEMO_JOB, use_cache=False, out=tmp_path / "auto", console=quiet())
    assert left.manifest["pool"]["placement"]["why"] == "a cluster is named (Ray initialised in this process)"
    again = quantray.evaluate(result.location, executor="driver", use_cache=False, out=tmp_path / "again", console=quiet())
    assert again.manifest["pool"]["placement"]["kind"] == "driver"
    assert (tmp_path / "again" / "predictions.parquet").read_bytes() == (tmp_path / "driver3" / "predictions.parquet").read_bytes()


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

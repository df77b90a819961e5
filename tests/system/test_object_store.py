"""Every place quantray takes a URI, against a real S3 protocol endpoint on loopback (moto's server),
reached as a cluster reaches its store: endpoint, region and credentials from the environment.

The article's job packed to s3://, run with its run directory and stored statistics on S3, run again
reusing them, evaluated again from S3; nightly refreshes into an S3 registry, SIGKILLed while staging
and while uploading; and a two-node Ray cluster on which no node has the data on disk."""

import datetime
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import DEMO_JOB, quiet, start_ray_node, stop_process
from rich.console import Console

import quantray
from quantray.cli import main
from quantray.commands.pack import pack
from quantray.commands.refresh import STALE_UPLOAD, promoted_run, refresh
from quantray.spec import load_spec
from quantray.testing import article_job

pytestmark = pytest.mark.ray  # every test here starts Ray or another process

BIN = Path(sys.executable).parent


def _s3() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri("s3://")[0]


def _read(uri: str) -> bytes:
    with _s3().open_input_stream(uri.removeprefix("s3://")) as f:
        return f.read()


def _names(uri: str) -> list[str]:
    infos = _s3().get_file_info(pafs.FileSelector(uri.removeprefix("s3://"), allow_not_found=True))
    return sorted(i.base_name for i in infos)


def _packed(tmp_path: Path, s3: str, stats: str, rows_per_shard: int = 16, **job) -> tuple[Path, Path]:
    """The article job (written here) and the same job packed to `s3`/flowers, whose statistics go
    to `stats`; the folder the shards were packed from is then removed."""
    job_file = article_job(tmp_path / "article", latency_iters=3, **job)
    packed = pack(job_file, f"{s3}/flowers", rows_per_shard=rows_per_shard, console=quiet()).job_file
    packed.write_text(packed.read_text().replace("[run]\n", f'[run]\ncache_dir = "{stats}"\n'))
    return job_file, packed


def test_the_article_job_packed_to_s3_runs_stores_and_evaluates_there(ray_cluster, s3, tmp_path):
    job, packed = _packed(tmp_path, s3, f"{s3}/stats")
    folder = quantray.run(job, workers=2, out=tmp_path / "folder-run", use_cache=False, console=quiet())
    shutil.rmtree(tmp_path / "article" / "data")  # from here on the images exist only on S3

    first = quantray.run(packed, workers=2, out=f"{s3}/runs/first", console=quiet())
    assert first.location == f"{s3}/runs/first"
    assert first.manifest["qparams_digest"] == folder.manifest["qparams_digest"]
    assert _read(f"{s3}/runs/first/predictions.parquet") == (tmp_path / "folder-run" / "predictions.parquet").read_bytes()
    assert json.loads(_read(f"{s3}/runs/first/manifest.json"))["files"].keys() == folder.manifest["files"].keys()
    read = first.manifest["data_read"]
    assert read["shards"]["calibration"]["location"] == f"{s3}/flowers/calibration"
    assert set(read["workers"]) == {"0", "1"} and all(w["calibration"]["row_groups"] >= 1 for w in read["workers"].values())

    log = Console(file=io.StringIO(), width=300)
    second = quantray.run(packed, workers=2, out=f"{s3}/runs/second", console=log)
    text = log.file.getvalue()
    assert f"reused stored statistics: pass1 2 of 2, pass2 2 of 2 (from {s3}/stats)" in text
    assert f"reused stored FP32 outputs: 1 of 1 test batches (from {s3}/stats)" in text
    assert second.manifest["qparams_digest"] == folder.manifest["qparams_digest"]
    assert any(name.startswith("log-") for name in _names(f"{s3}/stats"))

    again = quantray.evaluate(f"{s3}/runs/first", console=quiet())
    assert str(again.location).startswith(f"{s3}/runs/first-eval-")
    assert _read(f"{again.location}/predictions.parquet") == _read(f"{s3}/runs/first/predictions.parquet")
    assert again.manifest["evaluates"]["run_dir"] == f"{s3}/runs/first"
    model = quantray.load_quantized(f"{s3}/runs/first")  # the INT8 model straight from S3
    assert model is not None
    assert main(["report", f"{s3}/runs/first"]) == 0


def test_uris_keep_their_query_when_joined(ray_cluster, s3, s3_server, tmp_path):
    """Endpoint options in the URI itself (no AWS_ENDPOINT_URL), as a user with several stores writes them."""
    query = f"?endpoint_override={s3_server.removeprefix('http://')}&scheme=http"
    job = tmp_path / "digits.toml"
    job.write_text(DEMO_JOB.read_text().replace("threads = 1 ", f'cache_dir = "{s3}/stats{query}"\nthreads = 1 '))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, COLUMNS="300")
    env.pop("AWS_ENDPOINT_URL")
    done = subprocess.run([str(BIN / "quantray"), "run", str(job), "--workers", "2", "--out", f"{s3}/runs/q{query}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run directory {s3}/runs/q{query}" in done.stdout
    assert "manifest.json" in _names(f"{s3}/runs/q") and _names(f"{s3}/stats")


@pytest.fixture
def s3_registry(ray_cluster, s3, tmp_path):
    """A registry on S3 with one promoted digits run, refreshed (an injected clock) the night before
    the real clock's now: every night of these tests is placed relative to the real clock, which
    stamps what a `quantray refresh` subprocess writes."""
    job = tmp_path / "digits.toml"
    job.write_text(DEMO_JOB.read_text())
    night = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - datetime.timedelta(days=1)
    row = refresh(load_spec(job), f"{s3}/reg", workers=2, console=quiet(), now=lambda: night)
    assert row["promoted"]
    return f"{s3}/reg", job, night


def _history(registry: str) -> list[dict]:
    return pq.read_table(pa.BufferReader(_read(f"{registry}/history.parquet"))).to_pylist()


@pytest.mark.parametrize("kill_at", ["staged", "uploading"])
def test_a_refresh_killed_on_s3_leaves_the_promoted_model_and_history(s3_registry, ray_cluster, kill_at):
    registry, job, night = s3_registry
    promoted, rows = promoted_run(registry), _history(registry)
    pointer = _read(f"{registry}/PROMOTED")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, QUANTRAY_KILL_AT=kill_at)
    proc = subprocess.run([str(BIN / "quantray"), "refresh", str(job), "--registry", registry, "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _read(f"{registry}/PROMOTED") == pointer and _history(registry) == rows
    runs = _names(f"{registry}/runs")
    manifest = json.loads(_read(f"{promoted}/manifest.json"))
    assert all(name in _names(promoted) for name in manifest["files"])  # the promoted run is whole
    if kill_at == "uploading":  # one file up, manifest.json not: no reader takes it as a run
        [partial] = [r for r in runs if r != promoted.rsplit("/", 1)[1]]
        assert "manifest.json" not in _names(f"{registry}/runs/{partial}")
    else:
        assert runs == [promoted.rsplit("/", 1)[1]]  # a URI run is staged on local disk
    # The next refresh, a day past STALE_UPLOAD after the killed one (whose upload has the real clock's
    # time): only then may it take that upload for a killed refresh's, not a live one's.
    later = datetime.datetime.now(datetime.timezone.utc) + STALE_UPLOAD + datetime.timedelta(days=1)
    log = Console(file=io.StringIO(), width=300)
    row = refresh(load_spec(job), registry, workers=2, console=log, now=lambda: later)
    assert row["promoted"] and [r["run_id"] for r in _history(registry)] == [rows[0]["run_id"], row["run_id"]]
    assert sorted(_names(f"{registry}/runs")) == sorted([rows[0]["run_id"], row["run_id"]])
    if kill_at == "uploading":
        assert "an upload a stopped refresh left unfinished" in log.file.getvalue()


def test_two_nodes_without_the_data_on_disk_give_the_local_digest(ray_cluster, s3, tmp_path):
    """Two raylets (one CPU each), a worker on each; the images, the statistics and the run directory
    on S3; the folder packed from removed first. The digest is the folder run's in one process."""
    job, packed = _packed(tmp_path, s3, f"{s3}/stats", rows_per_shard=48, samples=80, train=16)
    folder = quantray.run(job, workers=2, out=tmp_path / "folder-run", use_cache=False, console=quiet())
    shutil.rmtree(tmp_path / "article" / "data")
    temp = Path(tempfile.mkdtemp(prefix="ray2n", dir="/tmp"))  # short: Ray's unix sockets live under it
    head, ports, env = start_ray_node(temp, cpus=1)
    nodes = [head]
    try:
        address = f"127.0.0.1:{ports['port']}"
        nodes.append(start_ray_node(temp, head=address, cpus=1)[0])
        deadline = time.monotonic() + 120
        while '"CPU": 2.0' not in subprocess.run(
                [sys.executable, "-c", f"import ray, json; ray.init({address!r}, logging_level='ERROR'); "
                                       "print(json.dumps(ray.cluster_resources()))"],
                env=env, capture_output=True, text=True).stdout:
            assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, \
                "".join(p.read_text()[-2000:] for p in temp.glob("node-*.log"))
            time.sleep(1)
        done = subprocess.run([str(BIN / "quantray"), "run", str(packed), "--address", address, "--workers", "2",
                               "--out", f"{s3}/runs/two-nodes"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        for node in reversed(nodes):
            stop_process(node)  # only the nodes this test started, by their PIDs
        shutil.rmtree(temp, ignore_errors=True)
    manifest = json.loads(_read(f"{s3}/runs/two-nodes/manifest.json"))
    assert manifest["qparams_digest"] == folder.manifest["qparams_digest"]
    assert len(set(manifest["pool"]["nodes"].values())) == 2  # one worker on each node
    assert manifest["calibration_stats"]["cached"]["pass1"][0] == 0  # computed there, not reused
    read, total = manifest["data_read"]["workers"], manifest["data_read"]["shards"]["calibration"]["bytes"]
    # 2 shards of 3 row groups; each worker's 4 batches lie mostly in one shard: it reads that one
    assert all(0 < read[w]["calibration"]["bytes"] < 0.75 * total for w in ("0", "1")), (read, total)


def test_a_run_uri_in_no_bucket_is_one_line(s3, capsys):
    """`quantray evaluate` and `report` on a URI whose bucket does not exist: one line naming the URI
    as given (a traceback from the store before)."""
    uri = f"{s3}-absent/run"
    for verb in ("evaluate", "report"):
        code = main([verb, uri])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"quantray: error: {uri}"), err

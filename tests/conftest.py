"""Fixtures: one Ray cluster for the session, the demo job's runs, a tiny model, the digits data, a
loopback S3 endpoint. Helpers the tests import live in helpers.py.

Tests that start Ray or any other process (a CLI subprocess, a Ray head, moto's server, Chromium)
carry the `ray` marker, so that `pytest -m "not ray"` is the fast loop: an unmarked test that asks
for the Ray fixture fails at collection, and one that starts a process fails when it does."""

import os
import subprocess
import tempfile

# Before ray or quantray are imported: a loopback test cluster without token auth (DESIGN.md), and
# quantray's own folder (stored statistics) in a temporary place rather than the user's home.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["QUANTRAY_CACHE"] = tempfile.mkdtemp(prefix="quantray-test-cache-")

from quantray.testing import free_port  # noqa: E402

# The S3 endpoint the `s3` fixture starts on loopback, reached as a cluster reaches its store: through
# the environment (credentials, endpoint, region), which Ray's workers inherit from this process.
S3_PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="quantray-test",
                  AWS_SECRET_ACCESS_KEY="quantray-test-secret", AWS_DEFAULT_REGION="us-east-1")
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import DEMO_JOB, quiet, stored_demo_job  # noqa: E402

from quantray.core import flow  # noqa: E402
from quantray.demo import DigitsCNN  # noqa: E402
from quantray.inputs import data  # noqa: E402
from quantray.spec import DataSpec  # noqa: E402

flow.quiet_torch_warnings()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session: a ray.init per test costs 5x more (DESIGN.md). Idle task
    workers are kept rather than killed once calibration actors push the worker count past the CPU
    count, so that each run's evaluation tasks find workers that already imported torch (6 s each
    otherwise); actors are new processes for every run either way."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}},
             _system_config={"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 3_600_000})
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_model():
    """An untrained DigitsCNN with fixed weights: shared pooling observers, conv+relu fusions."""
    torch.manual_seed(0)
    return DigitsCNN().eval()


@pytest.fixture
def digits_plan():
    """The calibration plan the exactness tests share: 200 train digits in batches of 32."""
    spec = DataSpec(source="digits", split="train", samples=200, batch_size=32, seed=0)
    dataset = data.digits("train")
    indices = data.sample_indices(len(dataset), spec.samples, spec.seed)
    batches = data.make_batches(indices, spec.batch_size)
    example = data.load_batch(dataset, indices[:1])[0]
    return spec, dataset, batches, example


DEMO_LAYOUTS = {"1 worker": (1, None), "2 workers": (2, [1, 0])}  # 2 workers: shard 1 handed out first


@pytest.fixture(scope="session")
def demo_runs(ray_cluster, tmp_path_factory):
    """The demo job run once per layout (workers, shard order), each computing every statistic.
    The 2-worker run stores its statistics in its own folder (`stored_demo_job`) as it goes."""
    import quantray

    base = tmp_path_factory.mktemp("runs")
    stored = stored_demo_job(base)
    return {name: quantray.run(stored if w == 2 else DEMO_JOB, workers=w, console=quiet(), shard_order=order,
                               out=base / name.replace(" ", "_").replace(",", ""), use_cache=w == 2)
            for name, (w, order) in DEMO_LAYOUTS.items()}


@pytest.fixture(autouse=True)
def own_quantray_home(tmp_path, monkeypatch):
    """Each test gets its own stored statistics: no test reuses what another computed."""
    monkeypatch.setenv("QUANTRAY_CACHE", str(tmp_path / "quantray-home"))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in its own process on loopback (a real HTTP S3 protocol endpoint)."""
    from quantray.testing import loopback_s3

    with loopback_s3(S3_PORT) as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_server, request):
    """A new, empty bucket for this test: its s3:// URI."""
    import re

    import pyarrow.fs as pafs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{free_port()}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def pytest_collection_modifyitems(items):
    """A test that uses the Ray cluster must say so: the `ray` marker is what the fast loop skips."""
    for item in items:
        if "ray_cluster" in item.fixturenames and item.get_closest_marker("ray") is None:
            raise pytest.UsageError(f"{item.nodeid} uses the Ray cluster: mark it @pytest.mark.ray")


@pytest.fixture(autouse=True)
def no_process_unless_marked(request, monkeypatch):
    """An unmarked test may not start a process (Ray starts its own with subprocess too)."""
    if request.node.get_closest_marker("ray") is not None:
        return

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.ray")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)

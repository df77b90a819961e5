"""Shared fixtures: one Ray cluster for the session, the demo job's runs, a tiny model, the digits
data, and the serial calibration the Ray tests compare against."""

import io
import os
import tempfile
from pathlib import Path

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

from quantray.core import flow, sites  # noqa: E402
from quantray.core.calibration import SerialExecutor  # noqa: E402
from quantray.core.modes import MODES, Plan  # noqa: E402
from quantray.core.protocol import calibrate  # noqa: E402
from quantray.demo import DigitsCNN  # noqa: E402
from quantray.inputs import data  # noqa: E402
from quantray.spec import DataSpec, QuantSpec  # noqa: E402

flow.quiet_torch_warnings()
ROOT = Path(__file__).resolve().parents[1]
DEMO_JOB = ROOT / "jobs" / "digits.toml"


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


def serial_calibration(model, example, quant, data_spec, batches, shards, *, order=None, store=None, memory_bytes=0):
    """The protocol in this process: (the driver's prepared model with the statistics loaded, the
    calibration result). `quant` is a QuantSpec or a backend name."""
    quant = QuantSpec(backend=quant) if isinstance(quant, str) else quant
    prepared = flow.prepare(model, quant, example)
    observed = sites.observed_values(prepared)
    plan = Plan(batches, shards, observed, [f"batch-{b}" for b in range(len(batches))] if store else None)
    with SerialExecutor(model, example, quant, data_spec, 1, sites.signature(observed), order=order,
                        memory_bytes=memory_bytes) as executor:
        result = calibrate(MODES[quant.mode], executor, plan, store=store)
    result.stats.load(prepared)
    return prepared, result


def quiet():
    from rich.console import Console

    return Console(file=io.StringIO(), width=300)


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


def stored_demo_job(base: Path) -> Path:
    """The demo job with its stored statistics in `base`/stats."""
    job = base / "digits.toml"
    if not job.exists():
        job.write_text(DEMO_JOB.read_text().replace("threads = 1 ", f'cache_dir = "{base / "stats"}"\nthreads = 1 '))
    return job


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


RAY_PORTS = ("port", "node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port")


def start_ray_node(temp: Path, *, head: str | None = None, cpus: int = 1, dashboard: bool = False):
    """`ray start --block` on loopback, as its own process (stop it with `stop_process`, never `ray
    stop`): the head when `head` is None, else a node joining the head at that GCS address. Returns
    (process, ports, env). Every port is chosen free; workers take a range of 200 that holds none of
    them (Ray refuses an overlap)."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    ports = {name: free_port() for name in RAY_PORTS if head is None or name != "port"}
    if dashboard:
        ports.update({"dashboard-port": free_port(), "ray-client-server-port": free_port()})
    low = next(p for p in iter(free_port, None) if not any(p <= q <= p + 200 for q in ports.values()))
    ports.update({"min-worker-port": low, "max-worker-port": low + 200})
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    role = (["--head", f"--temp-dir={temp}", f"--include-dashboard={str(dashboard).lower()}"]
            + (["--dashboard-host=127.0.0.1"] if dashboard else []) if head is None else [f"--address={head}"])
    log = open(temp / f"node-{ports['node-manager-port']}.log", "w")
    process = subprocess.Popen([str(bin_dir / "ray"), "start", "--block", *role, f"--num-cpus={cpus}",
                                "--node-ip-address=127.0.0.1", *[f"--{k}={v}" for k, v in ports.items()]],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process, ports, env


def stop_process(process) -> None:
    """SIGTERM to this one process (a node this test started), then SIGKILL if it will not stop."""
    import signal
    import subprocess

    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

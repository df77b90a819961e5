"""Shared fixtures: one Ray cluster for the whole session, the demo job's runs, a tiny model, the digits data."""

import io
import os
import tempfile
from pathlib import Path

# Before ray or quantray are imported: a loopback test cluster without token auth (DESIGN.md), and
# the demo checkpoint cached in a temporary folder rather than the user's home.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("QUANTRAY_CACHE", tempfile.mkdtemp(prefix="quantray-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from quantray import data  # noqa: E402
from quantray.calibration import quiet_torch_warnings  # noqa: E402
from quantray.demo import DigitsCNN  # noqa: E402
from quantray.spec import DataSpec  # noqa: E402

quiet_torch_warnings()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session: a ray.init per test costs 5x more (DESIGN.md)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TORCH_CPP_LOG_LEVEL": "ERROR"}})
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


DEMO_LAYOUTS = {"1 worker": (1, None), "2 workers": (2, None), "3 workers": (3, None),
                "3 workers, reversed": (3, [2, 1, 0])}


@pytest.fixture(scope="session")
def demo_runs(ray_cluster, tmp_path_factory):
    """The demo job run once per layout (workers, shard order), each computing every statistic."""
    from rich.console import Console

    from quantray.job import run_job
    from quantray.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "jobs" / "digits.toml")
    base = tmp_path_factory.mktemp("runs")
    quiet = Console(file=io.StringIO())
    return {name: run_job(spec, workers=w, out=base / name.replace(" ", "_").replace(",", ""), console=quiet,
                          shard_order=order, use_cache=False)
            for name, (w, order) in DEMO_LAYOUTS.items()}

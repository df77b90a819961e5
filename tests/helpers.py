"""What the tests share besides fixtures: the demo job's path, quiet consoles, the serial
calibration the parallel ones are compared with, loopback Ray nodes, image folders in real layouts.

    from helpers import DEMO_JOB, quiet, serial_calibration
"""

import io
import os
import shutil
from pathlib import Path

import torch

from quantray.core import flow, sites
from quantray.core.calibration import SerialExecutor
from quantray.core.modes import MODES, Plan
from quantray.core.protocol import calibrate
from quantray.spec import QuantSpec
from quantray.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # renders the HTML pages in tests/report
# CI installs chromium and sets this, so there a missing browser fails the test instead of skipping it.
CHROMIUM_REQUIRED = os.environ.get("QUANTRAY_REQUIRE_CHROMIUM") == "1"


def chromium_flags(profile: Path) -> list[str]:
    """Headless Chromium on a closed network: no background fetches, a fresh profile."""
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={profile}"]
DEMO_JOB = ROOT / "jobs" / "digits.toml"


def serial_calibration(model, example, quant, data_spec, batches, shards, *, order=None, store=None, memory_bytes=0):
    """The protocol in this process: (the driver's prepared model with the statistics loaded, the
    calibration result). `quant` is a QuantSpec or a backend name."""
    quant = QuantSpec(backend=quant) if isinstance(quant, str) else quant
    prepared = flow.prepare(model, quant, example)
    observed = sites.observed_values(prepared)
    plan = Plan(batches, shards, observed, [f"batch-{b}" for b in range(len(batches))] if store else None)
    with SerialExecutor(model, example, quant, data_spec, 1, sites.signature(observed), order=order,
                        memory_bytes=memory_bytes) as executor:
        result = calibrate(MODES[quant.mode], executor, plan, store=store, bias=quant.bias_correction)
    result.stats.load(prepared)
    return prepared, result


def quiet():
    """A console that prints nowhere."""
    from rich.console import Console

    return Console(file=io.StringIO(), width=300)


def stored_demo_job(base: Path) -> Path:
    """The demo job with its stored statistics in `base`/stats."""
    job = base / "digits.toml"
    if not job.exists():
        job.write_text(DEMO_JOB.read_text().replace("threads = 1 ", f'cache_dir = "{base / "stats"}"\nthreads = 1 '))
    return job


def image_folder(root: Path, classes=("daisy", "rose", "tulip"), per_class=12, size=(96, 80)) -> Path:
    """An ImageFolder of noisy JPEGs and one PNG (several formats, as real folders have)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
            suffix = "png" if (k, i) == (1, 3) else "jpg"
            Image.fromarray(pixels).save(root / name / f"{i:02d}.{suffix}")
    return root


def tiny_job(tmp_path: Path, calibration: str, test: str, run: str = "") -> Path:
    """A job of quantray.testing:tiny_cnn with these [calibration], [test] and [run] tables."""
    job = tmp_path / "job.toml"
    job.write_text('name = "packed"\n[model]\nfactory = "quantray.testing:tiny_cnn"\n'
                   f"[calibration]\n{calibration}\n[test]\n{test}\n[run]\n{run}\n")
    return job


def folder_job(tmp_path: Path, transform: str = "imagenet_eval") -> Path:
    """`tiny_job` over an `image_folder` of 36 images (20 calibration samples in batches of 4)."""
    image_folder(tmp_path / "flowers")
    folder = f'source = "imagefolder"\nroot = "flowers"\ntransform = "{transform}"'
    return tiny_job(tmp_path, folder + "\nsamples = 20\nbatch_size = 4", folder + "\nbatch_size = 8")


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

"""`quantray up` / `quantray down`: a local Ray cluster that stays up between commands, so that
reruns, tunes and refreshes on a laptop skip Ray's start (about 4 s of every run here).

    up(cpus=2)      # `ray start --block --head` on loopback, as its own session; returns its state
    running()       # the state of a live one, or None: what `quantray run` joins when no --address
    down()          # SIGTERM to that process group (never `ray stop`, which stops every Ray here)

The state (address, PID, Ray's temp folder) is kept in $QUANTRAY_CACHE/local-cluster.json (else
~/.cache/quantray/), written whole. Nothing here imports Ray: a stale state (the process gone, the
port closed) reads as no cluster. Runs keep their own worker processes: what is saved is Ray's
start, not the workers' imports (README, "Notes").
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import QuantrayError

__all__ = ["up", "down", "running", "state_file"]

_PORTS = ("port", "node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
          "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port", "dashboard-port")


def state_file() -> Path:
    base = os.environ.get("QUANTRAY_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "quantray") / "local-cluster.json"


def running() -> dict | None:
    """The local cluster `quantray up` started, if its process lives and its address answers."""
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    if not _alive(state.get("pid")):
        return None
    host, _, port = state["address"].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return state
    except OSError:
        return None


def up(cpus: int | None = None, timeout_s: float = 60, attempts: int = 3) -> tuple[dict, bool]:
    """Start the local cluster unless one is up: (its state, whether it was started now). Its ports
    are chosen free beforehand; one taken in the meantime (Ray's own processes draw ports too) fails
    that start, which is then tried again on other ports."""
    current = running()
    if current is not None:
        return current, False
    for attempt in range(1, attempts + 1):
        try:
            state = _start(cpus, timeout_s)
            break
        except QuantrayError:
            if attempt == attempts:
                raise
    _write(state_file(), state)
    return state, True


def _start(cpus: int | None, timeout_s: float) -> dict:
    ports = _free_ports()
    temp = Path(tempfile.mkdtemp(prefix="quantray-ray-"))  # short: Ray's socket paths are limited to 107 bytes
    log_path = temp / "ray-start.log"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--head", f"--temp-dir={temp}",
               "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               *([f"--num-cpus={cpus}"] if cpus else []),
               *[f"--{name}={value}" for name, value in ports.items()]]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while b"Ray runtime started" not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            lines = log_path.read_text(errors="replace").strip().splitlines() or ["(no output)"]
            shutil.rmtree(temp, ignore_errors=True)
            raise QuantrayError(f"quantray up: `ray start --head` did not start within {timeout_s:.0f} s: {lines[-1]}")
        time.sleep(0.2)
    return {"address": f"127.0.0.1:{ports['port']}", "pid": process.pid, "temp_dir": str(temp), "cpus": cpus,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def down(timeout_s: float = 30) -> dict | None:
    """Stop the local cluster `quantray up` started (its own process group only); None if none was up."""
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if _alive(pid):
        # SIGTERM to `ray start --block` alone: it stops its children in about a second (sent to the
        # whole group, each child's own shutdown takes ~25 s here)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    state_file().unlink(missing_ok=True)
    shutil.rmtree(state.get("temp_dir") or "/nonexistent", ignore_errors=True)  # Ray's session files and logs
    return state


def _write(path: Path, state: dict) -> None:
    """Whole or not at all: a temporary file beside `path`, then renamed onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    os.replace(temp, path)


def _alive(pid) -> bool:
    """Whether `pid` runs: it exists and is not a zombie (the head's `ray start` outlives the `quantray
    up` that started it; when it exits, whoever adopted it may not reap it at once)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # no /proc (macOS): os.kill's answer
        return True


def _free_ports() -> dict[str, int]:
    """Every port the head listens on, free now (another Ray on this machine keeps its own), and a
    range of 200 for its workers that holds none of them (Ray refuses an overlap)."""
    ports: dict[str, int] = {}
    while len(ports) < len(_PORTS):
        port = _free_port()
        if port not in ports.values():
            ports[_PORTS[len(ports)]] = port
    low = next(p for p in iter(_free_port, None) if p + 200 < 65536 and not any(p <= q <= p + 200 for q in ports.values()))
    return {**ports, "min-worker-port": low, "max-worker-port": low + 200}


def _free_port() -> int:
    with socket.socket() as s:  # on every interface: Ray's agents listen on 0.0.0.0
        s.bind(("", 0))
        return s.getsockname()[1]

"""Every row of the speed table in one run: each against what a user would otherwise run, measured
side by side in this run (whole processes, in turn), then one table.

    python -m benchmarks.table [--growth 10 20 40] [--skip ROW ...]

Rows (each its own benchmark module, run as a subprocess; its output is shown as it goes):

- article:     `benchmarks.article_job` (the article's script as written against `quantray run`
               cold and warm, 100 classes x 10 test JPEGs);
- growth:      the same with 102 classes x K test images per class, for each K of --growth
               (1,020, 2,040, 4,080 images by default): both lines and their ratios;
- demo:        `quantray run jobs/digits.toml` from a fresh process (statistics warm, 3 runs, the
               median), on its own and with `quantray up` running; `quantray --help` and a job
               file's mistake;
- calibration: `benchmarks.calibration` (exact calibration of 1,000 images, 2 workers, against the
               seed's loop at torch's default threads);
- tune-digits: `benchmarks.tune` on jobs/digits_mobile.toml against the anchors' per-trial loop;
- tune-article: `benchmarks.tune --article 2` (the article's job, 204 test images).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("article", "growth", "demo", "calibration", "tune-digits", "tune-article")
ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--growth", type=int, nargs="*", default=[10, 20, 40], help="test images per class (x102)")
    parser.add_argument("--skip", nargs="*", default=[], choices=ROWS)
    args = parser.parse_args(argv)
    table: list[tuple[str, str, str]] = []  # (row, figures, ratio)
    rows = [r for r in ROWS if r not in args.skip]
    started = time.perf_counter()
    if "article" in rows:
        script, cold, warm = _article([])
        table += [("article job (1,000 test images), cold", f"script {script:.1f} s, quantray {cold:.1f} s", f"{script / cold:.2f}x"),
                  ("article job, warm rerun", f"script {script:.1f} s, quantray {warm:.1f} s", f"{script / warm:.2f}x")]
    if "growth" in rows:
        for k in args.growth:
            script, cold, warm = _article(["--classes", "102", "--test", str(k)])
            table.append((f"growth: {102 * k:,} test images", f"script {script:.1f} s, cold {cold:.1f} s, warm {warm:.1f} s",
                          f"cold {script / cold:.2f}x, warm {script / warm:.2f}x"))
    if "demo" in rows:
        table += _demo()
    if "calibration" in rows:
        out = _show([sys.executable, "-m", "benchmarks.calibration", "--images", "1000", "--workers", "2", "--modes", "exact"])
        found = re.search(r"quantray exact\s+2 worker\(s\):\s+([\d.]+) s = ([\d.]+)x the seed loop at (\d+) threads", out)
        seconds, ratio, threads = found.groups()  # against the loop at torch's default threads, as the ratio says
        seed = float(re.search(rf"seed loop, {threads} thread\(s\):\s+([\d.]+) s", out).group(1))
        table.append(("exact calibration, 1,000 images, 2 workers",
                      f"seed loop ({threads} threads) {seed:.1f} s, quantray {seconds} s", f"{ratio}x"))
    for row, extra in (("tune-digits", []), ("tune-article", ["--article", "2"])):
        if row in rows:
            out = _show([sys.executable, "-m", "benchmarks.tune", *extra])
            tune_s = float(re.search(r"\): ([\d.]+) s for \d+ trials", out).group(1))
            anchors = re.search(r"the anchors' way, one process: ([\d.]+) s from launch \(([\d.]+) s from the job's load\); "
                                r"quantray tune is ([\d.]+)x faster \(([\d.]+)x against the loop from the job's load", out)
            launch, loop, ratio, loop_ratio = anchors.groups()
            table.append((f"quantray tune, {'jobs/digits_mobile.toml' if not extra else 'article job'}",
                          f"anchors {launch} s from launch ({loop} s from the load: {loop_ratio}x), tune {tune_s:.1f} s",
                          f"{ratio}x"))
    print(f"\nall rows in {time.perf_counter() - started:.0f} s, on {os.cpu_count()} CPUs; ratios: the baseline's wall over "
          "quantray's (above 1: quantray is faster)")
    width = max(len(r) for r, _, _ in table)
    for row, figures, ratio in table:
        print(f"  {row:<{width}}  {ratio:>22}  {figures}")


def _show(command: list[str], env: dict | None = None) -> str:
    """Run a benchmark, its output shown as it goes; returns that output."""
    print("$ " + " ".join(command[1:] if command[0] == sys.executable else command), flush=True)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        print("  " + line, end="", flush=True)
        lines.append(line)
    if process.wait() != 0:
        raise SystemExit(f"{' '.join(command)}: exit {process.returncode}")
    return "".join(lines)


def _article(extra: list[str]) -> tuple[float, float, float]:
    out = _show([sys.executable, "-m", "benchmarks.article_job", "--rounds", "1", *extra])
    found = re.search(r"round 1: script ([\d.]+) s \| quantray cold ([\d.]+) s .* warm ([\d.]+) s", out)
    return tuple(float(x) for x in found.groups())


def _demo() -> list[tuple[str, str, str]]:
    """The demo as a new user runs it, 3 times each way, whole processes timed from outside."""
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable)) or "quantray"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QUANTRAY_CACHE": f"{tmp}/home"}
        env.pop("RAY_ADDRESS", None)

        def wall(*args, n=3) -> float:
            times = []
            for i in range(n):
                out = Path(tmp) / f"run-{time.monotonic_ns()}"
                t = time.perf_counter()
                done = subprocess.run([exe, *args, *(["--out", str(out)] if args[0] == "run" else [])], cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                times.append(time.perf_counter() - t)
                if done.returncode not in (0, 2):
                    raise SystemExit(done.stderr[-2000:])
            return statistics.median(times)

        wall("run", "jobs/digits.toml", n=1)  # the statistics stored: what every later run finds
        alone = wall("run", "jobs/digits.toml")
        forced = wall("run", "jobs/digits.toml", "--executor", "ray")
        subprocess.run([exe, "up", "--cpus", str(os.cpu_count())], env=env, check=True, capture_output=True)
        try:
            beside = wall("run", "jobs/digits.toml")
            joined = wall("run", "jobs/digits.toml", "--executor", "ray")
        finally:
            subprocess.run([exe, "down"], env=env, check=True, capture_output=True)
        bad = Path(tmp) / "bad.toml"
        bad.write_text((ROOT / "jobs" / "digits.toml").read_text().replace('backend = "x86"', 'backend = "x68"'))
        help_s, error_s = wall("--help"), wall("run", str(bad))
    print(f"demo: {alone:.2f} s (auto), {forced:.2f} s (--executor ray, its own Ray); with `quantray up`: {beside:.2f} s "
          f"(auto), {joined:.2f} s (--executor ray, joining it); --help {help_s:.2f} s, a spec error {error_s:.2f} s")
    return [("digits demo, fresh process (goal 8 s)", f"auto {alone:.2f} s; on its own Ray {forced:.2f} s", f"{forced / alone:.2f}x"),
            ("digits demo, `quantray up` running (goal 4 s)", f"auto {beside:.2f} s; joining it {joined:.2f} s",
             f"{joined / beside:.2f}x"),
            ("quantray --help / a spec error", f"{help_s:.2f} s / {error_s:.2f} s", "")]


if __name__ == "__main__":
    main()

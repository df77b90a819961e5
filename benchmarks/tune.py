"""`quantray tune` against the way the anchors tune (Intel Neural Compressor, NNCF): each trial
re-prepared, re-calibrated and evaluated (FP32 and INT8) in one process, one trial after another.

    python -m benchmarks.tune [--job jobs/digits_mobile.toml] [--max-drop 0.3] [--workers 2] [--executor ray]
    python -m benchmarks.tune --article 2      # the article's job: resnet18 on 224x224 JPEGs

`--article K` writes the article's job as `testing.article_job` does (a Flowers102 folder of
500x375 JPEGs, 102 classes, K test images per class, 100 calibration images in batches of 10, an
untrained resnet18: timings do not depend on its weights) and tunes that.

1. `quantray tune JOB --max-drop PTS --no-cache` as a user runs it (a new process, a fresh stats
   folder): wall time from launch to exit.
2. The same trials (read from its trials.parquet: range method, FP32 modules, weight scheme, cures,
   and the samples each was scored on), the anchors' way, in a new process as a user's script
   runs: prepare_fx with the trial's qconfig (equalized first where the trial equalizes), torch's
   calibration over the job's calibration batches (bias correction's sums gathered in the same
   passes where it corrects), convert_fx, then the FP32 and the INT8 model over the trial's test
   batches. Timed from launch to exit, like step 1, and (as earlier rounds reported it) from the
   job's load to the last trial, without the process's start and imports.
3. Per trial: building the INT8 model from merged statistics (prepare_fx, load, convert_fx,
   TorchScript) against one calibration (prepare_fx, the forward passes, convert_fx).
Ratios are measured in the same run; both sides use one process per worker at one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/digits_mobile.toml")
    parser.add_argument("--max-drop", default="0.3")
    parser.add_argument("--workers", help="quantray's workers (default: as a user runs it, none given)")
    parser.add_argument("--executor", choices=("auto", "ray", "driver"), default="auto",
                        help="where quantray tune runs (default: auto, as a user runs it)")
    parser.add_argument("--article", type=int, metavar="K", help="tune the article's job, K test images per class")
    parser.add_argument("--anchors", nargs=2, metavar=("JOB", "TRIALS_JSON"), help=argparse.SUPPRESS)  # step 2's process
    args = parser.parse_args()
    if args.anchors:
        print(json.dumps(_anchors(Path(args.anchors[0]), json.loads(Path(args.anchors[1]).read_text()))))
        return

    import pyarrow.parquet as pq

    from quantray import pipeline
    from quantray.core import flow
    from quantray.inputs.data import make_batches
    from quantray.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        if args.article:
            from quantray.testing import article_job

            args.job = str(article_job(Path(tmp) / "article", samples=100, classes=range(1, 103), test=args.article))
        spec_text = Path(args.job).read_text()
        job = Path(args.job).resolve().parent / f".bench-{Path(tmp).name}.toml"  # beside it: its relative paths hold
        job.write_text(spec_text.replace("[run]", f'[run]\ncache_dir = "{tmp}/stats"', 1) if "[run]" in spec_text
                       else spec_text + f'\n[run]\ncache_dir = "{tmp}/stats"\n')
        try:
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "quantray.cli", "tune", str(job), "--max-drop", args.max_drop,
                                   *(["--workers", args.workers] if args.workers else []), "--executor", args.executor,
                                   "--no-cache", "--out", f"{tmp}/tune"],
                                  capture_output=True, text=True)
            tune_s = time.perf_counter() - t
            if done.returncode not in (0, 3):
                raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
            rows = pq.read_table(f"{tmp}/tune/trials.parquet").to_pylist()
            summary = json.loads(Path(f"{tmp}/tune/tune.json").read_text())
            placement = json.loads(Path(f"{tmp}/tune/best-run/manifest.json").read_text())["pool"]["placement"]
            print(f"quantray tune (--executor {args.executor}, workers {args.workers or 'not given'}, --no-cache; its best "
                  f"run: {placement['kind']}, {placement['why']}): {tune_s:.1f} s for {len(rows)} trials, "
                  f"exit {done.returncode}")
            best_run = json.loads(Path(f"{tmp}/tune/best-run/manifest.json").read_text())
            print(f"  of which the best trial's run (best-run/: convert, evaluation on [test], per-layer SQNR, speed) "
                  f"{best_run['wall_s']:.1f} s; stages {summary['timings_s']}")

            rows_file = Path(tmp) / "trials.json"
            rows_file.write_text(json.dumps(rows, default=str))
            t = time.perf_counter()  # the anchors' loop as a user runs a script: a new process, its imports included
            done = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--anchors", str(job), str(rows_file)],
                                  capture_output=True, text=True)
            anchors_process_s = time.perf_counter() - t
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            anchors_s, calibrate = json.loads(done.stdout.splitlines()[-1])
            search_s = tune_s - best_run["wall_s"]
            print(f"the anchors' way, one process: {anchors_process_s:.1f} s from launch ({anchors_s:.1f} s from the "
                  f"job's load); quantray tune is {anchors_process_s / tune_s:.2f}x faster ({anchors_s / tune_s:.2f}x "
                  f"against the loop from the job's load; {anchors_process_s / search_s:.2f}x up to its choice, "
                  "without the best trial's run)")

            flow.quiet_torch_warnings()
            torch.set_num_threads(1)
            spec = load_spec(job)
            loaded = pipeline.load(spec)
            build = []
            from quantray.core.calibration import SerialExecutor
            from quantray.core.modes import MODES, Plan
            from quantray.core.protocol import calibrate as run_protocol
            from quantray.core.sites import observed_values, signature

            prepared = flow.prepare(loaded.fp32, spec.quantization, loaded.example)
            observed = observed_values(prepared)
            batches = make_batches(loaded.calib_idx, spec.calibration.batch_size)
            with SerialExecutor(loaded.fp32, loaded.example, spec.quantization, spec.calibration, 1,
                                signature(observed)) as executor:
                stats = run_protocol(MODES["exact"], executor, Plan(batches, [list(range(len(batches)))], observed),
                                     bias=True).stats
            for r in rows:
                trial = _trial(r)
                if trial.equalize:  # built from the equalized calibration: timed like the others, left out here
                    continue
                c = time.perf_counter()
                other = flow.prepare(loaded.fp32, trial.quant(spec.quantization), loaded.example)
                stats.load(other)
                pipeline.quantize(pipeline.Calibrated(other, {}, None, {}, stats, trial.bias), loaded.example)
                build.append(time.perf_counter() - c)
            b, c = sorted(build)[len(build) // 2], sorted(calibrate)[len(calibrate) // 2]
            print(f"per trial (median of {len(build)}): INT8 built from merged statistics {b * 1e3:.0f} ms "
                  f"(TorchScript included), one calibration {c * 1e3:.0f} ms ({c / b:.1f}x)")
        finally:
            job.unlink(missing_ok=True)


def _anchors(job: Path, rows: list[dict]) -> tuple[float, list[float]]:
    """The trials of `rows`, the anchors' way (module docstring, 2): seconds from the job's load to
    the last trial, and each trial's calibration (prepare_fx, the forwards, convert_fx)."""
    from quantray import pipeline
    from quantray.core import flow
    from quantray.core.bias import InputSums, correct_biases, merge_sums
    from quantray.inputs.data import load_batch, make_batches
    from quantray.spec import load_spec

    flow.quiet_torch_warnings()
    torch.set_num_threads(1)
    t = time.perf_counter()
    spec = load_spec(job)
    loaded = pipeline.load(spec)
    calib = [load_batch(loaded.calib_ds, b)[0] for b in make_batches(loaded.calib_idx, spec.calibration.batch_size)]
    test_batches = make_batches(loaded.test_idx, spec.test.batch_size)
    calibrate = []
    with torch.inference_mode():
        for r in rows:
            trial = _trial(r)
            c = time.perf_counter()
            # prepare_fx itself, as a script calls it: not flow.prepare, whose templates serve every range method
            prepared = flow._prepare(loaded.fp32, trial.quant(spec.quantization), loaded.example)
            sums = InputSums(prepared) if trial.bias else None
            per_batch = []
            for x in calib:
                with sums.recording() if sums else contextlib.nullcontext({}) as batch:
                    prepared(x)
                per_batch.append(batch)
            int8 = flow.convert(prepared)
            if trial.bias:  # the same correction, from sums gathered in the same forward passes
                correct_biases(int8, prepared, merge_sums(per_batch))
            calibrate.append(time.perf_counter() - c)
            seen = 0
            for batch in test_batches:
                if seen >= r["samples"]:
                    break
                x, y = load_batch(loaded.test_ds, batch)
                loaded.fp32(x).argmax(1), int8(x).argmax(1)
                seen += len(batch)
    return time.perf_counter() - t, calibrate


def _trial(row: dict):
    """A trials.parquet row as the Trial it was (runs of older versions have no cure columns)."""
    from quantray.commands.tune import Trial

    return Trial(row["range_method"], row["weight"], tuple(row["fp32_modules"]), bool(row.get("equalize")),
                 bool(row.get("bias_correction")))


if __name__ == "__main__":
    main()

"""`quantray evaluate RUN_DIR`: evaluate a finished run's INT8 model again, without calibrating.

    evaluate_run("runs/digits-20261126", data="jobs/more-test.toml", samples=2000)

Another test set (`data`: a TOML file with a [test] table, as in a job) or more samples of the
run's own. The INT8 model is the run's own files (sha256 checked against its manifest); the FP32
model is rebuilt from the run's job and must be the one that was quantized (its state_dict's sha256
is in the manifest). The result is a new directory with the evaluation files of a run
(metrics.json, predictions.parquet, layers.parquet, report.html, manifest.json); the run itself is
never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
import tomllib
from pathlib import Path

import torch
from rich.console import Console

from . import __version__, runner
from .artifacts import RunDir, read_manifest, sha256_bytes, sha256_file, software_versions
from .data import build_dataset
from .errors import SpecError
from .evaluation import state_dict_bytes
from .job import Timings, draw_indices, evaluate_stage, write_html, write_results
from .models import build_model
from .report import make_progress, print_summary
from .spec import load_test_section, parse_spec

__all__ = ["evaluate_run"]


def evaluate_run(run_dir: str | Path, *, data: str | Path | None = None, samples: int | None = None,
                 out: str | Path | None = None, address: str | None = None, console: Console | None = None,
                 use_cache: bool = True):
    """Evaluate the run at `run_dir` on its test set or `data`'s; returns the new directory.
    `use_cache=False` (--no-cache) recomputes the FP32 outputs instead of reusing stored ones."""
    console = console or Console(stderr=True)
    timings, started = Timings(), time.perf_counter()
    stage = timings.stage

    run_dir = Path(run_dir)
    with stage("load"):
        manifest = read_manifest(run_dir)
        for name in ("job.toml", "model_int8.pth", "model_int8.pt"):
            path = run_dir / name
            if not path.is_file() or sha256_file(path) != manifest["files"].get(name):
                raise SpecError(f"{path}: missing or changed since the run (sha256 differs from manifest.json); "
                                "the run cannot be evaluated again as it was")
        job_path = Path(manifest["job"]["path"])
        spec = parse_spec(tomllib.loads((run_dir / "job.toml").read_text()), job_path, manifest["job"]["base_dir"])
        test = load_test_section(data) if data is not None else spec.test
        if samples is not None:
            test = dataclasses.replace(test, samples=samples)
        where = f"{data}: [test]" if data is not None else f"{job_path}: [test]"
        fp32 = build_model(spec.model, spec.path)
        fp32_bytes = state_dict_bytes(fp32)
        if sha256_bytes(fp32_bytes) != manifest["fp32_state_sha256"]:
            raise SpecError(f"{job_path}: [model] the FP32 model is not the one this run quantized (its state_dict's "
                            "sha256 differs from the run's manifest); restore its checkpoint or run the job again")
        test_ds = build_dataset(test, where)
        test_idx = draw_indices(test_ds, test, where, "the test split is empty: nothing to evaluate on")
        int8_state = (run_dir / "model_int8.pth").read_bytes()
        script = (run_dir / "model_int8.pt").read_bytes()
        example = torch.zeros(manifest["input_shape"])
    if not out:
        out = run_dir.parent / f"{run_dir.name}-eval-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    elif "://" not in str(out):
        out = Path(out)

    with RunDir(out) as result:
        with contextlib.ExitStack() as ray_scope:
            with stage("ray_start"):
                cluster = ray_scope.enter_context(runner.Cluster(address))
            with make_progress(console) as progress:
                outcome = evaluate_stage(cluster, spec, test, fp32, test_ds, test_idx, example, int8_state, script,
                                         progress, stage, use_cache, console)
        with stage("write"):
            metrics = write_results(result, outcome, len(fp32_bytes), len(int8_state), len(script))
            if data is not None:
                result.write_bytes("data.toml", Path(data).read_bytes())
        summary = {
            "quantray": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "evaluates": {"run_dir": str(run_dir.resolve()), "created": manifest["created"],
                          "files": {k: manifest["files"][k] for k in ("model_int8.pth", "model_int8.pt")}},
            "job": manifest["job"], "spec": dataclasses.replace(spec, test=test).to_dict(),
            "versions": software_versions(), "backend": spec.quantization.backend, "input_shape": manifest["input_shape"],
            "threads": spec.run.threads, "workers": len(outcome.plan["tasks"]),
            "speed_conditions": outcome.speed["conditions"], "evaluation": outcome.plan,
            "qparams_digest": manifest["qparams_digest"], "fp32_state_sha256": manifest["fp32_state_sha256"],
            "data_digest": sha256_bytes("\n".join(outcome.identities).encode()),
            "timings_s": timings, "wall_s": round(time.perf_counter() - started, 4),
        }
        write_html(result, metrics, outcome.layers, summary)
        final = result.commit(summary)
    print_summary(Console(), metrics, summary, final)
    return final


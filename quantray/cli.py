"""Command line: argument parsing and exit codes only (0 ok, 1 run failed, 2 bad input, 3 gated out,
the tune's budget not met, or an INT8 engine fault found before tune's trials).

    quantray run jobs/digits.toml [--workers N] [--out DIR] [--no-cache] [--address ADDR]
    quantray tune jobs/digits_mobile.toml --max-drop 0.3 [--validation FILE.toml] [--trials N] [--workers N] [--out DIR]
                  [--score-with engine|reference]
    quantray refresh jobs/digits.toml --registry DIR [--workers N] [--address ADDR]
    quantray evaluate RUN_DIR [--data FILE.toml] [--samples N] [--out DIR] [--no-cache] [--address ADDR]
    quantray report RUN_DIR
    quantray up [--cpus N]    /    quantray down       # a local Ray cluster that stays up between commands
    quantray pack jobs/flowers102_resnet18.toml --out s3://bucket/flowers [--rows-per-shard N] [--job-out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from .errors import QuantrayError

__all__ = ["main", "entry"]

GATED_OUT = 3  # `quantray refresh`: the run finished but did not pass its gate; nothing was promoted


def entry() -> None:
    """The `quantray` command: `main`, then out at once. An interpreter that loaded torch spends about
    a second tearing it down at exit (measured: 0.96 s after `import torch` alone, 1.56 s with Ray);
    by then every file is written and closed and Ray is shut down, so leaving without it loses
    nothing. A bug's exception still ends the normal way, with its traceback."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    out = Console()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a warning above the one error line is noise
            return _dispatch(args, out)
    except QuantrayError as e:
        print(f"quantray: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the machine's or the network's (a disk full, an endpoint gone), not a bug's
        from .errors import first_line

        print(f"quantray: error: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quantray: interrupted; nothing was written", file=sys.stderr)
        return 130


def _dispatch(args, out) -> int:
    """The verb. torch and Ray are imported only once the job file has loaded: a spec error is one
    line in a fraction of a second (its torch-dependent checks, such as an architecture's name, run later)."""
    from .spec import load_spec

    if args.command in ("up", "down"):  # no torch, no Ray in this process
        from .cluster import local

        if args.command == "up":
            state, started = local.up(args.cpus)
            print(f"local cluster {'up' if started else 'already up'} at {state['address']} (pid {state['pid']}); "
                  "quantray run, evaluate, tune and refresh join it when given no --address; `quantray down` stops it")
        else:
            state = local.down()
            print(f"local cluster at {state['address']} stopped" if state else "no local cluster is up")
        return 0
    if getattr(args, "address", None) is not None:  # its form, before any work (reachability: on connecting)
        from .cluster.address import check

        check(args.address)
    if args.command == "report":  # the run's files only: no torch, no Ray
        from .report.console import print_summary
        from .storage.artifacts import RunFiles

        files = RunFiles(args.run_dir).verify()
        print_summary(out, files.json("metrics.json"), files.manifest, args.run_dir)
        return 0
    spec = load_spec(args.job) if hasattr(args, "job") else None  # every spec error surfaces here, before Ray starts
    from . import api
    from .core.flow import quiet_torch_warnings

    quiet_torch_warnings()
    if args.command == "evaluate":
        api.evaluate(args.run_dir, data=args.data, samples=args.samples, out=args.out, address=args.address,
                     use_cache=not args.no_cache, executor=args.executor).print(out)
        return 0
    if args.command == "pack":
        from .commands.pack import pack, print_pack

        print_pack(out, pack(spec, args.out, rows_per_shard=args.rows_per_shard, job_out=args.job_out))
        return 0
    if args.command == "tune":
        from .commands.tune import tune

        points = spec.test.headline_is_fraction  # top-1, mIoU, F1: given in points; others in their unit
        result = tune(spec, max_drop=args.max_drop / 100 if points else args.max_drop, validation=args.validation, trials=args.trials,
                      workers=args.workers, out=args.out, address=args.address, use_cache=not args.no_cache,
                      rank_samples=args.rank_samples, score_with=args.score_with, executor=args.executor, console=out)
        return 0 if result.met else GATED_OUT
    if args.command == "refresh":
        from .commands.refresh import refresh

        row = refresh(spec, args.registry, workers=args.workers, address=args.address, executor=args.executor)
        return 0 if row["promoted"] else GATED_OUT
    api.run(spec, workers=args.workers, out=args.out, address=args.address, use_cache=not args.no_cache,
            executor=args.executor).print(out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantray", description="Distributed, bit-exact INT8 post-training quantization on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    address = ("--address", {"help": "an existing Ray cluster (ray://HOST:10001 or HOST:6379; default: $RAY_ADDRESS, "
                                     "else a local cluster is started)"})
    # spec.EXECUTORS, written out: importing spec here would cost `--help` 35 ms
    executor = (("--executor",), {"choices": ("auto", "ray", "driver"), "help": (
        "where the work runs: a pool of Ray workers, worker threads in this process, or auto (default, or the job's "
        "[run] executor): Ray where a cluster is named (--address, RAY_ADDRESS), else this process")})
    run = sub.add_parser("run", help="calibrate, convert and evaluate one job file")
    run.add_argument("job", help="job spec (TOML), e.g. jobs/digits.toml")
    run.add_argument("--workers", type=_positive, help="workers (default: the CPUs Ray sees, or this process may use)")
    run.add_argument("--out", help="run directory to create: a folder or a URI (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--no-cache", action="store_true", help="recompute every stored statistic")
    run.add_argument(address[0], **address[1])
    run.add_argument(*executor[0], **executor[1])
    refresh = sub.add_parser("refresh", help="nightly: run into a registry, gate, promote if it passes "
                                             "(exit 0 promoted, 3 gated out)")
    refresh.add_argument("job", help="job spec (TOML); its [gate] section sets the accuracy gate")
    refresh.add_argument("--registry", required=True,
                         help="registry folder or URI (runs/, gates/, promotions/, PROMOTED, history.parquet)")
    refresh.add_argument("--workers", type=_positive, help="workers (default: the CPUs Ray sees, or this process may use)")
    refresh.add_argument(address[0], **address[1])
    refresh.add_argument(*executor[0], **executor[1])
    tune = sub.add_parser("tune", help="search range methods and layers kept in FP32 for the fewest FP32 layers "
                                       "within an accuracy budget (exit 0 met, 3 not met)")
    tune.add_argument("job", help="job spec (TOML)")
    tune.add_argument("--max-drop", type=_points, required=True, metavar="PTS",
                      help="how much worse the INT8 model's headline may be than FP32's: points of top-1, mIoU or "
                           "F1 (0.3 = 0.3 pt); the target's unit for RMSE (a rise); a [test] metric's own unit")
    tune.add_argument("--validation", metavar="FILE.toml",
                      help="a TOML file whose [test] table (keys as in a job's) is the set choices are made on "
                           "(default: the job's test split; its accuracy is then optimistic)")
    tune.add_argument("--trials", type=_positive, default=64, help="most trials to evaluate (default 64)")
    tune.add_argument("--rank-samples", type=_positive, default=256,
                      help="selection samples (whole batches, from the first) that rank layer sensitivity (default 256)")
    tune.add_argument("--score-with", choices=("engine", "reference"), default="engine",
                      help="score trials with the INT8 engine (default), or with torch's reference quantized model "
                           "where the engine check finds a kernel fault (exit 3 otherwise)")
    tune.add_argument("--workers", type=_positive, help="workers (default: the CPUs Ray sees, or this process may use)")
    tune.add_argument("--out", help="tune directory to create (default: tunes/NAME-TIMESTAMP)")
    tune.add_argument("--no-cache", action="store_true", help="recompute every stored statistic")
    tune.add_argument(address[0], **address[1])
    tune.add_argument(*executor[0], **executor[1])
    evaluate = sub.add_parser("evaluate", help="evaluate a finished run's INT8 model again (another test set, "
                                               "more samples) without calibrating; writes a new directory")
    evaluate.add_argument("run_dir", help="a run directory written by `quantray run` (a folder or a URI)")
    evaluate.add_argument("--data", help="a TOML file whose [test] table (keys as in a job's) replaces the run's test set")
    evaluate.add_argument("--samples", type=_positive, help="test samples to draw (default: the [test] table's)")
    evaluate.add_argument("--out", help="directory to create (default: RUN_DIR-eval-TIMESTAMP beside the run)")
    evaluate.add_argument("--no-cache", action="store_true", help="recompute the FP32 outputs instead of reusing stored ones")
    evaluate.add_argument(address[0], **address[1])
    evaluate.add_argument(*executor[0], **executor[1])
    pack = sub.add_parser("pack", help="write a job's calibration and test splits as Parquet shards (a folder or "
                                       "a URI such as s3://bucket/prefix) and a job file that reads them")
    pack.add_argument("job", help="job spec (TOML)")
    pack.add_argument("--out", required=True, help="where the shards go: OUT/calibration/, OUT/test/ (a folder or a URI)")
    pack.add_argument("--rows-per-shard", type=_positive, default=1000, help="samples per Parquet file (default 1000)")
    pack.add_argument("--job-out", metavar="FILE", help="the job file to write (default: JOB.packed.toml beside JOB)")
    up = sub.add_parser("up", help="start a local Ray cluster that stays up: later commands join it and skip "
                                   "Ray's start (about 4 s each)")
    up.add_argument("--cpus", type=_positive, help="CPUs it offers (default: all of this machine's)")
    sub.add_parser("down", help="stop the local cluster `quantray up` started")
    report = sub.add_parser("report", help="print a finished run's comparison table from its files")
    report.add_argument("run_dir", help="a run directory written by `quantray run`")
    return parser


def _points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected points of top-1 (or the headline's unit), e.g. 0.3, got {text!r}") from None
    if not 0 <= value < math.inf:  # at most 100 points where the headline is a fraction: tune() checks
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value:g}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    entry()

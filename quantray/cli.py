"""Command line: argument parsing and exit codes only (0 ok, 1 run failed, 2 bad input).

    quantray run jobs/digits.toml [--workers N] [--out DIR] [--no-cache] [--address ADDR]
    quantray refresh jobs/digits.toml --registry DIR [--workers N] [--address ADDR]
    quantray evaluate RUN_DIR [--data FILE.toml] [--samples N] [--out DIR] [--no-cache] [--address ADDR]
    quantray report RUN_DIR
"""

from __future__ import annotations

import argparse
import sys

from .errors import QuantrayError

__all__ = ["main"]

GATED_OUT = 3  # `quantray refresh`: the run finished but did not pass its gate; nothing was promoted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantray", description="Distributed, bit-exact INT8 post-training quantization on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="calibrate, convert and evaluate one job file")
    run.add_argument("job", help="job spec (TOML), e.g. jobs/digits.toml")
    run.add_argument("--workers", type=_positive, help="calibration actors (default: the CPUs Ray sees)")
    run.add_argument("--out", help="run directory to create (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--no-cache", action="store_true", help="recompute every calibration statistic")
    run.add_argument("--address", help="an existing Ray cluster (ray://HOST:10001 or HOST:6379; default: "
                                       "$RAY_ADDRESS, else a local cluster is started)")
    refresh = sub.add_parser("refresh", help="nightly: run into a registry, gate, promote if it passes "
                                             "(exit 0 promoted, 3 gated out)")
    refresh.add_argument("job", help="job spec (TOML); its [gate] section sets the accuracy gate")
    refresh.add_argument("--registry", required=True,
                         help="registry folder or pyarrow.fs URI (runs/, gates/, PROMOTED, history.parquet)")
    refresh.add_argument("--workers", type=_positive, help="calibration actors (default: the CPUs Ray sees)")
    refresh.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    evaluate = sub.add_parser("evaluate", help="evaluate a finished run's INT8 model again (another test set, "
                                               "more samples) without calibrating; writes a new directory")
    evaluate.add_argument("run_dir", help="a run directory written by `quantray run`")
    evaluate.add_argument("--data", help="a TOML file whose [test] table (keys as in a job's) replaces the run's test set")
    evaluate.add_argument("--samples", type=_positive, help="test samples to draw (default: the [test] table's)")
    evaluate.add_argument("--out", help="directory to create (default: RUN_DIR-eval-TIMESTAMP beside the run)")
    evaluate.add_argument("--no-cache", action="store_true", help="recompute the FP32 outputs instead of reusing stored ones")
    evaluate.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    report = sub.add_parser("report", help="print a finished run's comparison table from its files")
    report.add_argument("run_dir", help="a run directory written by `quantray run`")
    args = parser.parse_args(argv)

    try:
        from .calibration import quiet_torch_warnings
        from .job import run_job

        quiet_torch_warnings()
        from .spec import load_spec

        if args.command == "report":
            from rich.console import Console

            from .report import print_run

            print_run(Console(), args.run_dir)
            return 0
        if args.command == "evaluate":
            from .reevaluate import evaluate_run

            evaluate_run(args.run_dir, data=args.data, samples=args.samples, out=args.out, address=args.address,
                         use_cache=not args.no_cache)
            return 0
        spec = load_spec(args.job)  # every spec error surfaces here, before Ray starts
        if args.command == "refresh":
            from .refresh import refresh

            row = refresh(spec, args.registry, workers=args.workers, address=args.address)
            return 0 if row["promoted"] else GATED_OUT
        run_job(spec, workers=args.workers, out=args.out, address=args.address, use_cache=not args.no_cache)
    except QuantrayError as e:
        print(f"quantray: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("quantray: interrupted; no run directory was written", file=sys.stderr)
        return 130
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())

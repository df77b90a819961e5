"""Command line: argument parsing and exit codes only (0 ok, 1 run failed, 2 bad input, 3 gated out).

    quantray run jobs/digits.toml [--workers N] [--out DIR] [--no-cache] [--address ADDR]
    quantray refresh jobs/digits.toml --registry DIR [--workers N] [--address ADDR]
    quantray evaluate RUN_DIR [--data FILE.toml] [--samples N] [--out DIR] [--no-cache] [--address ADDR]
    quantray report RUN_DIR
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .errors import QuantrayError

__all__ = ["main"]

GATED_OUT = 3  # `quantray refresh`: the run finished but did not pass its gate; nothing was promoted


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    from .flow import quiet_torch_warnings

    quiet_torch_warnings()
    out = Console()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a warning above the one error line is noise
            return _dispatch(args, out)
    except QuantrayError as e:
        print(f"quantray: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("quantray: interrupted; nothing was written", file=sys.stderr)
        return 130


def _dispatch(args, out) -> int:
    from . import api
    from .spec import load_spec

    if args.command == "report":
        from .artifacts import RunFiles
        from .report import print_summary

        files = RunFiles(args.run_dir)
        print_summary(out, files.json("metrics.json"), files.manifest, args.run_dir)
        return 0
    if args.command == "evaluate":
        api.evaluate(args.run_dir, data=args.data, samples=args.samples, out=args.out, address=args.address,
                     use_cache=not args.no_cache).print(out)
        return 0
    spec = load_spec(args.job)  # every spec error surfaces here, before Ray starts
    if args.command == "refresh":
        from .refresh import refresh

        row = refresh(spec, args.registry, workers=args.workers, address=args.address)
        return 0 if row["promoted"] else GATED_OUT
    api.run(spec, workers=args.workers, out=args.out, address=args.address, use_cache=not args.no_cache).print(out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantray", description="Distributed, bit-exact INT8 post-training quantization on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    address = ("--address", {"help": "an existing Ray cluster (ray://HOST:10001 or HOST:6379; default: $RAY_ADDRESS, "
                                     "else a local cluster is started)"})
    run = sub.add_parser("run", help="calibrate, convert and evaluate one job file")
    run.add_argument("job", help="job spec (TOML), e.g. jobs/digits.toml")
    run.add_argument("--workers", type=_positive, help="calibration actors (default: the CPUs Ray sees)")
    run.add_argument("--out", help="run directory to create: a folder or a URI (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--no-cache", action="store_true", help="recompute every stored statistic")
    run.add_argument(address[0], **address[1])
    refresh = sub.add_parser("refresh", help="nightly: run into a registry, gate, promote if it passes "
                                             "(exit 0 promoted, 3 gated out)")
    refresh.add_argument("job", help="job spec (TOML); its [gate] section sets the accuracy gate")
    refresh.add_argument("--registry", required=True,
                         help="registry folder or URI (runs/, gates/, promotions/, PROMOTED, history.parquet)")
    refresh.add_argument("--workers", type=_positive, help="calibration actors (default: the CPUs Ray sees)")
    refresh.add_argument(address[0], **address[1])
    evaluate = sub.add_parser("evaluate", help="evaluate a finished run's INT8 model again (another test set, "
                                               "more samples) without calibrating; writes a new directory")
    evaluate.add_argument("run_dir", help="a run directory written by `quantray run` (a folder or a URI)")
    evaluate.add_argument("--data", help="a TOML file whose [test] table (keys as in a job's) replaces the run's test set")
    evaluate.add_argument("--samples", type=_positive, help="test samples to draw (default: the [test] table's)")
    evaluate.add_argument("--out", help="directory to create (default: RUN_DIR-eval-TIMESTAMP beside the run)")
    evaluate.add_argument("--no-cache", action="store_true", help="recompute the FP32 outputs instead of reusing stored ones")
    evaluate.add_argument(address[0], **address[1])
    report = sub.add_parser("report", help="print a finished run's comparison table from its files")
    report.add_argument("run_dir", help="a run directory written by `quantray run`")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())

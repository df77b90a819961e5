"""A seeded fuzz of the command line: for every verb, lines with at least one bad value (flags,
paths, URIs, addresses, odd unicode), run in this process. Each must end in exit 1-3 with one error
line (argparse's usage lines allowed before its own), no traceback, and nothing written anywhere.
Only lines refused before any work are made: none starts Ray or builds a model."""

import contextlib
import io
import os
import random
import sys
from pathlib import Path

import pytest
from helpers import DEMO_JOB

from quantray.cli import main

SEED, LINES_PER_VERB = 20261202, 36
VERBS = ("run", "tune", "refresh", "evaluate", "report", "pack", "up", "down")


def _world(tmp: Path) -> dict:
    """The files and folders the lines point at, made once in `tmp` (the working directory)."""
    (tmp / "job.toml").write_text(DEMO_JOB.read_text())
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("a user's file")
    (tmp / "a-file").write_text("not a folder")
    (tmp / "bad.toml").write_text("name = [unclosed")
    (tmp / "unknown.toml").write_text(DEMO_JOB.read_text() + "\n[extra]\nx = 1\n")
    (tmp / "run-without-manifest").mkdir()
    (tmp / "run-without-manifest" / "metrics.json").write_text("{}")
    (tmp / "empty").mkdir()
    return {
        "job": ["job.toml"],
        "bad_job": ["missing.toml", "full", "a-file", "bad.toml", "unknown.toml", "", "x" * 300 + ".toml",
                    "jöb✓\u200b.toml", "http://example.invalid/job.toml", "file:///nonexistent/job.toml",
                    "/proc/self/nothing.toml", "a-file/job.toml", "-"],
        "bad_out": ["full", "a-file", "/", "/proc/quantray-fuzz", "/sys/quantray-fuzz", "a-file/inside", "",
                    "x" * 5000, "http://example.invalid/out", "bogus://x", "/dev/null", "empty/../a-file"],
        "bad_run": ["missing-run", "a-file", "run-without-manifest", "empty", "", "http://example.invalid/run",
                    "file:///nonexistent/run", "x" * 300, "/proc/self"],
        "bad_count": ["0", "-1", "x", "1.5", "", "1e9x", "³"],
        "bad_drop": ["-1", "x", "nan", "-inf", "", "1e400"],
        "bad_address": ["garbage", "[::1]:x", "", "localhost:99999", "ray://", "http://127.0.0.1:1", "host:0",
                        "a b:1"],
        "bad_flag": ["--wrkers", "--out=", "-x", "--no-such-flag"],
        "bad_score": ["engines", "", "REFERENCE"],
    }


def _line(verb: str, rnd: random.Random, w: dict) -> list[str]:
    """One command line for `verb` with at least one bad part."""
    pick = rnd.choice

    def maybe(good, bad):  # a bad value with chance 1/2, else a good one; remembers whether it was bad
        if rnd.random() < 0.5:
            bads.append(True)
            return pick(bad)
        return pick(good)

    bads: list[bool] = []
    if verb in ("up", "down"):
        line = [verb] + (["--cpus", pick(w["bad_count"])] if verb == "up" else [pick(w["bad_flag"])])
        return line
    if verb in ("evaluate", "report"):
        line = [verb, pick(w["bad_run"])]
        bads.append(True)
    else:
        line = [verb, maybe(w["job"], w["bad_job"])]
    if verb in ("run", "tune", "evaluate", "pack") and (verb == "pack" or rnd.random() < 0.7):
        line += ["--out", maybe(["fresh-out"], w["bad_out"])]
    if verb == "refresh":
        line += ["--registry", maybe(["registry"], w["bad_out"][:8])] if rnd.random() < 0.8 else []
    if verb == "tune":
        line += ["--max-drop", maybe(["0.5"], w["bad_drop"])] if rnd.random() < 0.8 else []
        if rnd.random() < 0.3:
            line += ["--score-with", pick(w["bad_score"])]
            bads.append(True)
    if verb in ("run", "tune", "refresh") and rnd.random() < 0.4:
        line += ["--workers", pick(w["bad_count"])]
        bads.append(True)
    if verb == "evaluate" and rnd.random() < 0.3:
        line += ["--samples", pick(w["bad_count"])]
    if verb == "pack" and rnd.random() < 0.3:
        line += ["--rows-per-shard", pick(w["bad_count"])]
        bads.append(True)
    if verb in ("run", "tune", "refresh", "evaluate") and rnd.random() < 0.4:
        line += ["--address", pick(w["bad_address"])]
        bads.append(True)
    if rnd.random() < 0.15:
        line.insert(rnd.randrange(1, len(line) + 1), pick(w["bad_flag"]))
        bads.append(True)
    if not any(bads):  # every part came out good: make the job or the first path bad
        line[1] = pick(w["bad_job"])
    return line


def _tree(*roots: Path) -> set:
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            found.update(os.path.join(folder, n) for n in dirs + files)
    return found


@pytest.mark.parametrize("verb", VERBS)
def test_bad_command_lines_end_in_one_line_and_write_nothing(verb, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `quantray up`'s state, a stats store: nowhere real
    monkeypatch.setenv("QUANTRAY_CACHE", str(tmp_path / "home" / "cache"))
    # A line that slipped through starts no cluster of its own (where the session's Ray is up in this
    # process it runs there instead, and its exit code and files fail the test)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("QUANTRAY_CONNECT_TIMEOUT_S", "1")
    world = _world(tmp_path)
    rnd = random.Random(f"{SEED}-{verb}")
    before = _tree(tmp_path)
    system = {p: p.exists() for p in (Path("/calibration"), Path("/test"), Path("/proc/quantray-fuzz"))}
    failures = []
    for _ in range(LINES_PER_VERB):
        line = _line(verb, rnd, world)
        shown = [a if len(a) < 40 else f"{a[:12]}...({len(a)} chars)" for a in line]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(line)
            except SystemExit as e:  # argparse
                code = e.code
            except BaseException as e:  # a traceback is a bug
                failures.append(f"{shown}: raised {type(e).__name__}: {str(e)[:200]}")
                continue
        lines = [s for s in err.getvalue().splitlines() if s.strip()]
        errors = [s for s in lines if ": error: " in s]
        after = _tree(tmp_path) - before
        if not (code in (1, 2, 3) and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err.getvalue()):
            failures.append(f"{shown}: exit {code}, stderr {[x[:200] for x in lines[-3:]]}")
        if after:
            failures.append(f"{shown}: wrote {sorted(os.path.relpath(p, tmp_path) for p in after)[:3]}")
            before |= after
        if {p: p.exists() for p in system} != system:
            failures.append(f"{shown}: wrote outside its folder")
    assert not failures, "\n".join(failures)

"""The command line: exit codes and one-line errors for every bad input (in-process, `cli.main`),
and the demo as a user types it (the installed `quantray` command, a fresh HOME)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from helpers import DEMO_JOB, ROOT

import quantray
from quantray.cli import main
from quantray.errors import QuantrayError

DEMO = DEMO_JOB.read_text()
# Lines that Ray's log monitor forwards from its own processes, e.g. "(raylet) file_system_monitor.cc:116: ... is
# over 95% full" on a nearly full disk; the session's Ray cluster prints them into whichever test is running.
RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\((raylet|gcs_server|[\w.-]+ pid=\d+)[^)]*\)")


def _main(capsys, *args):
    """`quantray ARGS` in this process: (exit code, stdout, stderr lines other than Ray's forwarded logs)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.strip().splitlines() if not RAY_LOG_LINE.match(line)]


def _job(tmp_path, text, name="job.toml"):
    job = tmp_path / name
    job.write_text(text)
    return job


def _one_line_error(capsys, code_expected, *args) -> str:
    code, _, err = _main(capsys, *args)
    assert code == code_expected and len(err) == 1 and err[0].startswith("quantray: error: "), err
    return err[0].removeprefix("quantray: error: ")


@pytest.mark.parametrize("edit, expected", [
    (("samples = 320", "samples = 320\nbatch = 8"), "[calibration] batch unknown key (did you mean 'batch_size'?)"),
    (('factory = "quantray.demo:digits_cnn"', 'factory = "quantray.demo:digits_cnn"\ncheckpoint = "gone.pth"'),
     "gone.pth': file not found"),
    (('factory = "quantray.demo:digits_cnn"', 'arch = "resnet19"\nnum_classes = 10'),
     "[model] arch = 'resnet19': unknown torchvision architecture (did you mean 'resnet18'?)"),
    (('factory = "quantray.demo:digits_cnn"', 'factory = "quantray.testing:fails"\nkwargs = { x = 3 }'),
     "[model] factory = 'quantray.testing:fails' raised ValueError: no good: 3; fix the factory or its kwargs"),
    (('source = "digits"\nsplit = "train"', 'source = "factory"\nfactory = "quantray.testing:fails"\nkwargs = { x = 4 }'),
     "[calibration] factory = 'quantray.testing:fails' raised ValueError: no good: 4; fix the factory or its kwargs"),
    (('split = "test"', 'split = "test"\nmetric = "quantray.testing:fails"\nmetric_kwargs = { x = 5 }'),
     "[test] metric = 'quantray.testing:fails' raised ValueError: no good: 5; fix the factory or its kwargs"),
    (('split = "test"', 'split = "test"\nmetric = "quantray.testing:returns_list"'),
     "[test] metric = 'quantray.testing:returns_list' returned list, which lacks state(), merge(), value(), headline "
     "(a str: the key of value() to gate on); expected an object with state(output, target), merge(a, b), value(state) "
     "and headline"),
    (('split = "test"', 'split = "test"\nmetric = "quantray.testing:mean_abs_metric"'),
     "[test] metric = 'quantray.testing:mean_abs_metric': scoring the first test samples raised RuntimeError: The size "
     "of tensor a (10) must match the size of tensor b (2)"),
    (('split = "test"', 'split = "test"\ntask = "segmentation"'),
     "[test] task = 'segmentation': targets of shape (2,) (torch.int64) do not fit outputs of shape (2, 10); "
     "task = \"segmentation\" expects outputs (N, C, H, W) and integer class masks (N, H, W)"),
    (('split = "test"', 'split = "test"\noutput = "aux"'),
     "[test] output = 'aux': the model has no such output; it returns 'output'"),
    (('split = "test"', 'split = "test"\ntask = "regression"'),
     "[test] task = 'regression': targets of shape (2,) do not fit outputs of shape (2, 10); task = \"regression\" "
     "expects one target value per output value"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, edit, expected):
    job = _job(tmp_path, DEMO.replace(*edit))
    message = _one_line_error(capsys, 2, "run", job, "--out", tmp_path / "runs" / "r")
    assert message.startswith(f"{job}: ") and expected in message
    assert not (tmp_path / "runs" / "r").exists() and not any((tmp_path / "runs").glob(".*"))


def test_label_free_data_needs_a_label_free_task(capsys, tmp_path):
    photos = (ROOT / "jobs" / "photos_agreement.toml").read_text()
    job = _job(tmp_path, photos.replace('task = "agreement"', ""))
    message = _one_line_error(capsys, 2, "run", job, "--out", tmp_path / "r")
    assert message == (f"{job}: [test] task = 'classification' expects one integer class label per sample, the data "
                       "gives no targets (label-free data); for label-free data use task = \"agreement\"")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("what", ["whole model", "with other objects"])
def test_a_checkpoint_that_is_not_a_state_dict_says_what_to_save(capsys, tmp_path, what):
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model if what == "whole model" else {"model": model, "epoch": 3}, tmp_path / "saved.pth")
    job = _job(tmp_path, DEMO.replace('factory = "quantray.demo:digits_cnn"',
                                      'arch = "resnet18"\nnum_classes = 10\ncheckpoint = "saved.pth"'))
    message = _one_line_error(capsys, 2, "run", job, "--out", tmp_path / "r")
    assert message == (f"{job}: [model] checkpoint = '{tmp_path / 'saved.pth'}': holds a pickled "
                       "torchvision.models.resnet.ResNet object, not just weights (saved with torch.save(model) or "
                       "with other objects), which weights-only loading refuses for safety: unpickling it can run "
                       "code; save the weights with torch.save(model.state_dict(), path) and point checkpoint at "
                       "that file")
    assert "\x1b[" not in message


def test_an_unusable_out_is_refused_before_the_model_is_built(capsys, tmp_path):
    marker = tmp_path / "model-was-built"
    job = _job(tmp_path, DEMO.replace('factory = "quantray.demo:digits_cnn"',
                                      f'factory = "quantray.testing:marked_digits_cnn"\nkwargs = {{ marker = "{marker}" }}'))
    (tmp_path / "a-file").write_text("not a folder")
    message = _one_line_error(capsys, 2, "run", job, "--out", tmp_path / "a-file" / "run")
    assert message == (f"--out {tmp_path / 'a-file' / 'run'}: cannot create it: {tmp_path / 'a-file'} is a file, "
                       "not a folder; choose another --out")
    message = _one_line_error(capsys, 2, "run", job, "--out", "/sys/quantray-test/run")  # read-only, even for root
    assert message.startswith("--out /sys/quantray-test/run: cannot write there (") and "choose a folder" in message
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    message = _one_line_error(capsys, 2, "run", job, "--out", tmp_path / "taken")
    assert "already exists and is not empty" in message and [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert not marker.exists()


@pytest.mark.ray
def test_report_prints_the_table_again_from_the_files(capsys, demo_runs, tmp_path):
    run = demo_runs["2 workers"].location
    code, out, _ = _main(capsys, "report", run)
    assert code == 0
    for text in ("FP32 vs INT8 (359 test samples)", "top-1 95% CI", "latency p50/p90", "logit SQNR", "qparams digest",
                 "worst of 7 layers (64 samples)", "quantized Linear", "2 calibration workers"):
        assert text in out
    assert _one_line_error(capsys, 2, "report", tmp_path) == f"{tmp_path}: not a quantray run directory (no manifest.json)"


@pytest.mark.ray
def test_evaluate_on_another_test_set_without_calibrating(capsys, demo_runs, tmp_path):
    run = Path(demo_runs["2 workers"].location)
    other = _job(tmp_path, '[test]\nsource = "digits"\nsplit = "train"\nbatch_size = 50\n', "other.toml")
    out = tmp_path / "eval"
    code, stdout, err = _main(capsys, "evaluate", run, "--data", other, "--samples", 300, "--out", out)
    assert code == 0, err
    assert "FP32 vs INT8 (300 test samples)" in stdout and f"evaluation of {run}" in stdout
    assert not any("calibrate" in line for line in err)  # no calibration: the run's INT8 model is reused
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["test"]["split"] == "train" and manifest["evaluation"]["samples"] == 300
    assert (out / "data.toml").read_text() == other.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 300 and metrics["int8"]["top1"] >= 0.9  # digits it was calibrated near
    assert _main(capsys, "report", out)[0] == 0


@pytest.mark.ray
def test_evaluate_refuses_what_it_cannot_trust_with_one_line(capsys, demo_runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_runs["2 workers"].location, copy)

    def refused(*args, expected):
        message = _one_line_error(capsys, 2, "evaluate", *args, "--out", tmp_path / "never")
        assert expected in message
        assert not (tmp_path / "never").exists()

    no_test = _job(tmp_path, '[calibration]\nsource = "digits"\n', "no_test.toml")
    refused(copy, "--data", no_test, expected="no_test.toml: test missing section [test]")
    typo = _job(tmp_path, '[test]\nsource = "digits"\nbatchsize = 8\n', "typo.toml")
    refused(copy, "--data", typo, expected="[test] batchsize unknown key (did you mean 'batch_size'?)")
    refused(tmp_path, expected="not a quantray run directory (no manifest.json)")
    refused(copy, "--samples", 5000, expected="[test] samples = 5000: asked for 5000 samples but the split has only 359")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["fp32_state_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    refused(copy, expected="the FP32 model is not the one this run quantized")
    manifest["fp32_state_sha256"] = demo_runs["2 workers"].manifest["fp32_state_sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    qparams = (copy / "qparams.parquet").read_bytes()
    (copy / "qparams.parquet").write_bytes(qparams[:len(qparams) // 2])   # not a model file: checked all the same
    refused(copy, expected=f"{copy / 'qparams.parquet'}: changed since the run ({len(qparams) // 2} bytes, sha256 ")
    code, _, err = _main(capsys, "report", copy)
    assert code == 2 and len(err) == 1 and "qparams.parquet: changed since the run" in err[0]
    with pytest.raises(QuantrayError, match=r"qparams.parquet: changed since the run"):
        quantray.load_quantized(copy)
    (copy / "qparams.parquet").write_bytes(qparams)
    (copy / "layers.parquet").unlink()
    refused(copy, expected=f"{copy / 'layers.parquet'}: missing, though manifest.json lists it")
    shutil.copy(Path(demo_runs["2 workers"].location) / "layers.parquet", copy / "layers.parquet")
    (copy / "model_int8.pth").write_bytes(b"truncated")
    refused(copy, expected="model_int8.pth: changed since the run")


def test_a_test_sample_that_fails_to_load_is_found_before_calibrating(capsys, tmp_path):
    """The first two test samples are scored on the driver before any work (the task check)."""
    job = _job(tmp_path, DEMO.replace('[test]\nsource = "digits"\nsplit = "test"',
                                      '[test]\nsource = "factory"\nfactory = "quantray.testing:digits_failing"\n'
                                      'kwargs = { split = "test", fail_at = 1 }'))
    message = _one_line_error(capsys, 1, "run", job, "--out", tmp_path / "r")
    assert message == f"{job}: [test] sample 1 failed to load: ValueError: cannot decode sample 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"]


@pytest.mark.ray
def test_a_failure_at_run_time_exits_1_with_one_line(capsys, ray_cluster, tmp_path):
    job = _job(tmp_path, DEMO.replace('[test]\nsource = "digits"\nsplit = "test"',
                                      '[test]\nsource = "factory"\nfactory = "quantray.testing:digits_failing"\n'
                                      'kwargs = { split = "test", fail_at = 2 }'))  # 0 and 1 are checked first
    code, _, err = _main(capsys, "run", job, "--out", tmp_path / "runs" / "r")
    assert code == 1 and err[-1] == ("quantray: error: evaluate: test batch 0 of 6: sample 2 failed to load: "
                                     "ValueError: cannot decode sample 2")
    assert err[0] == 'note: torch deprecates FX quantization (flow = "fx"); see flow = "pt2e"'  # once per run
    assert all(line.startswith(("calibrate: pass", "evaluate ")) for line in err[1:-1])  # progress, then the error
    # no run, no staging folder, not even runs/, which was made for it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "quantray-home"]


@pytest.mark.ray
@pytest.mark.parametrize("address", [["--executor", "ray"], ["--address", "local"]], ids=["executor ray", "address local"])
def test_the_demo_runs_as_a_user_types_it_with_no_warnings(tmp_path, address):
    """The installed command, a fresh HOME, no RAY_AUTH_MODE: Ray keeps token authentication for the
    local cluster it starts (the token lands in HOME), and says nothing about it. `--address local`
    (Ray's word for a new local cluster) is as quiet: no C++ notice from the workers, no colour codes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "QUANTRAY_CACHE")}
    env["HOME"] = str(tmp_path / "home")
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable))
    result = subprocess.run([exe, "run", "jobs/digits.toml", "--out", tmp_path / "run", "--workers", "2", *address], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FP32 vs INT8" in result.stdout and "top-1 accuracy" in result.stdout and "worst of" in result.stdout
    assert "Token authentication" not in result.stderr and "Warning" not in result.stderr and "\x1b" not in result.stderr
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["fp32"]["top1"] >= 0.95 and metrics["int8"]["top1"] >= metrics["fp32"]["top1"] - 0.01


@pytest.mark.ray
def test_a_worker_killed_while_evaluating_is_replaced_and_the_results_are_unchanged(capsys, ray_cluster, demo_runs,
                                                                                 tmp_path):
    """The pool redoes a dead worker's evaluation calls on a new worker: the same predictions."""
    job = _job(tmp_path, DEMO.replace('[test]\nsource = "digits"\nsplit = "test"',
                                      '[test]\nsource = "factory"\nfactory = "quantray.testing:digits_killer"\n'
                                      f'kwargs = {{ split = "test", kill_at = 100, marker = "{tmp_path / "once"}" }}'))
    code, _, err = _main(capsys, "run", job, "--out", tmp_path / "r", "--workers", "2")
    assert code == 0 and (tmp_path / "once").exists()  # a worker really was killed
    said = " ".join(" ".join(err).split())  # rich wraps long lines
    assert "evaluation worker 1 died (ActorDiedError); redoing its calls on a new worker, attempt 2 of 3" in said
    before = pq.read_table(Path(demo_runs["2 workers"].location) / "predictions.parquet")
    assert pq.read_table(tmp_path / "r" / "predictions.parquet").equals(before)


@pytest.mark.ray
@pytest.mark.parametrize("verb", ["--help", "spec error", "report"])
def test_help_a_spec_error_and_report_import_neither_torch_nor_ray(demo_runs, tmp_path, verb):
    """What a new user runs first answers at once: no torch or Ray import (2 s) before the answer."""
    bad = _job(tmp_path, DEMO.replace("samples = 320", "samples = 320\nbatch = 8"))
    args = {"--help": ["--help"], "spec error": ["run", str(bad)], "report": ["report", str(demo_runs["1 worker"].location)]}
    program = ("import sys\nfrom quantray.cli import main\ntry:\n    rc = main(%r)\nexcept SystemExit as e:\n    rc = e.code\n"
               "print('IMPORTED', [m for m in ('torch', 'ray') if m in sys.modules], rc)") % args[verb]
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == f"IMPORTED [] {2 if verb == 'spec error' else 0}", done.stderr


@pytest.mark.ray
def test_a_local_cluster_that_stays_up_is_joined_and_changes_nothing_in_the_run(demo_runs, tmp_path):
    """`quantray up`, two runs that join it (saying so), the same files as a run that started its own
    Ray, `quantray down`: its processes gone, and runs start their own Ray again."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(QUANTRAY_CACHE=str(tmp_path / "home"), RAY_AUTH_MODE="disabled")
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable))

    def cli(*args, timeout=300):
        done = subprocess.run([exe, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    started = cli("up", "--cpus", "2", timeout=120).stdout
    state = json.loads((tmp_path / "home" / "local-cluster.json").read_text())
    try:
        assert started.startswith(f"local cluster up at {state['address']} (pid {state['pid']})")
        assert cli("up").stdout.startswith(f"local cluster already up at {state['address']}")
        reference = Path(demo_runs["1 worker"].location)
        for k in range(2):  # the second reuses what the first stored
            run = cli("run", "jobs/digits.toml", "--out", tmp_path / f"run{k}", "--workers", "1", "--executor", "ray")
            assert f"using the local cluster at {state['address']}" in run.stderr
            for name in ("qparams.parquet", "predictions.parquet", "model_int8.pth", "layers.parquet"):
                assert (tmp_path / f"run{k}" / name).read_bytes() == (reference / name).read_bytes(), name
        # left to choose, a job runs in this process even beside a cluster (on the same CPUs), and says so
        run = cli("run", "jobs/digits.toml", "--out", tmp_path / "alone")
        said = " ".join(run.stderr.split())
        assert "running in this process, without Ray:" in said and "using the local cluster" not in said
        assert "`quantray up`'s runs on this machine's CPUs" in said
        for name in ("qparams.parquet", "predictions.parquet", "model_int8.pth", "layers.parquet"):
            assert (tmp_path / "alone" / name).read_bytes() == (reference / name).read_bytes(), name
    finally:
        stopped = cli("down", timeout=120).stdout
    assert stopped.strip() == f"local cluster at {state['address']} stopped"
    stat = Path(f"/proc/{state['pid']}/stat")   # gone, or a zombie its adoptive parent has not reaped yet
    assert not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z"
    assert not (tmp_path / "home" / "local-cluster.json").exists() and not Path(state["temp_dir"]).exists()
    assert cli("down").stdout.strip() == "no local cluster is up"


@pytest.mark.parametrize("address, expected", [
    ("garbage", "--address 'garbage': not a Ray address; expected HOST:PORT"),
    ("[::1]:x", "--address '[::1]:x': port 'x' is not a number from 1 to 65535"),
    ("", "--address '': not a Ray address"),
    ("localhost:99999", "--address 'localhost:99999': port '99999' is not a number from 1 to 65535"),
    ("http://127.0.0.1:8265", "--address 'http://127.0.0.1:8265': Ray does not speak http://"),
])
def test_a_malformed_address_is_one_line_before_any_work(capsys, tmp_path, address, expected):
    for verb in (["run", DEMO_JOB, "--out", tmp_path / "r"], ["evaluate", tmp_path, "--out", tmp_path / "r"]):
        message = _one_line_error(capsys, 2, *verb, "--address", address)
        assert message.startswith(expected) and not (tmp_path / "r").exists()


@pytest.mark.ray
def test_an_unreachable_address_is_one_line_within_seconds(tmp_path):
    """Nothing listens on the port: exit 1 with one line, where Ray would retry for minutes."""
    from quantray.testing import free_port

    port = free_port()
    exe = shutil.which("quantray", path=os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.monotonic()
        done = subprocess.run([exe, "run", "jobs/digits.toml", "--out", tmp_path / "r", "--address", address], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        lines = [line for line in done.stderr.strip().splitlines() if line.startswith("quantray: error:")]
        assert done.returncode == 1 and lines == [done.stderr.strip().splitlines()[-1]], done.stderr[-2000:]
        assert f"cannot reach a Ray cluster at 127.0.0.1:{port} (Connection refused)" in lines[0]
        assert time.monotonic() - started < 60 and not (tmp_path / "r").exists()


def test_pack_out_is_checked_like_run_out_before_anything_is_packed(capsys, tmp_path):
    """A file, a non-empty folder, the file-system root, a system folder: one line, nothing packed,
    nothing written anywhere. Its own earlier shards are a re-pack, taken."""
    job = _job(tmp_path, DEMO)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    cases = {
        tmp_path / "a-file": f"--out {tmp_path / 'a-file'}: is a file, not a folder; choose another --out",
        tmp_path / "taken": f"--out {tmp_path / 'taken'}: already exists and is not empty; choose another --out or remove it",
        "/": "--out /: already exists and is not empty",
        "/proc/quantray-test": "--out /proc/quantray-test: cannot write there (",
        "/sys/quantray-test": "--out /sys/quantray-test: cannot write there (",
        "/dev/null": "--out /dev/null: is a file, not a folder",
        "": "--out '': empty; give a folder or a URI",
    }
    for out, expected in cases.items():
        assert _one_line_error(capsys, 2, "pack", job, "--out", out).startswith(expected), out
    assert not (tmp_path / "job.packed.toml").exists() and not Path("/calibration").exists() and not Path("/test").exists()
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    for _ in range(2):  # packed, then packed again into the same folder: its own shards
        code, _, err = _main(capsys, "pack", job, "--out", tmp_path / "shards")
        assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["calibration", "test"]


def test_paths_that_no_verb_can_use_are_one_line_with_the_uri_as_given(capsys, tmp_path):
    long = tmp_path / ("x" * 300)
    assert _one_line_error(capsys, 2, "run", "http://example.invalid/job.toml") == (
        "http://example.invalid/job.toml: a job file is read from a local path, not a URI; copy it to this machine first")
    assert _one_line_error(capsys, 2, "run", "") == "job file '': empty; give the job file (a .toml file)"
    assert _one_line_error(capsys, 2, "refresh", DEMO_JOB, "--registry", "") == "--registry '': empty; give a folder or a URI"
    assert _one_line_error(capsys, 2, "report", long) == f"{long / 'manifest.json'}: cannot read it (File name too long)"
    assert _one_line_error(capsys, 2, "tune", DEMO_JOB, "--max-drop", "1", "--out", tmp_path / "t",
                           "--validation", "s3://bucket/data.toml") == (
        "s3://bucket/data.toml: a data file is read from a local path, not a URI; copy it to this machine first")
    assert not list(tmp_path.iterdir())


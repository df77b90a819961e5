"""The storage layer: whole-then-move writes at a path or a URI, run directories published whole,
and staging folders told apart by whether a live process holds them."""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from quantray.errors import SpecError
from quantray.storage.store import StagedDir, Store, sweep_staging


@pytest.mark.parametrize("uri", [False, True])
def test_writes_are_whole_and_leave_no_temporary_behind(tmp_path, uri):
    store = Store(f"file://{tmp_path}/s" if uri else tmp_path / "s", "[run] cache_dir")
    store.write(b"one", "a", "b.bin")
    store.write(b"two", "a", "b.bin")  # replaces
    assert store.read("a", "b.bin") == b"two" and store.read("a", "missing") is None
    assert store.names("a") == ["b.bin"] and store.names("nowhere") == [] and store.exists("a", "b.bin")
    assert str(store.where("a", "b.bin")) == (f"file://{tmp_path}/s/a/b.bin" if uri else str(tmp_path / "s" / "a" / "b.bin"))


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    store = Store(tmp_path, "--registry")
    store.write(b"old", "PROMOTED")

    class Unwritable:  # fails once the temporary file is open, as a full disk would
        def __buffer__(self, flags):
            raise OSError("disk full")

    with pytest.raises((OSError, TypeError)):
        store.write(Unwritable(), "PROMOTED")
    assert store.read("PROMOTED") == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["PROMOTED"]


def test_an_unknown_scheme_is_one_line_naming_the_setting():
    with pytest.raises(SpecError, match=r"^--registry = 'nope://x/y': not a location pyarrow.fs can open .*use a local path"):
        Store("nope://x/y", "--registry")


@pytest.mark.parametrize("uri", [False, True])
def test_a_run_directory_appears_whole_with_its_manifest_last(tmp_path, uri):
    final = f"file://{tmp_path}/runs/r1" if uri else tmp_path / "runs" / "r1"
    with StagedDir(final) as run:
        run.write_bytes("model_int8.pth", b"weights")
        run.write_parquet("rows.parquet", [{"a": 1}], pa.schema([("a", pa.int64())]))
        assert not (tmp_path / "runs" / "r1").exists()  # nothing visible before commit
        location = run.commit({"job": "x"})
    assert location == final
    written = tmp_path / "runs" / "r1"
    assert sorted(p.name for p in written.iterdir()) == ["manifest.json", "model_int8.pth", "rows.parquet"]
    assert set(run.manifest["files"]) == {"model_int8.pth", "rows.parquet"} and run.manifest["job"] == "x"
    left = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]
    assert left == []  # no staging folder, no lock


def test_a_failed_run_leaves_nothing_and_a_taken_out_is_refused(tmp_path):
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, empty or not
    with pytest.raises(RuntimeError):
        with StagedDir(tmp_path / "kept" / "r"):
            raise RuntimeError("the run failed")
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "kept").rmdir()
    with pytest.raises(RuntimeError):
        with StagedDir(tmp_path / "runs" / "r"):
            raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []  # runs/, made for it, is gone too
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "x").write_text("mine")
    with pytest.raises(SpecError, match="already exists and is not empty"):
        StagedDir(tmp_path / "runs" / "taken")
    uri = f"file://{tmp_path}/runs/taken"
    with pytest.raises(SpecError, match=f"--out {uri}: already exists and is not empty"):
        StagedDir(uri)
    (tmp_path / "runs" / "empty").mkdir()
    with StagedDir(tmp_path / "runs" / "empty") as run:  # an empty folder given as --out is fine
        run.commit({})


def _holder(path, then: str) -> subprocess.Popen:
    """A process that opens a staging folder for `path`, then sleeps ("hold") or kills itself ("die")."""
    code = ("import os, signal, sys, time; from quantray.storage.store import StagedDir\n"
            f"s = StagedDir({str(path)!r}); (s.staging / 'half.bin').write_bytes(b'x'); print('ready', flush=True)\n"
            + ("time.sleep(120)" if then == "hold" else "os.kill(os.getpid(), signal.SIGKILL)"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.ray
def test_sweep_removes_what_dead_processes_left_and_never_what_a_live_one_holds(tmp_path):
    dead = _holder(tmp_path / "dead", "die")
    assert dead.wait() == -signal.SIGKILL
    live = _holder(tmp_path / "live", "hold")
    try:
        mine = StagedDir(tmp_path / "mine")  # held by this process
        removed = sweep_staging(tmp_path)
        assert [p.name.split(".partial-")[0] for p in removed] == [".dead"]
        names = sorted(p.name.split(".partial-")[0] for p in tmp_path.iterdir())
        assert names == [".live", ".live", ".mine", ".mine"]  # each folder and its lock
        mine.abort()
    finally:
        live.kill()
        live.wait()
    assert [p.name.split(".partial-")[0] for p in sweep_staging(tmp_path)] == [".live"]
    assert list(tmp_path.iterdir()) == []


def test_sweep_leaves_a_lockless_staging_folder_of_an_older_quantray_for_a_day(tmp_path):
    old = tmp_path / ".run.partial-abcd1234"
    old.mkdir()
    assert sweep_staging(tmp_path) == []
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    assert sweep_staging(tmp_path) == [old] and not old.exists()


@pytest.mark.ray  # a new interpreter: the only place torchvision is surely not imported yet
def test_software_versions_give_torchvisions_build_without_importing_it():
    """The manifest's torchvision version is torchvision.__version__ (its build included), found
    without the 3-5 s import a job that never uses torchvision would otherwise pay."""
    import torchvision

    code = ("import sys; from quantray.storage.artifacts import software_versions; "
            "v = software_versions(); print(v['torchvision'], 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [torchvision.__version__, "False"]

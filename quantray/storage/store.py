"""Where quantray keeps files: a local folder or any URI pyarrow.fs understands (s3://, gs://, file://).

    store = Store("s3://bucket/quantray/stats", "[run] cache_dir")
    store.write(payload, "log-abc.pt")      # written whole under a temporary name, then moved into place
    store.read("log-abc.pt")                # the bytes, or None when absent

    with StagedDir("runs/digits-1") as run: # a run directory: staged, then published whole by `commit`
        run.write_bytes("model_int8.pth", payload)
        run.commit(manifest)

Every write is whole-then-move: readers see a file complete or not at all (a rename on a local disk,
a single object on an object store). A run directory is staged in a hidden folder beside its final
place (published by one rename) or, for a URI, in a local temporary folder (uploaded with
manifest.json last). Each staging folder holds an exclusive lock for as long as its process lives,
so `sweep_staging` can tell a folder left by a killed process from one that is being written.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..digest import sha256_bytes
from ..errors import SpecError, first_line

__all__ = ["Store", "StagedDir", "is_uri", "join", "sweep_staging", "failpoint", "check_local_folder"]

_PARTIAL = ".partial-"        # staging folders: .NAME.partial-XXXXXXXX, their lock beside them
_LOCKLESS_AGE_S = 24 * 3600   # a staging folder without a lock (an older quantray's) is stale after a day


def is_uri(location) -> bool:
    """A URI (scheme://...) rather than a local path; Path() would fold its '//' into '/'."""
    return "://" in str(location)


def join(location, *parts: str, suffix: str = ""):
    """`location`/parts (then `suffix` on the last name), a Path for a local folder or a URI string; a
    URI's query (`?endpoint_override=...&scheme=http`) stays at its end, where pyarrow.fs reads it."""
    if not is_uri(location):
        joined = Path(location).joinpath(*parts)
        return joined.with_name(joined.name + suffix) if suffix else joined
    base, mark, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + suffix + mark + query


class Store:
    """A folder, local or at a URI; `what` names the setting it came from in error messages."""

    def __init__(self, location: str | Path, what: str):
        self.what = what
        if not str(location).strip():
            raise SpecError(f"{what} {str(location)!r}: empty; give a folder or a URI")
        if is_uri(location):
            try:
                self.fs, root = pafs.FileSystem.from_uri(str(location))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
                raise SpecError(f"{what} = {str(location)!r}: not a location pyarrow.fs can open "
                                f"({first_line(e)}); use a local path or e.g. s3://bucket/prefix") from None
            self.location: str | Path = join(location)  # no trailing slash
        else:
            self.fs, root = pafs.LocalFileSystem(), str(Path(location).expanduser().absolute())
            self.location = Path(root)
        self.root = root.rstrip("/") or "/"

    @property
    def local(self) -> Path | None:
        """The folder on this machine's disk, or None for a remote store."""
        return self.location if isinstance(self.location, Path) else None

    def where(self, *parts: str) -> str | Path:
        """The user-facing location of `parts` (a Path, or a URI string)."""
        return join(self.location, *parts)

    def child(self, *parts: str) -> "Store":
        return Store(self.where(*parts), self.what)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def read(self, *parts: str) -> bytes | None:
        """The file's bytes, or None where there is no such file. On this machine's disk, a file
        that is there but cannot be read (no permission, a name too long) is one SpecError line."""
        try:
            with self.fs.open_input_stream(self._path(*parts)) as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            if self.local is None:  # an object store's error (no bucket, no endpoint): the caller's to say
                raise
            raise SpecError(f"{self.where(*parts)}: cannot read it ({os.strerror(e.errno) if e.errno else first_line(e)})") from None

    def check_writable(self) -> None:
        """Create the folder's parent now (on an object store: find its bucket and rights), so that a
        location that cannot be written fails before any work, with one line; the folder itself
        appears only when something is written into it."""
        try:
            self.fs.create_dir(self.root.rpartition("/")[0] or self.root, recursive=True)
        except OSError as e:
            raise SpecError(f"{self.what} {self.location}: cannot write there ({first_line(e)}); "
                            f"check the bucket, the credentials and the endpoint, or choose another {self.what}") from None

    def check_output(self, reuse=None) -> None:
        """That this folder can take a command's output, as one SpecError line before any work: not
        a file, absent or empty (or holding only what `reuse(names)` accepts: this command's own
        earlier output), in a place that can be written (on an object store: its bucket and rights)."""
        if self.local is not None:
            check_local_folder(self.local, self.what)
        else:
            self.check_writable()
        names = [n for n in self.names() if not n.startswith(".")]
        if names and not (reuse is not None and reuse(names)):
            raise SpecError(f"{self.what} {self.location}: already exists and is not empty; choose another "
                            f"{self.what} or remove it")

    def open_input_file(self, *parts: str):
        """A random-access file (pyarrow's NativeFile): reads fetch only the ranges asked for."""
        return self.fs.open_input_file(self._path(*parts))

    def write(self, payload: bytes, *parts: str) -> None:
        """Write `payload` whole under a hidden temporary name in the same folder, then move it into place."""
        final = self._path(*parts)
        folder, _, name = final.rpartition("/")
        self.fs.create_dir(folder or "/", recursive=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(payload)
            self.fs.move(tmp, final)
        except BaseException:
            _quietly(self.fs.delete_file, tmp)
            raise

    def names(self, *parts: str) -> list[str]:
        """The names directly in folder `parts` (files and folders), sorted; [] if there is none."""
        selector = pafs.FileSelector(self._path(*parts), allow_not_found=True)
        try:
            return sorted(info.base_name for info in self.fs.get_file_info(selector))
        except NotADirectoryError:
            return []

    def sizes(self, *parts: str) -> dict[str, int]:
        """The files directly in folder `parts`, with their sizes in bytes; {} if there is none."""
        selector = pafs.FileSelector(self._path(*parts), allow_not_found=True)
        try:
            return {i.base_name: i.size for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File}
        except NotADirectoryError:
            return {}

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._path(*parts)).type != pafs.FileType.NotFound

    def delete_file(self, *parts: str) -> None:
        _quietly(self.fs.delete_file, self._path(*parts))

    def delete_dir(self, *parts: str) -> None:
        _quietly(self.fs.delete_dir, self._path(*parts))


def check_local_folder(path: Path, what: str) -> None:
    """That a folder can be made (or written into) at `path`, with nothing left behind by the check:
    one SpecError line for a file in its place or above it, a place that cannot be written (a
    system folder such as /proc or /sys, a read-only one), or a name too long for the file system."""
    try:
        if path.exists() and not path.is_dir():
            raise SpecError(f"{what} {path}: is a file, not a folder; choose another {what}")
        ancestor = next(p for p in (path, *path.parents) if p.exists())
        if not ancestor.is_dir():
            raise SpecError(f"{what} {path}: cannot create it: {ancestor} is a file, not a folder; choose another {what}")
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".quantray-probe-"))  # the only sure test of writing
    except OSError as e:
        raise SpecError(f"{what} {path}: cannot write there ({e.strerror or type(e).__name__}); "
                        f"choose a folder you can write to") from None


class StagedDir:
    """A run directory written into a staging folder and published whole by `commit`.

    `final` is a local path (staged beside it, published by one rename: atomic) or a URI (staged in a
    local temporary folder, uploaded file by file, each read back and checked against its sha256,
    then manifest.json last: a reader that finds manifest.json finds every file it lists, intact). Leaving the `with` block on an exception, or `abort`,
    removes the staging folder; a killed process leaves one that `sweep_staging` removes later.
    Everything about `final` that can be checked is checked here, before any work is done.
    """

    def __init__(self, final: str | Path, what: str = "--out"):
        self.what, self.store, self._made = what, Store(final, what), []
        if self.store.local is None:
            self.store.check_writable()
            if self.store.names():
                raise SpecError(f"{what} {self.store.location}: already exists and is not empty; choose another {what}")
            self.final = self.store.location
            self._lock, self.staging = _claim_staging(Path(tempfile.gettempdir()), "quantray-run")
            return
        self.final = self.store.local
        if self.final.exists() and not (self.final.is_dir() and not any(self.final.iterdir())):
            raise SpecError(f"{what} {self.final}: already exists and is not empty; choose another {what} or remove it")
        try:
            # the folders made for it (runs/ for runs/NAME): removed again if the command fails
            self._made = [p for p in (self.final.parent, *self.final.parent.parents) if not p.exists()]
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock, self.staging = _claim_staging(self.final.parent, self.final.name)
        except (NotADirectoryError, FileExistsError):
            blocker = next((p for p in self.final.parents if p.exists() and not p.is_dir()), self.final.parent)
            raise SpecError(f"{what} {self.final}: cannot create it: {blocker} is a file, not a folder; "
                            f"choose another {what}") from None
        except OSError as e:  # permission denied, a read-only file system, ...
            raise SpecError(f"{what} {self.final}: cannot write there ({e.strerror or type(e).__name__}); "
                            f"choose a folder you can write to") from None

    def __enter__(self) -> "StagedDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_bytes(self, name: str, payload: bytes) -> Path:
        self.path(name).write_bytes(payload)
        return self.path(name)

    def write_json(self, name: str, obj) -> Path:
        return self.write_bytes(name, json_bytes(obj))

    def write_parquet(self, name: str, rows: list[dict], schema: pa.Schema) -> Path:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), self.path(name))
        return self.path(name)

    def commit(self, manifest: dict) -> str | Path:
        """Record every file's sha256 in manifest.json, then publish the folder; returns its location."""
        files = {p.relative_to(self.staging).as_posix(): sha256_bytes(p.read_bytes())
                 for p in sorted(self.staging.rglob("*")) if p.is_file()}  # a folder inside: its files, by path
        self.write_json("manifest.json", dict(manifest, files=files))
        self.manifest = json.loads(self.path("manifest.json").read_bytes())  # as readers will see it
        if self.store.local is None:
            for k, name in enumerate(files):
                self.store.write(self.path(name).read_bytes(), *name.split("/"))
                if k == 0:
                    failpoint("uploading")
            for name, digest in files.items():  # read back before the manifest makes the run visible
                got = self.store.read(*name.split("/"))
                if got is None or sha256_bytes(got) != digest:
                    raise OSError(f"{self.store.where(name)}: what was uploaded is not what was written "
                                  f"({'missing' if got is None else f'{len(got)} bytes, another sha256'}); "
                                  "the run was not published: run it again")
            self.store.write(self.path("manifest.json").read_bytes(), "manifest.json")  # the manifest last
            self.abort()
        else:
            os.chmod(self.staging, 0o755)  # mkdtemp makes it 0700
            os.rename(self.staging, self.final)  # atomic; replaces an empty folder given as --out
            self._unlock()
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()
        for folder in self._made:  # innermost first; one that holds anything stays
            _quietly(os.rmdir, folder)
        self._made = []

    def _unlock(self) -> None:
        if self._lock is not None:
            _release(self._lock, unlink=True)
            self._lock = None


def json_bytes(obj) -> bytes:
    """JSON as quantray writes it: indented, keys sorted, one trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def sweep_staging(folder: str | Path) -> list[Path]:
    """Remove the staging folders under `folder` that no live process holds; return what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for staging in entries:
        if not (staging.name.startswith(".") and _PARTIAL in staging.name):
            continue
        if staging.name.endswith(".lock"):  # a lock whose folder was published or removed
            orphan = staging.with_name(staging.name.removesuffix(".lock"))
            handle = None if orphan.exists() else _try_lock(staging)
            if handle is not None:
                _release(handle, unlink=True)
            continue
        lock = staging.with_name(staging.name + ".lock")
        if lock.exists():
            handle = _try_lock(lock)
            if handle is None:
                continue  # a live process is writing it
            shutil.rmtree(staging, ignore_errors=True)
            _release(handle, unlink=True)
        elif time.time() - staging.stat().st_mtime > _LOCKLESS_AGE_S:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            continue
        removed.append(staging)
    return removed


def _claim_staging(parent: Path, name: str):
    """A lock file, held, then the staging folder it guards: .NAME.partial-XXXXXXXX(.lock)."""
    prefix = f".{name}{_PARTIAL}"
    while True:
        staging = parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        lock = staging.with_name(staging.name + ".lock")
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        handle = os.fdopen(fd, "w")
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: a sweep may hold it for a moment
        if not _same_file(handle, lock):    # ... and have removed it as an orphan: start again
            handle.close()
            continue
        try:
            staging.mkdir()
        except FileExistsError:
            _release((handle, lock), unlink=True)
            continue
        except BaseException:
            _release((handle, lock), unlink=True)
            raise
        return (handle, lock), staging


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _try_lock(lock: Path):
    try:
        handle = open(lock, "a")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle, lock


def _release(lock, unlink: bool) -> None:
    handle, path = lock
    if unlink:
        Path(path).unlink(missing_ok=True)
    handle.close()


def failpoint(name: str) -> None:
    """A test of crash safety sets QUANTRAY_KILL_AT=name: the process SIGKILLs itself there, exactly
    as a machine that loses power would stop (no cleanup runs). A test of a race sets
    QUANTRAY_PAUSE_AT=name:SECONDS: the process sleeps there, holding the window open for another."""
    if os.environ.get("QUANTRAY_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    at, _, seconds = os.environ.get("QUANTRAY_PAUSE_AT", "").partition(":")
    if at == name:
        time.sleep(float(seconds or 10))


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass

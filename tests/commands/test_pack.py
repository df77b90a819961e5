"""`quantray pack`: the shards give the folder's tensors (or the dataset's own), packing is
idempotent and crash-safe (a SIGKILLed pack), and the command line works as a user types it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import DEMO_JOB, folder_job, quiet, tiny_job
from PIL import Image

from quantray.commands.pack import pack
from quantray.errors import SpecError
from quantray.inputs import data
from quantray.inputs.data import batch_identities
from quantray.inputs.shards import ShardedImages
from quantray.spec import load_spec


def test_packed_images_are_the_folders_tensors_and_labels(tmp_path):
    job = folder_job(tmp_path)
    result = pack(job, tmp_path / "shards", rows_per_shard=10, console=quiet())
    spec, packed = load_spec(job), load_spec(result.job_file)
    assert result.job_file == tmp_path / "job.packed.toml"
    assert (packed.calibration.source, packed.calibration.samples, packed.calibration.batch_size) == ("parquet", 20, 4)
    folder = data.build_dataset(spec.test)
    shards = data.build_dataset(packed.test)
    assert len(shards) == len(folder) == 36 and result.splits[1].kind == "encoded" and result.splits[1].shards == 4
    for i in range(len(folder)):
        (x, y), (xs, ys) = folder[i], shards[i]
        assert torch.equal(x, xs) and y == ys
    manifest = json.loads((tmp_path / "shards" / "test" / "manifest.json").read_text())
    assert manifest["rows"] == 36 and manifest["labels"] == {"0": 12, "1": 12, "2": 12}
    assert manifest["classes"] == ["daisy", "rose", "tulip"] and manifest["transform"] == "imagenet_eval"
    rows = pq.read_table(tmp_path / "shards" / "test" / manifest["shards"][0]["name"]).to_pylist()
    assert rows[0]["id"] == "daisy/00.jpg" and rows[0]["image"] == (tmp_path / "flowers" / "daisy" / "00.jpg").read_bytes()
    # the packed job's relative paths resolve from where it was written
    assert 'root = "shards/test"' in result.job_file.read_text()


def test_tensor_datasets_are_stored_as_their_tensors(tmp_path):
    job = tiny_job(tmp_path, 'source = "digits"\nsplit = "train"\nsamples = 64', 'source = "factory"\n'
               'factory = "quantray.testing:random_images"\nkwargs = { n = 10, shape = [3, 8, 8] }')
    result = pack(job, tmp_path / "shards", console=quiet())
    assert [s.kind for s in result.splits] == ["tensor", "tensor"]
    packed = load_spec(result.job_file)
    digits, shards = data.digits("train"), data.build_dataset(packed.calibration)
    assert len(shards) == 1438 and all(torch.equal(digits[i][0], shards[i][0]) and digits[i][1] == shards[i][1]
                                       for i in range(0, 1438, 37))
    with pytest.raises(SpecError, match=r"tensors the source had already transformed; transform = 'to_tensor'"):
        ShardedImages(str(tmp_path / "shards" / "calibration"), "to_tensor")


def test_packing_again_writes_nothing_and_a_changed_image_rewrites_its_shard_only(tmp_path):
    job = folder_job(tmp_path)
    first = pack(job, tmp_path / "shards", rows_per_shard=10, console=quiet())
    test_dir = tmp_path / "shards" / "test"
    before = {p.name: p.stat().st_mtime_ns for p in test_dir.iterdir()}
    spec = load_spec(first.job_file).test
    batches = data.make_batches(list(range(36)), 8)
    ids_before = batch_identities(data.build_dataset(spec), spec, batches)

    again = pack(job, tmp_path / "shards", rows_per_shard=10, console=quiet())
    assert [s.written for s in again.splits] == [0, 0]
    assert {p.name: p.stat().st_mtime_ns for p in test_dir.iterdir()} == before  # not even the manifest

    Image.new("RGB", (96, 80), (1, 2, 3)).save(tmp_path / "flowers" / "rose" / "05.jpg")  # sample 17: shard 1
    changed = pack(job, tmp_path / "shards", rows_per_shard=10, console=quiet())
    assert [s.written for s in changed.splits] == [1, 1]
    after = sorted(p.name for p in test_dir.iterdir())
    assert len([n for n in after if n.startswith("part-")]) == 4  # the old shard 1 is gone
    assert len(set(after) - set(before)) == 2  # a new shard 1 and a new index (manifest.json is replaced)
    ids_after = batch_identities(data.build_dataset(spec), spec, batches)
    assert [a == b for a, b in zip(ids_before, ids_after)] == [True, True, False, True, True]  # batch 2: 16..23


@pytest.mark.ray
def test_a_killed_pack_leaves_no_half_shard_and_the_next_one_finishes_it(tmp_path):
    marker = tmp_path / "killed-once"
    job = tiny_job(tmp_path, 'source = "digits"\nsamples = 10',
               f'source = "factory"\nfactory = "quantray.testing:digits_killer"\n'
               f'kwargs = {{ split = "test", kill_at = 250, marker = "{marker}" }}')
    code = (f"from quantray.commands.pack import pack; pack({str(job)!r}, {str(tmp_path / 'shards')!r}, rows_per_shard=100)")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-2000:]
    test_dir = tmp_path / "shards" / "test"
    visible = sorted(p.name for p in test_dir.iterdir() if not p.name.startswith("."))
    assert [n[:10] for n in visible] == ["part-00000", "part-00001"]  # whole shards only, no manifest yet
    assert all(pq.read_metadata(test_dir / n).num_rows == 100 for n in visible)
    with pytest.raises(SpecError, match="no manifest.json there"):
        ShardedImages(str(test_dir))
    result = pack(job, tmp_path / "shards", rows_per_shard=100, console=quiet())
    assert (result.splits[1].shards, result.splits[1].written) == (4, 2)  # shards 0 and 1 were kept
    assert not [p for p in test_dir.iterdir() if p.name.startswith(".")]
    shards = data.build_dataset(load_spec(result.job_file).test)
    assert len(shards) == 359 and torch.equal(shards[250][0], data.digits("test")[250][0])


@pytest.mark.ray
def test_pack_on_the_command_line(tmp_path):
    job = tmp_path / "digits.toml"
    job.write_text(DEMO_JOB.read_text())
    exe = Path(sys.executable).with_name("quantray")
    done = subprocess.run([str(exe), "pack", str(job), "--out", f"file://{tmp_path}/shards", "--job-out",
                           str(tmp_path / "elsewhere" / "packed.toml")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="200"))
    assert done.returncode == 0, done.stderr
    assert "job file:" in done.stdout and (tmp_path / "shards" / "test" / "manifest.json").is_file()
    packed = load_spec(tmp_path / "elsewhere" / "packed.toml")
    assert packed.test.root == f"file://{tmp_path}/shards/test" and packed.model.checkpoint is None
    bad = subprocess.run([str(exe), "pack", str(job), "--out", str(tmp_path / "s"), "--rows-per-shard", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rows-per-shard: must be at least 1, got 0" in bad.stderr


@pytest.mark.parametrize("job, targets", [("diabetes_regression", "tensor"), ("scenes_segmentation", "tensor"),
                                          ("photos_agreement", "none")])
def test_tensor_targets_and_label_free_samples_are_packed_as_the_dataset_gives_them(tmp_path, job, targets):
    """A regression target, a segmentation mask (int64), no target at all: read back bit for bit, and
    the packed job keeps its [test] task keys."""
    from helpers import ROOT

    spec = load_spec(ROOT / "jobs" / f"{job}.toml")
    result = pack(spec, tmp_path / "shards", rows_per_shard=40, job_out=tmp_path / "packed.toml", console=quiet())
    packed = load_spec(tmp_path / "packed.toml")
    assert packed.test.task == spec.test.task and packed.test.scoring_keys() == spec.test.scoring_keys()
    for section in ("calibration", "test"):
        manifest = json.loads((tmp_path / "shards" / section / "manifest.json").read_text())
        assert (manifest["format"], manifest["targets"]) == ("quantray-shards/2", targets)
        original = data.build_dataset(getattr(spec, section), section)
        shards = ShardedImages(str(tmp_path / "shards" / section))
        assert len(shards) == len(original)
        for i in (0, 1, len(original) - 1):
            mine, theirs = shards[i], original[i]
            if targets == "none":
                assert isinstance(mine, torch.Tensor) and torch.equal(mine, theirs)
            else:
                assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
                assert mine[1].dtype == theirs[1].dtype
    assert [s.kind for s in result.splits] == ["tensor", "tensor"]


def test_a_split_whose_samples_mix_target_kinds_is_refused_in_one_line(tmp_path):
    job = tiny_job(tmp_path, 'source = "digits"\nsplit = "train"\nsamples = 64',
                   'source = "factory"\nfactory = "quantray.testing:mixed_targets"\ntask = "regression"')
    with pytest.raises(SpecError) as e:
        pack(job, tmp_path / "shards", console=quiet())
    assert str(e.value).endswith("[test] sample 2 has no target, where sample 0's target is a tensor: every sample "
                                 "of a split needs the same kind")

"""Parquet image shards as a dataset: a reader fetches only the row groups of its samples (from S3),
reads ahead in the background, and bad locations are one line."""

import pytest
import torch
from helpers import folder_job, image_folder, quiet, tiny_job

from quantray.commands.pack import pack
from quantray.errors import SpecError
from quantray.inputs import data
from quantray.inputs.shards import ShardedImages
from quantray.spec import DataSpec, load_spec

pytestmark = pytest.mark.ray  # moto's S3 server runs in a process of its own


def test_a_reader_fetches_only_the_row_groups_of_its_samples(tmp_path, s3):
    image_folder(tmp_path / "flowers", size=(320, 240))  # about 60 KB per noisy JPEG
    folder = 'source = "imagefolder"\nroot = "flowers"\ntransform = "to_tensor"'
    pack(tiny_job(tmp_path, folder, folder), f"{s3}/flowers", rows_per_shard=18, console=quiet())
    half = ShardedImages(f"{s3}/flowers/test")
    shards = half.manifest["shards"]
    manifest_bytes = half.bytes_read
    for i in range(18):  # the first of two shards: row groups of 16 and 2 samples
        half[i]
    assert half.groups_read == 2 and [s["rows"] for s in shards] == [18, 18]
    footer = 64 * 1024  # pyarrow reads a file's last 64 KiB to find its footer, then the row groups it needs
    assert half.bytes_read - manifest_bytes <= shards[0]["bytes"] + footer  # nothing of the second shard
    half[3]
    assert half.groups_read == 2  # a row group read a moment ago is kept
    ahead = ShardedImages(f"{s3}/flowers/test")
    ahead.prefetch(list(range(18)))  # as a worker does with its next batch: read in the background
    assert all(torch.equal(ahead[i][0], half[i][0]) for i in range(18))
    assert (ahead.groups_read, ahead.bytes_read) == (2, half.bytes_read)  # the same reads, earlier
    assert half.sample_file(20) == f"{s3}/flowers/test/{shards[1]['name']} row 2"


def test_bad_shard_locations_are_one_line(tmp_path, s3):
    empty = tmp_path / "empty"
    empty.mkdir()
    job = tiny_job(tmp_path, f'source = "parquet"\nroot = "{empty}"', 'source = "digits"')
    with pytest.raises(SpecError, match=r"\[calibration\] root = .*empty': no manifest.json there; write the shards with"):
        load_spec(job)
    with pytest.raises(SpecError, match=r"reads a folder on every worker's disk; for data in object storage pack it"):
        load_spec(tiny_job(tmp_path, 'source = "imagefolder"\nroot = "s3://bucket/flowers"', 'source = "digits"'))
    missing = DataSpec(source="parquet", root=f"{s3}/nothing-here")
    with pytest.raises(SpecError, match=r"^job: \[test\] root = 's3://.*/nothing-here': no manifest.json there"):
        data.build_dataset(missing, "job: [test]")
    job = folder_job(tmp_path)
    with pytest.raises(SpecError, match=r"^--out s3://no-such-bucket-here/x: cannot write there \(.*not found"):
        pack(job, "s3://no-such-bucket-here/x", console=quiet())
    with pytest.raises(SpecError, match=r"is already Parquet shards; copy its folder"):
        pack(pack(job, tmp_path / "shards", console=quiet()).job_file, tmp_path / "again", console=quiet())

"""The decoded-image store: what a warm load gives is what decoding gives, bit for bit, and any
change of a file, the transform or the labels' source is seen."""

import os

import pytest
import torch
from helpers import image_folder
from PIL import Image

from quantray.inputs import data
from quantray.inputs.decoded import DecodedBatches
from quantray.spec import DataSpec
from quantray.testing import write_flowers102

BATCHES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11], [30, 31, 32, 33, 34, 35]]


def _folder_spec(root, transform="imagenet_eval"):
    return DataSpec(source="imagefolder", root=root, transform=transform)


@pytest.mark.parametrize("transform", ["imagenet_eval", "to_tensor"])
def test_cold_and_warm_loads_equal_plain_decoding_bit_for_bit(tmp_path, transform):
    spec = _folder_spec(image_folder(tmp_path / "flowers", size=(96, 80) if transform == "imagenet_eval" else (64, 64)),
                        transform)
    plain = data.build_dataset(spec)
    store = tmp_path / "stats"
    cold, warm = DecodedBatches(spec, "[test]", str(store)), DecodedBatches(spec, "[test]", str(store))
    for batch in BATCHES:  # the folder holds a PNG beside the JPEGs (rose/03.png: sample 15)
        x, y = data.load_batch(plain, batch)
        for loaded in (cold.load(batch), warm.load(batch)):
            assert loaded[0].dtype == x.dtype and loaded[0].shape == x.shape
            assert torch.equal(loaded[0], x) and loaded[0].numpy().tobytes() == x.numpy().tobytes()
            assert torch.equal(loaded[1], y)
    assert (cold.misses, cold.hits, warm.misses, warm.hits) == (3, 0, 0, 3)
    assert len(list(store.glob("decoded-*.pt"))) == 3
    kept = torch.load(next(store.glob("decoded-*.pt")), weights_only=True)
    assert kept.dtype == torch.uint8  # a quarter of the float tensor's bytes


def test_a_changed_file_or_transform_is_a_miss_and_labels_are_read_fresh(tmp_path):
    root = image_folder(tmp_path / "flowers")
    spec, store = _folder_spec(root), str(tmp_path / "stats")
    DecodedBatches(spec, "[test]", store).load(BATCHES[0])
    # the same size and modification time, other pixels: only the content tells
    path = root / "daisy" / "03.jpg"
    stat = path.stat()
    Image.new("RGB", (96, 80), (200, 10, 10)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = DecodedBatches(spec, "[test]", store)
    x, _ = again.load(BATCHES[0])
    assert (again.hits, again.misses) == (0, 1)
    assert torch.equal(x, data.load_batch(data.build_dataset(spec), BATCHES[0])[0])
    other_spec = _folder_spec(root, "to_tensor")
    other = DecodedBatches(other_spec, "[test]", store)
    x, _ = other.load(BATCHES[0])
    assert (other.hits, other.misses) == (0, 1)
    assert torch.equal(x, data.load_batch(data.build_dataset(other_spec), BATCHES[0])[0])
    # a new class folder shifts ImageFolder's labels; the images' entries still serve, the labels are new
    image_folder(tmp_path / "more", classes=("aster",), per_class=1)
    os.rename(tmp_path / "more" / "aster", root / "aster")
    shifted = DecodedBatches(spec, "[test]", store)
    batch = [i + 1 for i in BATCHES[0]]  # the same images, one place further on
    x, y = shifted.load(batch)
    assert shifted.hits == 1
    fresh = data.load_batch(data.build_dataset(spec), batch)
    assert torch.equal(x, fresh[0]) and torch.equal(y, fresh[1]) and y.tolist() == [1] * 8


def test_flowers102_is_kept_and_a_dataset_without_files_or_labels_is_loaded_as_it_is(tmp_path):
    write_flowers102(tmp_path / "data", classes=(1, 2), train=1, val=0, test=3, size=(120, 90))
    spec = DataSpec(source="torchvision", dataset="Flowers102", root=tmp_path / "data", split="test", verify=False,
                    transform="imagenet_eval")
    store = str(tmp_path / "stats")
    for expected in ((1, 0), (0, 1)):  # (misses, hits): cold, then warm
        batches = DecodedBatches(spec, "[test]", store)
        x, y = batches.load([0, 2, 5])
        assert (batches.misses, batches.hits) == expected
        plain = data.load_batch(data.build_dataset(spec), [0, 2, 5])
        assert torch.equal(x, plain[0]) and torch.equal(y, plain[1])
    digits = DecodedBatches(DataSpec(source="digits", split="test"), "[test]", store)
    assert digits.store is None and torch.equal(digits.load([0, 1])[0], data.load_batch(data.digits("test"), [0, 1])[0])


def test_no_location_keeps_nothing_and_an_unwritable_one_is_not_fatal(tmp_path):
    spec = _folder_spec(image_folder(tmp_path / "flowers"))
    off = DecodedBatches(spec, "[test]", None)
    assert off.store is None and torch.equal(off.load(BATCHES[1])[0], data.load_batch(data.build_dataset(spec), BATCHES[1])[0])
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    stuck = DecodedBatches(spec, "[test]", str(blocked / "stats"))
    x, _ = stuck.load(BATCHES[1])
    assert stuck.unwritable and torch.equal(x, data.load_batch(data.build_dataset(spec), BATCHES[1])[0])

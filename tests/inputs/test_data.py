"""Data sources and the deterministic sample/batch/shard plan."""

import pytest
import torch
from PIL import Image

from quantray.errors import DataError
from quantray.inputs import data
from quantray.spec import DataSpec


def test_digits_split_is_fixed_disjoint_and_complete():
    train, test = data.digits("train"), data.digits("test")
    assert (len(train), len(test)) == (1438, 359)
    both = torch.cat([train.tensors[0], test.tensors[0]]).reshape(1797, -1)
    assert len(torch.unique(both, dim=0)) == len(torch.unique(data.digits("all").tensors[0].reshape(1797, -1), dim=0))
    assert train.tensors[0].shape[1:] == (1, 8, 8) and float(train.tensors[0].max()) <= 1.0


def test_calibration_sample_depends_only_on_the_seed():
    a, b, c = (data.sample_indices(1000, 100, s) for s in (7, 7, 8))
    assert a == b and a != c and a == sorted(a) and len(set(a)) == 100
    assert data.sample_indices(10, None, 0) == list(range(10))
    with pytest.raises(ValueError, match="only 10"):
        data.sample_indices(10, 11, 0)


def test_shards_are_whole_batches_covering_everything_once():
    assert data.make_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    for n, w in ((10, 3), (10, 1), (2, 5)):
        shards = data.assign_shards(n, w)
        assert sorted(b for s in shards for b in s) == list(range(n)) and all(shards) and len(shards) == min(n, w)


def _image_folder(root, classes=("daisy", "rose"), per_class=2):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (300, 260), (40 * k, 20 * i, 90)).save(root / name / f"{i}.jpg")
    return root


def test_imagefolder_with_the_seed_eval_transform(tmp_path):
    root = _image_folder(tmp_path / "flowers")
    dataset = data.build_dataset(DataSpec(source="imagefolder", root=root, transform="imagenet_eval"))
    x, y = data.load_batch(dataset, [0, 3])
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]


def test_any_torchvision_dataset_class_by_name():
    spec = DataSpec(source="torchvision", dataset="FakeData", transform="to_tensor",
                    kwargs={"size": 6, "image_size": [3, 16, 16], "num_classes": 3})
    x, y = data.load_batch(data.build_dataset(spec), [0, 5])
    assert x.shape == (2, 3, 16, 16) and all(0 <= v < 3 for v in y.tolist())


def test_sample_that_fails_to_load_names_index_and_file(tmp_path):
    root = _image_folder(tmp_path / "flowers")
    (root / "rose" / "1.jpg").write_bytes(b"not a jpeg")
    dataset = data.build_dataset(DataSpec(source="imagefolder", root=root, transform="to_tensor"))
    with pytest.raises(DataError, match=r"sample 3 \(.*rose/1.jpg\) failed to load"):
        data.load_batch(dataset, [0, 3])


def test_digits_are_scikit_learn_s_own_without_importing_it():
    from sklearn.datasets import load_digits

    raw = load_digits()
    both = data.digits("all")
    assert torch.equal(both.tensors[0], torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0)
    assert torch.equal(both.tensors[1], torch.tensor(raw.target))

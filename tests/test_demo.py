"""The demos ship their trained checkpoints: the same weights, accuracies and qparams on every machine."""

import hashlib
from importlib import resources

import pytest
import torch

from quantray import demo
from quantray.inputs import data


@pytest.mark.parametrize("name, correct", [("digits_cnn", 355), ("digits_mobilenet", 346)])
def test_each_shipped_checkpoint_is_the_one_quantray_names_and_scores_as_documented(name, correct):
    file, sha256 = demo.CHECKPOINTS[name]
    payload = resources.files("quantray").joinpath("assets", file).read_bytes()
    assert hashlib.sha256(payload).hexdigest() == sha256
    model = getattr(demo, name)()
    x, y = data.digits("test").tensors
    with torch.inference_mode():
        assert (int((model(x).argmax(1) == y).sum()), len(y)) == (correct, 359)  # 98.89% and 96.38%, as the README says

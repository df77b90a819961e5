"""The demo ships its trained checkpoint: the same weights, accuracies and qparams on every machine."""

import hashlib
from importlib import resources

import torch

from quantray import data, demo


def test_the_shipped_checkpoint_is_the_one_quantray_names_and_scores_as_documented():
    payload = resources.files("quantray").joinpath("assets", demo.CHECKPOINT).read_bytes()
    assert hashlib.sha256(payload).hexdigest() == demo.CHECKPOINT_SHA256
    model = demo.digits_cnn()
    x, y = data.digits("test").tensors
    with torch.inference_mode():
        correct = int((model(x).argmax(1) == y).sum())
    assert (correct, len(y)) == (355, 359)  # 98.89%, as the README says

"""Building the FP32 model: torchvision by name with a checkpoint, factories, clear mismatches."""

import pytest
import torch
import torchvision

from quantray.data import build_dataset
from quantray.errors import SpecError
from quantray.models import build_model
from quantray.spec import DataSpec, ModelSpec


def test_torchvision_arch_loads_its_checkpoint_in_eval_mode(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ckpt.pth")  # a common wrapper
    model = build_model(ModelSpec(arch="resnet18", num_classes=7, checkpoint=tmp_path / "ckpt.pth"))
    assert not model.training
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_checkpoint_that_does_not_fit_names_the_mismatch(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "ckpt.pth")
    with pytest.raises(SpecError, match=r"does not fit the model: size mismatch for fc.weight.*check arch and num_classes"):
        build_model(ModelSpec(arch="resnet18", num_classes=102, checkpoint=tmp_path / "ckpt.pth"), "job.toml")


def test_checkpoint_holding_code_is_refused_by_weights_only(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7), tmp_path / "pickled_module.pth")  # a whole module
    with pytest.raises(SpecError, match="cannot load as a state_dict with weights_only=True"):
        build_model(ModelSpec(arch="resnet18", num_classes=7, checkpoint=tmp_path / "pickled_module.pth"), "job.toml")


def test_factory_with_kwargs_and_factory_errors():
    model = build_model(ModelSpec(factory="quantray.demo:DigitsCNN", kwargs={"num_classes": 4}))
    assert model.fc.out_features == 4
    with pytest.raises(SpecError, match="cannot import 'no_such_module'"):
        build_model(ModelSpec(factory="no_such_module:make"), "job.toml")
    with pytest.raises(SpecError, match="returned DataSpec, expected a torch.nn.Module"):
        build_model(ModelSpec(factory="quantray.spec:DataSpec"), "job.toml")


def test_dataset_factory_gets_its_kwargs():
    spec = DataSpec(source="factory", factory="torchvision.datasets:FakeData",
                    kwargs={"size": 3, "image_size": [1, 8, 8], "transform": None})
    dataset = build_dataset(spec)
    assert len(dataset) == 3

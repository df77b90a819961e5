"""Building the FP32 model: torchvision by name with a checkpoint, factories, clear mismatches."""

import re

import pytest
import torch
import torchvision

from quantray.errors import SpecError
from quantray.inputs.data import build_dataset
from quantray.inputs.models import build_model
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
    with pytest.raises(SpecError, match=r"holds a pickled torchvision.models.resnet.ResNet object, not just weights"):
        build_model(ModelSpec(arch="resnet18", num_classes=7, checkpoint=tmp_path / "pickled_module.pth"), "job.toml")


@pytest.mark.parametrize("how, says", [
    ("pickle.dump", r"holds a pickle that weights-only loading refuses for safety \(written by pickle.dump rather than "
                    r"torch.save, or holding Python objects or code besides tensors: unpickling it can run code\)"),
    ("torch.jit.save", r"is a TorchScript archive \(torch.jit.save\), not a state_dict"),
])
def test_a_checkpoint_weights_only_loading_refuses_says_what_it_holds_and_what_to_save(tmp_path, how, says):
    """A plain pickle (even of a state_dict) or a TorchScript file: what it is, why it is refused, what to save."""
    import pickle

    model, path = torchvision.models.resnet18(num_classes=7), tmp_path / "saved.pth"
    if how == "pickle.dump":
        path.write_bytes(pickle.dumps(model.state_dict(), protocol=4))
    else:
        torch.jit.save(torch.jit.script(model), path)
    with pytest.raises(SpecError) as info:
        build_model(ModelSpec(arch="resnet18", num_classes=7, checkpoint=path), "job.toml")
    message = str(info.value)
    assert re.search(f"saved.pth': {says}; save the weights with torch.save\\(model.state_dict\\(\\), path\\) and point "
                     "checkpoint at that file$", message), message
    assert "\n" not in message and "Weights only load failed" not in message


def test_a_truncated_checkpoint_is_named_as_unreadable(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "ckpt.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ckpt.pth").read_bytes()[:1000])
    with pytest.raises(SpecError, match=r"cut.pth': not a readable torch file \(RuntimeError: PytorchStreamReader "
                                        r"failed reading zip archive: failed finding central directory\); save the weights"):
        build_model(ModelSpec(arch="resnet18", num_classes=7, checkpoint=tmp_path / "cut.pth"), "job.toml")


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


def test_a_model_without_checkpoint_is_built_from_its_seed_and_leaves_the_caller_s_random_state():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelSpec(arch="resnet18", num_classes=3))
    assert torch.equal(torch.rand(1), expected_next)  # the caller's generator was not consumed
    b = build_model(ModelSpec(arch="resnet18", num_classes=3))
    c = build_model(ModelSpec(arch="resnet18", num_classes=3, seed=1))
    assert torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.fc.weight, c.fc.weight)

"""Strict job loading: every mistake is one line naming the file, the key and what is valid; a spec
built in Python checks itself the same way."""

import dataclasses
from pathlib import Path

import pytest
from helpers import ROOT

from quantray import pipeline
from quantray.errors import SpecError
from quantray.spec import DataSpec, GateSpec, JobSpec, ModelSpec, QuantSpec, RunSpec, load_spec

MINIMAL = """
[model]
factory = "quantray.demo:digits_cnn"
[calibration]
samples = 64
[test]
"""


def _job(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path, text) -> str:
    """The one line a job file's mistake gives: from loading it, or from the checks that need torch
    (an architecture, a dataset class, a torch.nn class), which every command runs before any work."""
    path = _job(tmp_path, text)
    with pytest.raises(SpecError) as info:
        pipeline.check(load_spec(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_demo_job_loads_with_defaults():
    spec = load_spec(ROOT / "jobs" / "digits.toml")
    assert spec.name == "digits" and spec.model.factory == "quantray.demo:digits_cnn"
    assert (spec.calibration.split, spec.test.split) == ("train", "test")
    assert spec.quantization.backend == "x86" and spec.run.latency_iters == 100


def test_minimal_job_fills_split_defaults_from_the_section(tmp_path):
    spec = load_spec(_job(tmp_path, MINIMAL))
    assert spec.name == "job" and spec.calibration.split == "train" and spec.test.split == "test"
    assert spec.calibration.samples == 64 and spec.test.samples is None


def test_unknown_key_names_section_key_suggestion_and_valid_keys(tmp_path):
    message = _error(tmp_path, MINIMAL.replace("samples = 64", "sample = 64"))
    assert "[calibration] sample unknown key (did you mean 'samples'?); valid keys: source, split" in message


def test_unknown_top_level_key(tmp_path):
    assert "quantisation unknown key (did you mean 'quantization'?)" in _error(tmp_path, MINIMAL + "[quantisation]\n")


def test_wrong_type_names_expected_type(tmp_path):
    message = _error(tmp_path, MINIMAL.replace("samples = 64", 'samples = "64"'))
    assert "[calibration] samples = '64': wrong type (str); expected a int" in message


def test_missing_checkpoint_is_resolved_against_the_job_folder(tmp_path):
    message = _error(tmp_path, MINIMAL.replace("[calibration]", 'checkpoint = "ckpt/model.pth"\n[calibration]'))
    assert f"[model] checkpoint = '{tmp_path / 'ckpt' / 'model.pth'}': file not found" in message


def test_unknown_architecture_suggests_the_close_one(tmp_path):
    message = _error(tmp_path, MINIMAL.replace('factory = "quantray.demo:digits_cnn"', 'arch = "resnet19"'))
    assert "[model] arch = 'resnet19': unknown torchvision architecture (did you mean 'resnet18'?)" in message
    assert "torchvision.models.list_models()" in message


def test_model_needs_exactly_one_of_arch_and_factory(tmp_path):
    message = _error(tmp_path, MINIMAL.replace("[calibration]", 'arch = "resnet18"\n[calibration]'))
    assert "[model] arch / factory: give exactly one" in message


def test_unknown_dataset_class_and_missing_root(tmp_path):
    text = MINIMAL.replace("samples = 64", 'source = "torchvision"\ndataset = "Flowers101"\nroot = "."')
    assert "[calibration] dataset = 'Flowers101': not a dataset class in torchvision.datasets (did you mean 'Flowers102'?)" in _error(tmp_path, text)
    text = MINIMAL.replace("samples = 64", 'source = "imagefolder"\nroot = "nowhere"')
    assert "[calibration] root = '" in _error(tmp_path, text) and "folder not found" in _error(tmp_path, text)


def test_key_not_used_by_the_source_is_an_error(tmp_path):
    message = _error(tmp_path, MINIMAL.replace("samples = 64", 'samples = 64\nroot = "."'))
    assert "[calibration] root is not used by source = 'digits'" in message


def test_unknown_backend_and_bad_values(tmp_path):
    assert "[quantization] backend = 'fbgemm2': unknown backend" in _error(tmp_path, MINIMAL + '[quantization]\nbackend = "fbgemm2"\n')
    assert "[run] threads = 0: must be at least 1" in _error(tmp_path, MINIMAL + "[run]\nthreads = 0\n")
    assert "[run] layer_samples = -1: must be at least 0" in _error(tmp_path, MINIMAL + "[run]\nlayer_samples = -1\n")
    assert "[calibration] samples = 0: must be at least 1" in _error(tmp_path, MINIMAL.replace("samples = 64", "samples = 0"))


def test_not_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in _error(tmp_path, "[model\n")
    with pytest.raises(SpecError, match="job file not found"):
        load_spec(tmp_path / "absent.toml")


def test_quantization_choices_are_checked_by_name(tmp_path):
    spec = load_spec(_job(tmp_path, MINIMAL + """[quantization]
mode = "replay"
mapping = "default"
activation = "moving_average"
weight = "per_tensor"
module_types = { Linear = { weight = "per_channel" } }
module_names = { conv1 = "fp32" }
"""))
    q = spec.quantization
    assert (q.mode, q.mapping, q.activation, q.weight) == ("replay", "default", "moving_average", "per_tensor")
    assert q.module_types == {"Linear": {"weight": "per_channel"}} and q.module_names == {"conv1": "fp32"}
    assert "[quantization] mode = 'exakt': unknown mode (did you mean 'exact'?)" in _error(
        tmp_path, MINIMAL + '[quantization]\nmode = "exakt"\n')
    assert "[quantization] module_types.Conv2D: not a torch.nn module class (did you mean 'Conv2d'?)" in _error(
        tmp_path, MINIMAL + '[quantization]\nmodule_types = { Conv2D = "fp32" }\n')
    assert "[quantization] module_names.fc.weights unknown key (did you mean 'weight'?)" in _error(
        tmp_path, MINIMAL + '[quantization]\nmodule_names = { fc = { weights = "per_tensor" } }\n')
    assert "[quantization] module_names.fc = 'int4': expected \"fp32\" or a table" in _error(
        tmp_path, MINIMAL + '[quantization]\nmodule_names = { fc = "int4" }\n')


def test_a_spec_built_in_python_checks_itself_with_the_same_line():
    """No file: the line names the section (or the spec) and the key, as a job file's does."""
    cases = [(lambda: RunSpec(threads=0), "[run] threads = 0: must be at least 1"),
             (lambda: DataSpec(samples="64"), "DataSpec samples = '64': wrong type (str); expected a int"),
             (lambda: DataSpec(source="imagefolder", root="/no/such/folder"),
              "DataSpec root = '/no/such/folder': folder not found"),
             (lambda: DataSpec(source="digits", root="."), "DataSpec root is not used by source = 'digits'"),
             (lambda: QuantSpec(mode="exakt"), "[quantization] mode = 'exakt': unknown mode (did you mean 'exact'?)"),
             (lambda: QuantSpec(activation="minmax", activation_range="mse"),
              "[quantization] activation_range = 'mse' contradicts activation = 'minmax'"),
             (lambda: ModelSpec(), "[model] arch / factory: give exactly one"),
             (lambda: ModelSpec(factory="x:y", checkpoint="s3://bucket/model.pth"),
              "[model] checkpoint = 's3://bucket/model.pth': a file on the driver's disk, not a URI"),
             (lambda: GateSpec(max_top1_drop=2), "[gate] max_top1_drop = 2.0: a fraction of accuracy between 0 and 1"),
             (lambda: JobSpec("bad name", Path("job.toml"), ModelSpec(factory="x:y"), DataSpec(), DataSpec()),
              "name = 'bad name': must be a string of letters")]
    for build, expected in cases:
        with pytest.raises(SpecError) as info:
            build()
        assert str(info.value).startswith(expected) and "\n" not in str(info.value), (str(info.value), expected)


def test_replacing_a_value_checks_it_and_a_job_fills_digits_splits_by_section():
    spec = load_spec(ROOT / "jobs" / "digits.toml")
    with pytest.raises(SpecError, match=r"^DataSpec batch_size = 0: must be at least 1"):
        dataclasses.replace(spec.test, batch_size=0)
    job = JobSpec("j", Path("j.toml"), ModelSpec(factory="quantray.demo:digits_cnn"), DataSpec(), DataSpec(samples=9))
    assert (job.calibration.split, job.test.split) == ("train", "test")
    assert RunSpec(latency_precision=0).latency_precision == 0.0 and isinstance(RunSpec(memory_gb=1).memory_gb, float)


def test_the_spec_s_choices_are_the_ones_the_code_implements():
    """The spec lists its choices without importing torch; the lists must be the code's own."""
    import torch

    from quantray import spec
    from quantray.core import flow, metrics, modes, ranges
    from quantray.inputs import transforms

    assert spec.MODES == tuple(modes.MODES) and spec.RANGES == ranges.METHODS
    assert spec.ACTIVATIONS == tuple(flow.ACTIVATION_OBSERVERS) and spec.WEIGHTS == tuple(flow.WEIGHT_OBSERVERS)
    assert spec.TRANSFORMS == transforms.PRESETS and spec.TASKS == metrics.TASKS
    assert set(spec.FRACTION_TASKS) == {task for task, h in metrics.HEADLINES.items() if h.unit == "fraction"}
    assert set(spec.BACKENDS) <= set(torch.backends.quantized.supported_engines)


@pytest.mark.parametrize("test_keys, gate, expected", [
    ('task = "segmantation"', "", "[test] task = 'segmantation': unknown task (did you mean 'segmentation'?); valid: "
                                  "classification, regression, segmentation, multilabel, agreement"),
    ('metric = "not a factory"', "", "[test] metric = 'not a factory': expected \"package.module:Factory\""),
    ('task = "regression"\nmetric = "a.b:C"', "", "[test] task = 'regression' and metric = 'a.b:C': give one"),
    ("metric_kwargs = { a = 1 }", "", "[test] metric_kwargs is the arguments of [test] metric, which is not given"),
    ('task = "regression"\nthreshold = 0.3', "", "[test] threshold is used by task = \"multilabel\" only (this "
                                                 "section's task: regression)"),
    ('task = "multilabel"\nthreshold = 1.5', "", "[test] threshold = 1.5: a probability between 0 and 1"),
    ("ignore_index = 0", "", "[test] ignore_index is used by task = \"segmentation\" only"),
])
def test_task_keys_are_checked_with_one_line(tmp_path, test_keys, gate, expected):
    assert expected in _error(tmp_path, MINIMAL + test_keys + "\n" + gate)


def test_task_keys_belong_to_the_test_section(tmp_path):
    message = _error(tmp_path, MINIMAL.replace("samples = 64", 'samples = 64\ntask = "regression"'))
    assert message.endswith("[calibration] task is a [test] key: calibration scores nothing; move it to [test]")


def test_gate_limits_are_the_tasks_own():
    assert GateSpec().limits("classification", True) == {"drop": 0.01, "regression": 0.005, "min_sqnr_db": None}
    assert GateSpec().limits("segmentation", True) == {"drop": 0.01, "regression": 0.005, "min_sqnr_db": None}
    assert GateSpec(max_drop=2.5).limits("regression", False) == {"drop": 2.5, "regression": None, "min_sqnr_db": None}
    assert GateSpec(min_sqnr_db=25).limits("agreement", False) == {"drop": None, "regression": None, "min_sqnr_db": 25}
    for gate, task, fraction, expected in [
        (GateSpec(), "regression", False, "[gate] max_drop is required for task = 'regression': how much worse INT8's"),
        (GateSpec(), "agreement", False, "[gate] min_sqnr_db is required for task = \"agreement\""),
        (GateSpec(max_drop=1.0), "classification", True, "[gate] max_drop is for other tasks; classification's is "
                                                         "max_top1_drop"),
        (GateSpec(max_top1_drop=0.02), "regression", False, "[gate] max_top1_drop is for classification"),
        (GateSpec(min_sqnr_db=30, max_drop=1.0), "agreement", False, "[gate] max_drop is not used by task = \"agreement\""),
        (GateSpec(max_drop=2.0), "multilabel", True, "[gate] max_drop = 2.0: the headline is a fraction"),
    ]:
        with pytest.raises(SpecError) as e:
            gate.limits(task, fraction)
        assert str(e.value).startswith(expected), (str(e.value), expected)


def test_a_job_path_that_cannot_be_read_is_one_line(tmp_path):
    long = tmp_path / ("x" * 300 + ".toml")
    for path, expected in ((long, f"{long}: cannot read the job file: File name too long"),
                           (tmp_path, f"{tmp_path}: is a folder; give the job file (a .toml file) in it"),
                           (tmp_path / "none.toml", f"{tmp_path / 'none.toml'}: job file not found"),
                           (tmp_path / "a-file.toml" / "x.toml", f"{tmp_path / 'a-file.toml' / 'x.toml'}: job file not found")):
        (tmp_path / "a-file.toml").write_text("")
        with pytest.raises(SpecError) as e:
            load_spec(path)
        assert str(e.value) == expected

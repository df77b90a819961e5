"""How far torch's own single-process calibration is from quantray's exact merge, and what it costs in top-1.

    python -m quantray.benchmarks.exact_vs_torch [--job jobs/digits_mobile.toml] [--mobilenet-batches 5]

torch's HistogramObserver re-bins its histogram whenever a batch widens the range, so its result
depends on the batches and their order; quantray's exact mode histograms every value over the
global range (what torch would compute if it saw all values at once). Both use the same qconfig,
the same batches, in the same order. Printed per observer: the relative scale difference
|torch - exact| / exact; and top-1 of both INT8 models on the job's test split.

Cases: the job's model on its data, and torchvision's mobilenet_v2 (untrained, seed 0) at 64x64 on
random images, 5 calibration batches of 8 (top-1 is meaningless there: the two INT8 models'
agreement on 256 random images is printed instead).
"""

from __future__ import annotations

import argparse

import torch


def _compare(model, example, batches, label: str):
    from torch.ao.quantization.quantize_fx import convert_fx

    from quantray import flow, merge, sites
    from quantray.calibration import SerialExecutor, calibrate
    from quantray.modes import MODES, Plan
    from quantray.spec import DataSpec, QuantSpec

    quant = QuantSpec()
    seed = flow.prepare(model, quant, example)
    with torch.inference_mode():
        for x in batches:
            seed(x)
    exact = flow.prepare(model, quant, example)
    observed = sites.observed_values(exact)
    data = list(batches)
    spec = DataSpec(source="factory", factory="quantray.benchmarks.exact_vs_torch:_tensors", kwargs={})
    _TENSORS[:] = data
    index = [list(range(sum(len(b) for b in data[:k]), sum(len(b) for b in data[:k + 1]))) for k in range(len(data))]
    with SerialExecutor(model, example, quant, spec, 1, sites.signature(observed)) as executor:
        result = calibrate(MODES["exact"], executor, Plan(index, [list(range(len(index)))], observed))
    result.stats.load(exact)
    rows = {r["name"]: r for r in merge.qparam_rows(exact)}
    diffs = []
    for r in merge.qparam_rows(seed):
        e = rows[r["name"]]
        diffs.append((abs(r["scale"] - e["scale"]) / e["scale"], r["name"], r["zero_point"] - e["zero_point"]))
    diffs.sort(reverse=True)
    over = [d for d in diffs if d[0] > 0.05]
    print(f"{label}: {len(diffs)} activation observers; scale differs by more than 5% at {len(over)}, "
          f"more than 1% at {sum(d[0] > 0.01 for d in diffs)}, at all at {sum(d[0] > 0 for d in diffs)}; largest: "
          + ", ".join(f"{n} {d * 100:.1f}% (zero point {z:+d})" for d, n, z in diffs[:3]))
    return convert_fx(seed), flow.convert(exact)


_TENSORS: list[torch.Tensor] = []


def _tensors():
    """The benchmark's calibration batches as a dataset (sample i of the concatenation)."""
    x = torch.cat(_TENSORS)
    return torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/digits_mobile.toml")
    parser.add_argument("--mobilenet-batches", type=int, default=5)
    args = parser.parse_args()

    import torchvision

    from quantray import stages
    from quantray.data import load_batch, make_batches
    from quantray.flow import quiet_torch_warnings
    from quantray.spec import load_spec

    quiet_torch_warnings()
    torch.set_num_threads(1)
    spec = load_spec(args.job)
    job = stages.load(spec)
    batches = [load_batch(job.calib_ds, b)[0] for b in make_batches(job.calib_idx, spec.calibration.batch_size)]
    torch_int8, exact_int8 = _compare(job.fp32, job.example, batches, f"{spec.name} ({len(job.calib_idx)} samples)")
    correct = {"fp32": 0, "torch": 0, "exact": 0}
    with torch.inference_mode():
        for b in make_batches(job.test_idx, 64):
            x, y = load_batch(job.test_ds, b)
            for name, model in (("fp32", job.fp32), ("torch", torch_int8), ("exact", exact_int8)):
                correct[name] += int((model(x).argmax(1) == y).sum())
    n = len(job.test_idx)
    print(f"  top-1 on [test] ({n}): FP32 {correct['fp32'] / n:.4f}, INT8 torch-calibrated {correct['torch'] / n:.4f}, "
          f"INT8 exact merge {correct['exact'] / n:.4f}")

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 64, 64, generator=generator) for _ in range(args.mobilenet_batches)]
    torch_int8, exact_int8 = _compare(model, batches[0][:1], batches,
                                      f"mobilenet_v2 64x64, {args.mobilenet_batches} batches of 8")
    x = torch.randn(256, 3, 64, 64, generator=generator)
    with torch.inference_mode():
        agree = float((torch_int8(x).argmax(1) == exact_int8(x).argmax(1)).float().mean())
    print(f"  the two INT8 models agree on top-1 for {agree * 100:.1f}% of 256 random images")


if __name__ == "__main__":
    main()

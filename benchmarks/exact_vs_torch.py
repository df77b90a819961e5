"""How far torch's own single-process calibration is from quantray's exact merge, and what it costs in top-1.

    python -m benchmarks.exact_vs_torch [--job jobs/digits_mobile.toml] [--mobilenet-batches 5]

torch's HistogramObserver re-bins its histogram whenever a batch widens the range, so its result
depends on the batches and their order; quantray's exact mode histograms every value over the
global range (what torch would compute if it saw all values at once). Both use the same qconfig
(the job's [quantization]; x86's default for mobilenet_v2) and the same batches, in the same
order. Printed: per observer the relative scale difference |torch - exact| / exact; top-1 of
both INT8 models on the job's test split.

Cases: the job's model on its data, and torchvision's mobilenet_v2 (untrained, seed 0) at 64x64 on
random images, 5 calibration batches of 8 (top-1 is meaningless there: the two INT8 models'
agreement on 256 other random images is printed instead).
"""

from __future__ import annotations

import argparse

import torch


def _compare(model, quant, spec, dataset, batches: list[list[int]], label: str):
    """torch's own calibration and the exact merge over the same batches, in order; prints the
    per-observer relative scale differences; returns both INT8 models."""
    from quantray.core import flow, merge, sites
    from quantray.core.calibration import SerialExecutor
    from quantray.core.modes import MODES, Plan
    from quantray.core.protocol import calibrate
    from quantray.inputs.data import load_batch

    example = load_batch(dataset, batches[0][:1])[0]
    seed = flow.prepare(model, quant, example)
    with torch.inference_mode():
        for b in batches:
            seed(load_batch(dataset, b)[0])
    exact = flow.prepare(model, quant, example)
    observed = sites.observed_values(exact)
    with SerialExecutor(model, example, quant, spec, 1, sites.signature(observed)) as executor:
        result = calibrate(MODES["exact"], executor, Plan(batches, [list(range(len(batches)))], observed))
    result.stats.load(exact)
    rows = {r["name"]: r for r in merge.qparam_rows(exact)}
    diffs = sorted(((abs(r["scale"] - rows[r["name"]]["scale"]) / rows[r["name"]]["scale"], r["name"],
                     r["zero_point"] - rows[r["name"]]["zero_point"]) for r in merge.qparam_rows(seed)), reverse=True)
    print(f"{label}: {len(diffs)} activation observers; scale differs by more than 5% at "
          f"{sum(d[0] > 0.05 for d in diffs)}, by more than 1% at {sum(d[0] > 0.01 for d in diffs)}, at all at "
          f"{sum(d[0] > 0 for d in diffs)}; largest: "
          + ", ".join(f"{n} {d * 100:.1f}% (zero point {z:+d})" for d, n, z in diffs[:3]))
    return flow.convert(seed), flow.convert(exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/digits_mobile.toml")
    parser.add_argument("--mobilenet-batches", type=int, default=5)
    args = parser.parse_args()

    import torchvision

    from quantray import pipeline
    from quantray.core.flow import quiet_torch_warnings
    from quantray.inputs.data import build_dataset, load_batch, make_batches
    from quantray.spec import DataSpec, QuantSpec, load_spec

    quiet_torch_warnings()
    torch.set_num_threads(1)
    spec = load_spec(args.job)
    job = pipeline.load(spec)
    batches = make_batches(job.calib_idx, spec.calibration.batch_size)
    torch_int8, exact_int8 = _compare(job.fp32, spec.quantization, spec.calibration, job.calib_ds, batches,
                                      f"{spec.name} ({len(job.calib_idx)} samples)")
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
    calibration = 8 * args.mobilenet_batches
    images = DataSpec(source="factory", factory="quantray.testing:random_images",
                      kwargs={"n": calibration + 256, "shape": [3, 64, 64]})
    dataset = build_dataset(images)
    torch_int8, exact_int8 = _compare(model, QuantSpec(), images, dataset, make_batches(list(range(calibration)), 8),
                                      f"mobilenet_v2 64x64, {args.mobilenet_batches} batches of 8")
    x = load_batch(dataset, list(range(calibration, calibration + 256)))[0]
    with torch.inference_mode():
        agree = float((torch_int8(x).argmax(1) == exact_int8(x).argmax(1)).float().mean())
    print(f"  the two INT8 models agree on top-1 for {agree * 100:.1f}% of 256 other random images")


if __name__ == "__main__":
    main()

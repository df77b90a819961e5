"""INT8 speed by flow: FP32 eager, FX INT8 TorchScript (what `flow = "fx"` ships) and PT2E INT8
compiled (what `flow = "pt2e"` evaluates and times), with PT2E's compile time apart.

    python -m benchmarks.flows [--models resnet18,mobilenet_v2] [--batch 32] [--threads 1]

Models: torchvision's resnet18 and mobilenet_v2 at 224x224, untrained (seed 0; speed does not
depend on the weights), each quantized by both flows from the same 8 random calibration images
(quantray's `flow.prepare` / `flow.convert`, x86). Latency: the median of timed calls after a
warm-up, at batch 1 and at `--batch` (the test batch size), `--threads` intra-op threads, nothing
else running. PT2E's first call at each batch size compiles (torch.compile under inductor freezing);
that time is printed as compile time and left out of latency. Ratios are FP32 / INT8, measured in
the same run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import torch


def _latency_ms(model, x: torch.Tensor, iters: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=30, help="timed calls at batch 1 (a fifth of them at --batch)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    import torchvision

    from quantray.core import flow, pt2e
    from quantray.spec import QuantSpec

    print(f"torch {torch.__version__}, {args.threads} thread(s); latency in ms (median), ratio = FP32 / INT8")
    print(f"{'model':<13} {'batch':>5} {'FP32':>9} {'FX TorchScript':>20} {'PT2E compiled':>20} {'PT2E compile s':>15}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        fp32 = getattr(torchvision.models, name)().eval()
        calib = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        builds = {}
        for flow_name in ("fx", "pt2e"):
            started = time.perf_counter()
            prepared = flow.prepare(fp32, QuantSpec(flow=flow_name), calib[:1])
            with torch.no_grad():
                prepared(calib)
            int8 = flow.convert(prepared)
            if flow_name == "fx":
                buffer = io.BytesIO()
                torch.jit.save(torch.jit.script(int8), buffer)
                runtime = torch.jit.load(io.BytesIO(buffer.getvalue()))
            else:
                runtime = pt2e.Compiled(pt2e.load_program(pt2e.save_program(int8, calib[:1])))
                how = pt2e.export_how(prepared)
            builds[flow_name] = (runtime, time.perf_counter() - started)
        for batch, iters in ((1, args.iters), (args.batch, max(3, args.iters // 5))):
            x = torch.randn(batch, 3, 224, 224)
            base = _latency_ms(fp32, x, iters)
            fx = _latency_ms(builds["fx"][0], x, iters)
            compiled = builds["pt2e"][0]
            pt = _latency_ms(compiled, x, iters)
            print(f"{name:<13} {batch:>5} {base:>9.2f} {fx:>10.2f} ({base / fx:5.2f}x) {pt:>10.2f} ({base / pt:5.2f}x) "
                  f"{compiled.compile_s[batch]:>15.1f}")
        print(f"{'':<13} build (prepare, calibrate 8 images, convert, save/load): FX {builds['fx'][1]:.1f} s, "
              f"PT2E {builds['pt2e'][1]:.1f} s ({how} export)")


if __name__ == "__main__":
    main()

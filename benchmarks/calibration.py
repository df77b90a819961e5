"""Calibration wall time: quantray (exact and fast, 1 and 2 workers) vs the seed's single-process loop.

    python -m benchmarks.calibration [--model resnet18|digits] [--images 1000] [--workers 1 2] [--executor driver|ray]
    python -m benchmarks.calibration --workers 2 --modes exact --rounds 3   # the two sides in turn, medians
    python -m benchmarks.calibration --profile 100     # where one process's time goes

The seed loop is the article's: prepare_fx with the x86 qconfig, forward passes over the batches
(10 images each), convert_fx; it is timed at torch's default thread count and at one thread.
quantray runs the same images in the same batches through `protocol.calibrate` on the pool a local
`quantray run` uses (`--executor driver`, the default: worker threads of this process,
`cluster.driver`; `--executor ray`: Ray actors, `runner.WorkerPool`, Ray's start-up timed apart),
one thread each, loads the merged statistics and runs convert_fx. resnet18 sees random
224x224 images (untrained weights: speed does not depend on them); digits uses the demo CNN on
real 8x8 digits. Ratios are against the seed loop measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _setup(model_name: str, images: int):
    from quantray.demo import digits_cnn
    from quantray.spec import DataSpec

    if model_name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=102).eval()
        spec = DataSpec(source="factory", factory="quantray.testing:random_images", kwargs={"n": images},
                        batch_size=10)
    else:
        model = digits_cnn()
        spec = DataSpec(source="digits", split="train", batch_size=10)
    from quantray.inputs.data import build_dataset

    dataset = build_dataset(spec)
    if images > len(dataset):
        raise SystemExit(f"{model_name}: only {len(dataset)} images available")
    return model, spec, dataset


def _seed_loop(model, dataset, batches, threads) -> float:
    """The article's calibration, single process: prepare_fx, forward over batches, convert_fx."""
    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from quantray.inputs.data import load_batch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        example = load_batch(dataset, batches[0][:1])[0]
        prepared = prepare_fx(model, QConfigMapping().set_global(get_default_qconfig("x86")), (example,))
        with torch.inference_mode():
            for batch in batches:
                prepared(load_batch(dataset, batch)[0])
        convert_fx(prepared)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def _quantray(cluster, model, spec, dataset, batches, workers, mode, memory_gb):
    from quantray.cluster.names import Names
    from quantray.cluster.worker import Worker, WorkerSetup
    from quantray.core import flow, sites
    from quantray.core.calls import Call
    from quantray.core.modes import MODES, Plan
    from quantray.core.protocol import calibrate
    from quantray.inputs.data import assign_shards, load_batch
    from quantray.pipeline import calibration_executor
    from quantray.spec import QuantSpec

    quant = QuantSpec(mode=mode)
    start = time.perf_counter()
    example = load_batch(dataset, batches[0][:1])[0]
    prepared = flow.prepare(model, quant, example)
    observed = sites.observed_values(prepared)
    shards = assign_shards(len(batches), workers)
    setup = WorkerSetup(model, example, quant, 1, calibration=spec, signature=sites.signature(observed),
                        memory_bytes=int(memory_gb * 2 ** 30))
    names = Names(lambda w: f"worker {w}", lambda w, key: f"calibration shard {w}")
    with cluster.pool(setup, len(shards)) as pool:
        pool.start()
        pool.run({w: [] for w in range(len(shards))}, names=names)  # the workers up: a job's fixed cost, timed apart
        ready = time.perf_counter() - start
        result = calibrate(MODES[mode], calibration_executor(pool), Plan(batches, shards, observed))
        result.stats.load(prepared)
        flow.convert(prepared)
        seconds = time.perf_counter() - start
        rss = pool.run({w: [Call(w, Worker.peak_rss_mb)] for w in range(len(shards))}, names=names)
    result.info.update(ready_s=ready, peak_rss_mb=max(rss.values()))
    return seconds, result.info


def _profile(model, dataset, batches) -> None:
    """Where a batch's time goes, one process, one thread: the forward pass alone, and with each
    kind of observer work (pass 1 logging, exact pass 2 counting, torch's HistogramObserver)."""
    from quantray.core import flow, merge, sites
    from quantray.core.probes import attach_probes
    from quantray.inputs.data import load_batch

    torch.set_num_threads(1)
    inputs = [load_batch(dataset, b)[0] for b in batches]
    example = inputs[0][:1]

    def timed(fn):
        fn(inputs[0])  # warm-up
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        return (time.perf_counter() - start) / sum(len(x) for x in inputs) * 1e3

    with torch.inference_mode():
        rows = {"FP32 forward only": timed(model)}
        seed = flow.prepare(model, "x86", example)
        rows["torch HistogramObserver (seed loop)"] = timed(seed)
        probed = flow.prepare(model, "x86", example)
        observed = sites.observed_values(probed)
        recorder = attach_probes(probed)

        def log(x):
            recorder.start_log()
            probed(x)

        rows["pass 1: exact (min, max) log"] = timed(log)
        logs = {}
        for b, x in enumerate(inputs):
            log(x)
            logs[b] = dict(recorder.batch_log())
        recorder.start_counts(merge.count_requests(observed, logs))

        def count(x):
            recorder.start_batch()
            probed(x)

        rows["pass 2: fixed-range counts"] = timed(count)
    base = rows["FP32 forward only"]
    print(f"  profile, 1 thread, {sum(len(x) for x in inputs)} images: ms per image")
    for name, ms in rows.items():
        print(f"    {name:<38} {ms:7.2f} ms  ({ms / base:4.2f}x the forward pass)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "digits"], default="resnet18")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["exact", "fast"])
    parser.add_argument("--memory-gb", type=float, help="each worker's memory budget (default: as a job derives it)")
    parser.add_argument("--profile", type=int, metavar="N", help="only profile N images' batches in one process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="after the first, more rounds of the seed loop (torch's threads) and quantray in turn")
    parser.add_argument("--executor", choices=["driver", "ray"], default="driver",
                        help="worker threads of this process (a local run's default) or Ray actors")
    args = parser.parse_args()

    from quantray.cluster.driver import DriverCluster
    from quantray.core.flow import quiet_torch_warnings
    from quantray.inputs.data import make_batches

    quiet_torch_warnings()
    model, spec, dataset = _setup(args.model, args.images)
    batches = make_batches(list(range(args.images)), 10)
    if args.profile:
        _profile(model, dataset, batches[:max(1, args.profile // 10)])
        return
    default_threads = torch.get_num_threads()
    _seed_loop(model, dataset, batches[:1], default_threads)  # warm-up: imports and first-call costs
    seed = {t: _seed_loop(model, dataset, batches, t) for t in sorted({1, default_threads})}
    print(f"{args.model}: {args.images} images, {len(batches)} batches of 10")
    for t, s in seed.items():
        print(f"  seed loop, {t} thread(s): {s:7.2f} s")
    base = seed[default_threads]
    start = time.perf_counter()
    if args.executor == "ray":
        from quantray.cluster.runner import Cluster
    with Cluster() if args.executor == "ray" else DriverCluster() as cluster:
        print(f"  {'Ray start-up' if args.executor == 'ray' else 'worker threads of this process'} ({cluster.cpus} CPUs): "
              f"{time.perf_counter() - start:5.2f} s (not counted below)")
        results = {}
        for mode in args.modes:
            for w in args.workers:
                budget = args.memory_gb if args.memory_gb is not None else cluster.memory_per_worker(w) / 2 ** 30
                seconds, stats = _quantray(cluster, model, spec, dataset, batches, w, mode, budget)
                warm = seconds - stats["ready_s"]
                results[mode, w] = warm
                kept = stats.get("pass2_batches")
                print(f"  quantray {mode:5} {w} worker(s): {seconds:7.2f} s = {base / seconds:4.2f}x the seed loop at "
                      f"{default_threads} threads, of which workers starting {stats['ready_s']:.1f} s; on ready workers "
                      f"{warm:6.2f} s = {base / warm:4.2f}x ({seed[1] / warm:4.2f}x the loop at 1 thread); pass 1 "
                      f"{stats['pass1_s']:.1f} s, pass 2 {stats.get('pass2_s', 0):.1f} s"
                      + (f" (batches from memory {kept['memory']}, disk {kept['disk']}, a second forward "
                         f"{kept['forward']}; kept at most {max(stats['peak_kept_bytes'].values()) / 2 ** 20:.0f} MiB "
                         f"per worker of a {budget:.1f} GiB budget)" if kept else "")
                      + f"; worker peak RSS {stats['peak_rss_mb']:.0f} MiB")
        for mode in args.modes:
            if (mode, 1) in results and (mode, 2) in results:
                print(f"  {mode}: scaling efficiency 1 -> 2 workers (ready workers) "
                      f"{results[mode, 1] / (2 * results[mode, 2]):.2f}")
        rounds = [(base, results)]
        for r in range(2, args.rounds + 1):  # the VM's speed drifts by the minute: the two sides take turns
            base = _seed_loop(model, dataset, batches, default_threads)
            results = {}
            for mode in args.modes:
                for w in args.workers:
                    budget = args.memory_gb if args.memory_gb is not None else cluster.memory_per_worker(w) / 2 ** 30
                    seconds, stats = _quantray(cluster, model, spec, dataset, batches, w, mode, budget)
                    results[mode, w] = seconds - stats["ready_s"]
            rounds.append((base, results))
            print(f"  round {r}: seed loop {base:.2f} s; " + "; ".join(
                f"{mode} {w} worker(s) {s:.2f} s = {base / s:4.2f}x" for (mode, w), s in results.items()))
        if len(rounds) > 1:
            for key in rounds[0][1]:
                ratios = sorted(b / res[key] for b, res in rounds)
                print(f"  {key[0]} {key[1]} worker(s), ready workers, {len(rounds)} rounds: "
                      + ", ".join(f"{b / res[key]:.2f}x" for b, res in rounds)
                      + f"; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()

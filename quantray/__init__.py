"""quantray: distributed, bit-exact post-training INT8 quantization of PyTorch models on Ray.

    quantray run jobs/digits.toml                          # command line
    result = quantray.run("jobs/digits.toml", workers=2)   # Python: RunResult(location, metrics, manifest)
    model = result.int8()                                  # or quantray.load_quantized(run_dir)
    again = quantray.evaluate(result.location, samples=300)

The API is imported on first use (PEP 562): `import quantray` and the command line's `--help` and
spec errors do not import torch or Ray (about 2 s of imports).
"""

from .version import __version__

__all__ = ["run", "evaluate", "RunResult", "load_quantized", "__version__"]


def __getattr__(name: str):
    if name in ("run", "evaluate", "RunResult", "load_quantized"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantray' has no attribute {name!r}")

"""quantray: distributed, bit-exact post-training INT8 quantization of PyTorch models on Ray.

    quantray run jobs/digits.toml                          # command line
    result = quantray.run("jobs/digits.toml", workers=2)   # Python: RunResult(location, metrics, manifest)
    model = result.int8()                                  # or quantray.load_quantized(run_dir)
    again = quantray.evaluate(result.location, samples=300)
"""

from .api import RunResult, evaluate, load_quantized, run
from .version import __version__

__all__ = ["run", "evaluate", "RunResult", "load_quantized", "__version__"]

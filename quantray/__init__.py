"""quantray: distributed, bit-exact post-training INT8 quantization of PyTorch models on Ray.

    quantray run jobs/digits.toml          # command line
    model = quantray.load_quantized(run)   # the INT8 model of a finished run
"""

__version__ = "0.1.0"

from .artifacts import load_quantized  # noqa: E402

__all__ = ["load_quantized", "__version__"]

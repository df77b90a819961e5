"""The small error hierarchy: what the CLI turns into one line and an exit code."""

__all__ = ["QuantrayError", "SpecError", "DataError", "CalibrationError", "EngineFault", "first_line"]


class QuantrayError(Exception):
    """A failure a person can act on: printed as one line, exit code `exit_code`."""

    exit_code = 1


class SpecError(QuantrayError):
    """Bad user input (job file, CLI arguments, checkpoint): found before any work starts."""

    exit_code = 2


class DataError(QuantrayError):
    """A sample or an activation that cannot be used (fails to load, NaN/Inf)."""


class CalibrationError(QuantrayError):
    """Calibration could not produce exact statistics (a worker died, a range was violated)."""


class EngineFault(QuantrayError):
    """The INT8 kernels disagree with the reference quantization (`core.engine`): no choice of ranges
    or layers can cure that, so `quantray tune` stops before its trials."""

    exit_code = 3


def first_line(error: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

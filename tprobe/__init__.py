"""tprobe: embedding cache + linear probes for microscopy cell images."""

__version__ = "0.2.0"

from tprobe.errors import TprobeError  # noqa: E402

__all__ = ["TprobeError", "__version__"]

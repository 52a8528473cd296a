"""tprobe's version (read by the build and recorded in every store and run)."""

__version__ = "0.7.0"

"""The ``tprobe`` command line: parse, call the library, echo."""

from tprobe.cli.main import main

__all__ = ["main"]

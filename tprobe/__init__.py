"""tprobe: an embedding cache and probe toolkit for microscopy cell images.

The public Python API is this package's top level (``tprobe.extract(...)``, ``tprobe.probe(...)``, ...):
each function is one stage of the pipeline, takes paths, names and typed records, and returns a typed
artifact (:class:`~tprobe.data.preprocess.Preprocessed`, :class:`~tprobe.cache.store.FeatureStore`,
:class:`~tprobe.probing.run.ProbeRun`, ...); they are defined, and documented, in :mod:`tprobe.api`. The
``tprobe`` command line is a thin shell over the same calls. The stage modules load on first use, so
``import tprobe`` loads neither torch nor transformers.
"""

from tprobe import api
from tprobe._version import __version__
from tprobe.api import *  # noqa: F403 - the public API is api.__all__
from tprobe.errors import TprobeError

API = tuple(api.__all__)
# `from tprobe import *` leaves Python's built-in map alone; tprobe.map is the stage
__all__ = ["TprobeError", "__version__", *(name for name in API if name != "map")]

"""tprobe: an embedding cache and probe toolkit for microscopy cell images.

The public Python API is this package's top level (``tprobe.extract(...)``, ``tprobe.probe(...)``, ...):
each function is one stage of the pipeline, takes paths, names and typed records, and returns a typed
artifact (:class:`~tprobe.data.preprocess.Preprocessed`, :class:`~tprobe.cache.store.FeatureStore`,
:class:`~tprobe.probing.run.ProbeRun`, ...). The ``tprobe`` command line is a thin shell over the same
calls. Names are imported on first use, so ``import tprobe`` loads neither torch nor transformers.
"""

from tprobe.errors import TprobeError

__version__ = "0.3.0"

# every name of the public API lives in tprobe.api; see that module for the documentation
API = (
    "discover",
    "preprocess",
    "list_models",
    "resolve_model",
    "extract",
    "open_store",
    "status",
    "export",
    "feature_sets",
    "probe",
    "predict",
    "curve",
    "map",
    "report",
    "finetune",
    "baseline",
    "saliency",
)

__all__ = ["TprobeError", "__version__", *API]


def __getattr__(name: str):
    if name in API:
        from tprobe import api

        return getattr(api, name)
    raise AttributeError(f"module 'tprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

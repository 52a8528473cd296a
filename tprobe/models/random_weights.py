"""Random weights: one predicate and one set of marks for everything built on a randomly initialised model.

A model saved by :mod:`tprobe.testing` records ``tprobe_random_init`` in its config; the fact travels as
``ModelRef.random_init`` -> the store's ``model_random_init`` attribute -> ``FeatureSource.random_init``
-> the run record, and every console line, table, figure and report built on it carries a mark from
here, so a plumbing check is never read as a result.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MARK", "NOTE", "SHORT_NOTE", "TITLE_PREFIX", "TITLE_SUFFIX", "is_random", "named_random"]

MARK = "RANDOM WEIGHTS"
NOTE = f"{MARK}: features from a randomly initialised model; a plumbing check, not a result"  # console
SHORT_NOTE = f"{MARK}: a plumbing check, not a result"  # under a figure
TITLE_PREFIX = f"{MARK} (plumbing check, not a result) · "  # before a figure's title
TITLE_SUFFIX = " (random weights: plumbing check)"  # after a run's title


def named_random(*names) -> bool:
    """Records written before the flag existed: a model name, id or path containing "random"."""
    return any("random" in str(n or "").lower() for n in names)


def is_random(thing) -> bool:
    """Whether ``thing`` comes from a randomly initialised model.

    ``thing``: a :class:`~tprobe.models.backbones.ModelRef` or Backbone (``random_init``), a feature
    source (a ``FeatureSource`` or its dict; a store's attributes, ``model_random_init``), a run record
    (``random_weights``), or ``None``. A store source recorded without the flag falls back to
    :func:`named_random` on its model's names.
    """
    if thing is None:
        return False
    if isinstance(thing, Mapping):
        if thing.get("model_random_init") is not None:
            return bool(thing["model_random_init"])
        if thing.get("random_init"):
            return True
        kind, names = (
            thing.get("kind", "store"),
            (thing.get(k) for k in ("model", "model_source", "model_id")),
        )
    else:
        flag = getattr(thing, "random_weights", None)  # a run record decides with its own legacy rules
        if isinstance(flag, bool):
            return flag
        if getattr(thing, "random_init", False):
            return True
        kind = getattr(thing, "kind", None)
        names = (getattr(thing, k, None) for k in ("model", "model_source", "model_id"))
    return kind == "store" and named_random(*names)

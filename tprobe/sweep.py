"""Probe sweeps as a library call: heads x feature sources, one run directory each, one summary.

``run_sweep(sources, heads, out=...)`` is what ``tprobe probe --head all --pool all`` runs; a notebook
can call it too::

    from tprobe.sweep import run_sweep, store_sources
    res = run_sweep(store_sources("cache/.../float16-fp32-<rows>.zarr", ["cls", "mean"]), ["logreg", "xgboost"],
                    out="runs", probe_kwargs={"n_boot": 500})
    res.summary  # one row per run: pool, head, mean/sd ROC AUC, AP, accuracy, seconds, run

With more than one run it writes ``<out>/<stamp>-sweep/`` holding the run directories,
``summary.parquet``, ``summary.json`` and ``sweep_auc.png``; a single run goes straight under ``out``.
Progress goes to this module's logger at INFO (a single run: its start and every outer fold; a sweep:
one ``[i/N]`` line as each run starts, its folds at DEBUG) and to the optional ``progress`` callback as
:class:`SweepEvent` objects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tprobe.errors import TprobeError
from tprobe.fastcv import FoldProgress
from tprobe.features import META, FeatureSet, store_source, verified_manifest
from tprobe.probe import ProbeRun
from tprobe.store import POOLS, FeatureStore
from tprobe.tokens import check_pool

__all__ = ["SweepEvent", "SweepResult", "run_sweep", "store_sources", "pool_store", "SUMMARY_METRICS"]
log = logging.getLogger(__name__)

SUMMARY_METRICS = ("roc_auc", "average_precision", "accuracy")
# a source: (name, loader) where loader(name) returns a FeatureSet or raises TprobeError
Source = tuple[str, Callable[[str], FeatureSet]]


@dataclass
class SweepEvent:
    """One progress report: ``kind`` is "skip", "start", "fold" or "run" (a run finished)."""

    kind: str
    source: str
    head: str | None = None
    message: str = ""
    features: FeatureSet | None = None
    run: ProbeRun | None = None
    path: Path | None = None
    fold: FoldProgress | None = None


@dataclass
class SweepResult:
    """``out``: the sweep folder (or the single run's); ``summary``: one row per run."""

    out: Path
    summary: pd.DataFrame
    runs: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def is_sweep(self) -> bool:
        return len(self.runs) > 1 or bool(self.skipped)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "summary": self.summary.to_dict("records"),
                "runs": [str(r) for r in self.runs], "skipped": self.skipped, "seconds": self.seconds}  # fmt: skip


def pool_store(path: str | Path, pools: Sequence[str]) -> dict[str, FeatureSet | TprobeError]:
    """Every pooling in ``pools`` from ONE pass over the store (:meth:`FeatureStore.pooled_many`).

    Values equal ``from_store(path, pool)``'s; a pooling the store cannot give (``registers`` of a
    model without registers) maps to the :class:`TprobeError` ``from_store`` would raise.
    """
    for p in pools:
        if p not in POOLS:
            raise TprobeError(f"pool {p!r} is not one of {', '.join(POOLS)}")
    store = FeatureStore.open(path)
    meta = verified_manifest(store)[META].reset_index(drop=True)
    out: dict[str, FeatureSet | TprobeError] = {}
    ok = []
    for p in dict.fromkeys(pools):
        try:
            check_pool(p, store.num_registers)
            ok.append(p)
        except TprobeError as exc:
            out[p] = TprobeError(f"{path}: {exc}")
    for p, X in (store.pooled_many(ok) if ok else {}).items():
        out[p] = FeatureSet(X, meta, store_source(store, p))
    return out


def store_sources(path: str | Path, pools: Sequence[str]) -> list[Source]:
    """Sources for :func:`run_sweep` from one store; the store is read once, on the first load."""
    cache: dict = {}

    def load(pool: str) -> FeatureSet:
        if not cache:
            cache.update(pool_store(path, pools))
        got = cache.pop(pool)  # dropped once its runs start, so memory holds one big matrix less
        if isinstance(got, TprobeError):
            raise got
        return got

    return [(p, load) for p in pools]


def summary_row(fs: FeatureSet, head: str, run: ProbeRun, path: Path) -> dict:
    s = run.summary_
    return {"features": fs.source.get("model", fs.name), "pool": fs.source.get("pool", "table"), "head": head,
            **{f"{m}_{k}": s[m][k] for m in SUMMARY_METRICS for k in ("mean", "sd")},
            "freq_roc_auc": run.reference_["frequency"]["roc_auc"]["mean"],
            "seconds": round(run.seconds_, 1), "run": path.name}  # fmt: skip


def run_sweep(sources: Sequence[Source], heads: Sequence[str], *, out: str | Path = "runs",
              probe_kwargs: dict | None = None,
              progress: Callable[[SweepEvent], None] | None = None) -> SweepResult:  # fmt: skip
    """Fit and save a :class:`ProbeRun` for every source x head; write the sweep summary.

    ``probe_kwargs`` are :class:`ProbeRun` parameters shared by every run (split, seed, n_boot, ...).
    With one source and one head, errors propagate and the run directory goes straight under ``out``;
    in a sweep a source that cannot load is skipped (a "skip" event) and the rest run.
    """
    from tprobe.runs import make_run_dir, write_json

    t_start = time.perf_counter()
    probe_kwargs = dict(probe_kwargs or {})
    sweep = len(heads) * len(sources) > 1
    base = make_run_dir(out, "sweep") if sweep else Path(out)

    n_runs, started = len(heads) * len(sources), [0]

    def emit(ev: SweepEvent) -> None:
        where = f"{ev.source} · {ev.head}: " if ev.head else f"{ev.source}: "
        if ev.kind == "start" and sweep:  # a sweep: one line per run; its folds at DEBUG
            started[0] += 1
            log.info("[%d/%d] %s%s", started[0], n_runs, where, ev.message)
        elif ev.kind in ("skip", "start") or (ev.kind == "fold" and not sweep):
            log.info("%s%s", where, ev.message)
        elif ev.kind == "fold":
            log.debug("%s%s", where, ev.message)
        if progress is not None:
            progress(ev)

    rows, runs, skipped = [], [], {}
    for name, load in sources:
        try:
            fs = load(name)
        except TprobeError as exc:
            if not sweep:
                raise
            skipped[name] = str(exc)
            emit(SweepEvent("skip", name, message=f"skipping pool {name}: {exc}"))
            continue
        for h in heads:
            emit(SweepEvent("start", name, h, f"{len(fs.meta)} rows x {fs.X.shape[1]} features", features=fs))

            def on_fold(fp: FoldProgress, name=name, h=h) -> None:
                emit(SweepEvent("fold", name, h, str(fp), fold=fp))

            run = ProbeRun(head=h, **probe_kwargs).fit(fs, progress=on_fold)
            path = run.save(base, f"{fs.name}-{h}")
            runs.append(path)
            rows.append(summary_row(fs, h, run, path))
            emit(SweepEvent("run", name, h, f"{run.seconds_:.1f} s; run dir {path}", features=fs, run=run,
                            path=path))  # fmt: skip
        del fs
    summary = pd.DataFrame(rows)
    if sweep:
        from tprobe.plots import sweep_bars

        summary.to_parquet(base / "summary.parquet", index=False)
        write_json(base / "summary.json", summary.to_dict("records"))
        if len(summary):
            sweep_bars(summary, base / "sweep_auc.png")
    out_path = base if sweep else (runs[0] if runs else base)
    return SweepResult(out_path, summary, runs, skipped, time.perf_counter() - t_start)

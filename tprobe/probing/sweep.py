"""Probe sweeps as a library call: heads x feature sources, one run directory each, one summary.

``tprobe.probe(...)`` (what ``tprobe probe`` calls) checks the names asked for (:func:`expand_names`),
builds the sources (:func:`probe_sources`: feature sets, a table, a store or a model's cached store) and
fits one run or the sweep (:func:`run_probes`). ``run_sweep(sources, heads, out=...)`` is the sweep
itself; a notebook can call it too::

    from tprobe.probing.sweep import run_sweep, store_sources
    res = run_sweep(store_sources("cache/.../float16-fp32-<rows>.zarr", ["cls", "mean"]), ["logreg", "xgboost"],
                    out="runs", probe_kwargs={"n_boot": 500})
    res.summary  # one row per run: pool, head, mean/sd ROC AUC, AP, accuracy, seconds, run

With more than one run it writes ``<out>/<stamp>-sweep/`` holding the run directories,
``summary.parquet``, ``summary.json`` and ``sweep_auc.png`` (and ``auc_by_layer.png`` when it probes several
``cls@<layer>`` pools: ``--pool layers``); a single run goes straight under ``out``.
Progress goes to this module's logger at INFO (a single run: its start and every outer fold; a sweep:
one ``[i/N]`` line as each run starts, its folds at DEBUG) and to the optional ``progress`` callback as
:class:`SweepEvent` objects.

The same sweep as separate tasks (one per pool x head; a SLURM array, see
:func:`tprobe.cluster.slurm.sweep_array`): :func:`plan_sweep` writes the sweep folder with its plan
(``sweep.json``: store, pools, heads, probe settings; plain JSON), :func:`run_task` runs task ``i``
through :func:`run_sweep` into that folder and records its summary row in ``tasks/<i>.json`` once the
run directory is written, and :func:`collect_sweep` writes the summary, equal to the one-process
sweep's. A task whose record is missing (failed, cancelled, never run) is the only thing a rerun does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tprobe.cache.store import FeatureStore
from tprobe.errors import TprobeError
from tprobe.features.sources import FeatureSet, check_finite, store_meta, store_source
from tprobe.models.random_weights import is_random
from tprobe.models.tokens import check_pool_name, pool_layer
from tprobe.probing.fastcv import FoldProgress
from tprobe.probing.run import ProbeRun

__all__ = [
    "SweepEvent",
    "SweepResult",
    "run_sweep",
    "store_sources",
    "model_sources",
    "pool_store",
    "SUMMARY_METRICS",
    "SweepPlan",
    "plan_sweep",
    "run_task",
    "task_done",
    "missing_tasks",
    "collect_sweep",
    "resume_sweep",
    "check_names",
    "expand_names",
    "probe_sources",
    "run_probes",
    "is_table",
    "is_store_input",
]
log = logging.getLogger(__name__)
RUN_DETAIL = "details.txt"  # a sweep's run folder: the lines a single run prints

SUMMARY_METRICS = ("roc_auc", "average_precision", "accuracy")
# a source: (name, loader) where loader(name) returns a FeatureSet or raises TprobeError
Source = tuple[str, Callable[[str], FeatureSet]]


@dataclass
class SweepEvent:
    """One progress report: ``kind`` is "skip", "start", "fold" or "run" (a run finished); ``total``: the
    number of runs the call makes (more than one: a sweep)."""

    kind: str
    source: str
    head: str | None = None
    message: str = ""
    features: FeatureSet | None = None
    run: ProbeRun | None = None
    path: Path | None = None
    fold: FoldProgress | None = None
    total: int = 1


@dataclass
class SweepResult:
    """``out``: the sweep folder (or the single run's); ``summary``: one row per run."""

    out: Path
    summary: pd.DataFrame
    runs: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    random_init: bool = False  # a source came from a randomly initialised model
    collected: bool = False  # written by collect_sweep from the task records (an array or --resume)

    @property
    def is_sweep(self) -> bool:
        return len(self.runs) > 1 or bool(self.skipped)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "summary": self.summary.to_dict("records"),
            "runs": [str(r) for r in self.runs],
            "skipped": self.skipped,
            "seconds": self.seconds,
            "random_init": self.random_init,
            "collected": self.collected,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SweepResult:
        return cls(
            Path(d["out"]),
            pd.DataFrame(d["summary"]),
            [Path(r) for r in d.get("runs", [])],
            dict(d.get("skipped", {})),
            float(d.get("seconds", 0.0)),
            bool(d.get("random_init", False)),
            bool(d.get("collected", False)),
        )


def pool_store(path: str | Path, pools: Sequence[str]) -> dict[str, FeatureSet | TprobeError]:
    """Every pooling in ``pools`` from ONE pass over the store (:meth:`FeatureStore.pooled_many`).

    Values equal ``from_store(path, pool)``'s; a pooling the store cannot give (``registers`` of a
    model without registers) maps to the :class:`TprobeError` ``from_store`` would raise.
    """
    for p in pools:
        check_pool_name(p)
    store = FeatureStore.open(path)
    meta = store_meta(store)
    out: dict[str, FeatureSet | TprobeError] = {}
    ok = []
    for p in dict.fromkeys(pools):
        try:
            store.check_pool(p)  # registers the model lacks, layers the store lacks
            ok.append(p)
        except TprobeError as exc:
            out[p] = TprobeError(f"{path}: {exc}")
    for p, X in (store.pooled_many(ok) if ok else {}).items():
        try:
            out[p] = FeatureSet(check_finite(store, p, X, meta), meta, store_source(store, p))
        except TprobeError as exc:
            out[p] = exc
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


def model_sources(stores: Sequence[tuple[str, str | Path, Sequence[str]]]) -> list[Source]:
    """Sources for several models' stores (``tprobe probe --model A --model B``): ``(model, store, pools)``
    each, named ``<model> · <pool>``; each store is read once, on its first load."""
    out: list[Source] = []
    for model, path, pools in stores:
        for pool, load in store_sources(path, pools):
            out.append((f"{model} · {pool}", lambda _name, load=load, pool=pool: load(pool)))
    return out


def summary_row(fs: FeatureSet, head: str, run: ProbeRun, path: Path) -> dict:
    s = run.summary_
    return {
        "features": fs.source.get("model", fs.name),
        "pool": fs.source.get("pool", "table"),
        "head": head,
        **{f"{m}_{k}": s[m][k] for m in SUMMARY_METRICS for k in ("mean", "sd")},
        "freq_roc_auc": run.reference_["frequency"]["roc_auc"]["mean"],
        "seconds": round(run.seconds_, 1),
        "run": path.name,
    }


def run_sweep(
    sources: Sequence[Source],
    heads: Sequence[str],
    *,
    out: str | Path | None = "runs",
    probe_kwargs: dict | None = None,
    progress: Callable[[SweepEvent], None] | None = None,
) -> SweepResult:
    """Fit and save a :class:`ProbeRun` for every source x head; write the sweep summary.

    ``probe_kwargs`` are :class:`ProbeRun` parameters shared by every run (split, seed, n_boot, ...).
    With one source and one head, errors propagate and the run directory goes straight under ``out``
    (``out=None``: fitted, not saved); in a sweep a source that cannot load is skipped (a "skip" event)
    and the rest run.
    """
    from tprobe.runs.record import make_run_dir

    t_start = time.perf_counter()
    probe_kwargs = dict(probe_kwargs or {})
    sweep = len(heads) * len(sources) > 1
    base = make_run_dir("runs" if out is None else out, "sweep") if sweep else out

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

    rows, runs, skipped, random_init = [], [], {}, False
    for name, load in sources:
        try:
            fs = load(name)
        except TprobeError as exc:
            if not sweep:
                raise
            skipped[name] = str(exc)
            emit(SweepEvent("skip", name, message=f"skipping pool {name}: {exc}", total=n_runs))
            continue
        random_init = random_init or is_random(fs.source)
        for h in heads:
            shape = f"{len(fs.meta)} rows x {fs.X.shape[1]} features"
            emit(SweepEvent("start", name, h, shape, features=fs, total=n_runs))

            def on_fold(fp: FoldProgress, name=name, h=h) -> None:
                emit(SweepEvent("fold", name, h, str(fp), fold=fp, total=n_runs))

            run = ProbeRun(head=h, **probe_kwargs).fit(fs, progress=on_fold)
            if base is None:  # one run, not saved
                emit(SweepEvent("run", name, h, f"{run.seconds_:.1f} s", features=fs, run=run, total=1))
                continue
            path = run.save(base, f"{fs.name}-{h}")
            runs.append(path)
            rows.append(summary_row(fs, h, run, path))
            message = f"{run.seconds_:.1f} s; run dir {path}"
            if sweep:  # the console gets one summary table; each run's own lines go into its folder
                lines = [f"== {fs.name} · {h}: {shape}", *run.details(), f"   {message}"]
                (path / RUN_DETAIL).write_text("\n".join(lines) + "\n")
            emit(SweepEvent("run", name, h, message, features=fs, run=run, path=path, total=n_runs))
        del fs
    summary = pd.DataFrame(rows)
    if sweep:
        write_summary(base, summary, random_init=random_init)
    out_path = base if sweep else (runs[0] if runs else base)
    seconds = time.perf_counter() - t_start
    return SweepResult(out_path, summary, runs, skipped, seconds, random_init=random_init)


def write_summary(base: Path, summary: pd.DataFrame, *, random_init: bool = False) -> None:
    """A sweep folder's ``summary.parquet``, ``summary.json`` and ``sweep_auc.png`` (and ``auc_by_layer.png``
    when it probed ``cls@`` several layers)."""
    from tprobe.plot.figures import sweep_bars
    from tprobe.runs.record import write_json

    summary.to_parquet(base / "summary.parquet", index=False)
    write_json(base / "summary.json", summary.to_dict("records"))
    if len(summary):
        sweep_bars(_bar_rows(summary), base / "sweep_auc.png", random_init=random_init)
        if summary["pool"].map(pool_layer).nunique() > 1:  # --pool layers
            from tprobe.plot.figures import auc_by_layer

            auc_by_layer(summary, base / "auc_by_layer.png", random_init=random_init)


def _bar_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with one bar per (pool, head): sources sharing a pool (several stores' ``cls``, several
    tables) get a bar each, labelled ``<features> · <pool>`` (``#2``, ... for the same source again)."""
    if not summary.duplicated(["pool", "head"]).any():
        return summary
    label = summary["features"].map(lambda f: Path(str(f)).name) + " · " + summary["pool"].astype(str)
    n = label.groupby([label, summary["head"]]).cumcount()
    return summary.assign(pool=label + n.map(lambda k: f" #{k + 1}" if k else ""))


# ---- the sweep as separate tasks (a SLURM array): plan, run task i, collect ---------------------------
PLAN_FILE = "sweep.json"
PLAN_SCHEMA = 1


@dataclass
class SweepPlan:
    """What every task of a split sweep needs: task ``i`` is ``tasks[i]`` = (pool, head), pools outer."""

    store: str  # absolute path of the feature store
    pools: list[str]  # the pools the store can give, in sweep order
    heads: list[str]
    probe_kwargs: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # pool -> why the store cannot give it

    @property
    def tasks(self) -> list[tuple[str, str]]:
        return [(p, h) for p in self.pools for h in self.heads]

    def to_dict(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "store": self.store,
            "pools": self.pools,
            "heads": self.heads,
            "probe_kwargs": self.probe_kwargs,
            "skipped": self.skipped,
        }

    @classmethod
    def load(cls, sweep: str | Path) -> SweepPlan:
        path = Path(sweep) / PLAN_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise TprobeError(
                f"{path}: no sweep plan here; give the folder `tprobe probe --executor slurm` "
                "printed (it holds sweep.json)"
            ) from None
        except (OSError, ValueError) as exc:
            raise TprobeError(f"{path}: not a readable sweep plan ({exc}); start the sweep again") from None
        if not isinstance(d, dict) or d.get("schema") != PLAN_SCHEMA:
            raise TprobeError(
                f"{path}: sweep plan schema {d.get('schema') if isinstance(d, dict) else '?'!r}, "
                f"this tprobe reads {PLAN_SCHEMA}; start the sweep again"
            )
        try:
            plan = cls(
                str(d["store"]),
                list(d["pools"]),
                list(d["heads"]),
                dict(d["probe_kwargs"]),
                dict(d["skipped"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TprobeError(f"{path}: sweep plan lacks or garbles {exc}; start the sweep again") from None
        check_names(plan.pools, plan.heads, f"{path}: ")
        return plan


def check_names(pools: Sequence[str], heads: Sequence[str], where: str = "", *, asked: bool = False) -> None:
    """The one head and pool name check: of a sweep plan (``where`` names it) and of what a user asks
    for (``asked``: ``all`` and ``layers`` are names too, and the lines name the options ``--head``/``--pool``).
    """
    from tprobe.probing.heads import HEADS

    where, also = (f"{where}--", ("all",)) if asked else (where, ())
    for h in heads:
        if h not in (*HEADS, *also):
            raise TprobeError(f"{where}head {h!r} is not one of {', '.join(HEADS + also)}")
    for p in pools:
        check_pool_name(p, where, also=(*also, "layers") if asked else ())


def plan_sweep(
    store: str | Path,
    pools: Sequence[str],
    heads: Sequence[str],
    *,
    out: str | Path = "runs",
    probe_kwargs: dict | None = None,
) -> Path:
    """Make ``<out>/<stamp>-sweep/`` with its ``sweep.json``; return the folder (absolute).

    A pool the store cannot give is left out of the tasks and recorded as skipped, as :func:`run_sweep`
    skips it; nothing is fitted here.
    """
    from tprobe.runs.record import make_run_dir, write_json

    check_names(pools, heads, "probe sweep: ")
    store = Path(store).absolute()
    st = FeatureStore.open(store)
    ok, skipped = [], {}
    for p in dict.fromkeys(pools):
        try:
            st.check_pool(p)
            ok.append(p)
        except TprobeError as exc:
            skipped[p] = f"{store}: {exc}"
    if not ok:
        raise TprobeError(
            f"{store}: gives none of the pools {', '.join(pools)}: {next(iter(skipped.values()))}"
        )
    base = make_run_dir(Path(out).absolute(), "sweep")
    plan = SweepPlan(str(store), ok, list(dict.fromkeys(heads)), dict(probe_kwargs or {}), skipped)
    write_json(base / PLAN_FILE, plan.to_dict())
    return base


def _record(sweep: Path, i: int) -> Path:
    return Path(sweep) / "tasks" / f"{i}.json"


def _read_record(sweep: Path, i: int) -> dict | None:
    """Task ``i``'s record if it finished: its run folder is there and the record names it."""
    from tprobe.runs.record import inside

    try:
        rec = json.loads(_record(sweep, i).read_text())
        run = inside(sweep, rec["row"]["run"], what="run folder of a sweep task")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if (run / "per_donor.parquet").exists() else None


def task_done(sweep: str | Path, i: int) -> bool:
    return _read_record(Path(sweep), i) is not None


def missing_tasks(sweep: str | Path, plan: SweepPlan | None = None) -> list[int]:
    plan = plan or SweepPlan.load(sweep)
    return [i for i in range(len(plan.tasks)) if not task_done(sweep, i)]


def run_task(sweep: str | Path, i: int, *, progress: Callable[[SweepEvent], None] | None = None) -> Path:
    """Run task ``i`` of the sweep folder (one pool x head) and record it; a done task is left as it is.

    The run goes through :func:`run_sweep` with the plan's store, pool, head and settings, so it is the
    run a one-process sweep makes. Returns the run folder.
    """
    sweep = Path(sweep)
    plan = SweepPlan.load(sweep)
    if not 0 <= i < len(plan.tasks):
        raise TprobeError(f"--sweep-task {i}: {sweep} has tasks 0..{len(plan.tasks) - 1}")
    rec = _read_record(sweep, i)
    if rec is not None:
        log.info("task %d (%s · %s) already done: %s", i, rec["pool"], rec["head"], rec["row"]["run"])
        return sweep / rec["row"]["run"]
    pool, head = plan.tasks[i]
    res = run_sweep(
        store_sources(plan.store, [pool]),
        [head],
        out=sweep,
        probe_kwargs=plan.probe_kwargs,
        progress=progress,
    )
    row = res.summary.iloc[0].to_dict()
    path = _record(sweep, i)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    from tprobe.runs.record import write_json

    write_json(tmp, {"task": i, "pool": pool, "head": head, "row": row})
    os.replace(tmp, path)  # the record appears whole, after the run folder is written
    return res.runs[0]


def collect_sweep(sweep: str | Path) -> SweepResult:
    """The sweep summary from every task's record (in the one-process sweep's order), written to the folder.

    Raises :class:`TprobeError` naming the tasks still missing.
    """
    sweep = Path(sweep)
    plan = SweepPlan.load(sweep)
    recs = [_read_record(sweep, i) for i in range(len(plan.tasks))]
    missing = [
        f"{i} ({p} · {h})" for i, ((p, h), r) in enumerate(zip(plan.tasks, recs, strict=True)) if r is None
    ]
    if missing:
        raise TprobeError(
            f"{sweep}: task(s) {', '.join(missing)} not done; rerun them with `tprobe probe --resume "
            f"{sweep}` (add --executor slurm to run them as an array)"
        )
    summary = pd.DataFrame([r["row"] for r in recs])
    numeric = [c for c in summary.columns if c not in ("features", "pool", "head", "run")]
    summary[numeric] = summary[numeric].apply(pd.to_numeric, errors="coerce")  # JSON null -> NaN
    random_init = bool(FeatureStore.open(plan.store).attrs.get("model_random_init", False))
    write_summary(sweep, summary, random_init=random_init)
    runs = [sweep / r["row"]["run"] for r in recs]
    seconds = float(summary["seconds"].sum())
    return SweepResult(sweep, summary, runs, dict(plan.skipped), seconds, random_init, collected=True)


def resume_sweep(sweep: str | Path, *, progress: Callable[[SweepEvent], None] | None = None) -> SweepResult:
    """Run the sweep folder's missing tasks here, one after another, then :func:`collect_sweep` it."""
    plan = SweepPlan.load(sweep)
    for i in missing_tasks(sweep, plan):
        run_task(sweep, i, progress=progress)
    return collect_sweep(sweep)


# ---- what a user asks for: names, the feature sources, one run or a sweep --------------------------------
def expand_names(head: str | Sequence[str], pool: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """``head``/``pool`` as asked (a name, ``all``, ``layers`` or a list of them) -> (heads, pools), checked.

    ``all`` stands for every head (:data:`~tprobe.probing.heads.HEADS`) or pool
    (:data:`~tprobe.models.tokens.POOLS`); ``layers`` stays for :func:`probe_sources` to expand with
    the store's layers.
    """
    from tprobe.models.tokens import POOLS
    from tprobe.probing.heads import HEADS

    heads = [head] if isinstance(head, str) else list(head)
    pools = [pool] if isinstance(pool, str) else list(pool)
    check_names(pools, heads, asked=True)
    heads = list(HEADS) if "all" in heads else list(dict.fromkeys(heads))
    pools = list(dict.fromkeys(q for p in pools for q in (POOLS if p == "all" else [p])))
    if not heads or not pools:
        raise TprobeError("--head and --pool: name at least one of each")
    return heads, pools


def is_table(path: str | Path) -> bool:
    """A feature table path (CSV/Parquet) rather than a feature store (``.zarr``/``.h5``, or a folder)."""
    from tprobe.cache.store import FORMATS

    path = Path(path)
    return path.suffix not in FORMATS.values() and not path.is_dir()


def is_store_input(features) -> bool:
    """Whether :func:`probe_sources` reads ``features`` from a feature store (a path, a store, or
    ``None``: a model's cached store), not from a table or FeatureSets."""
    if isinstance(features, str | Path):
        return not is_table(features)
    return features is None or isinstance(features, FeatureStore)


def probe_sources(
    features=None,
    pools: Sequence[str] | None = None,
    *,
    model: str | Sequence[str] | None = None,
    revision: str | None = None,
    data=None,
    config=None,
    canvas_set: bool = False,
    cache: str | Path = "cache",
    offline: bool = False,
    table_options: dict | None = None,
) -> tuple[list[Source], Path | None, list[str]]:
    """The sources :func:`run_sweep` fits, the store they come from (``None``: not one store) and the pools.

    ``features``: a :class:`FeatureSet` or a list of them (one source each; ``pools`` do not apply), a
    feature table path (joined to the images of ``data``; ``table_options``: ``id_column``, ``exclude``,
    ``keep_columns``, ``all_table_rows``), a store path or :class:`FeatureStore` (checked against ``data``
    when given), or ``None``: ``model``'s store in ``cache`` for ``data`` preprocessed with ``config``
    (``canvas_set``: the canvas was set by the user, so it is not rounded to the model's patch size).
    Several models (a list, or a family alias such as ``dinov2-all``): each one's store, the sources
    named ``<model> · <pool>`` (:func:`model_sources`), and no one store (``None``).
    ``pools`` (of a store; default ``cls``): ``layers`` becomes ``cls@`` each layer the store holds.
    """
    from tprobe.data.preprocess import prepare

    def prepared(**kw):
        pre = prepare(data, config, canvas_set=canvas_set, progress=False, **kw)
        for s in pre.skipped:
            log.warning("skipped: %s", s)
        return pre

    sets = [features] if isinstance(features, FeatureSet) else features
    table = isinstance(features, str | Path) and is_table(features)
    if (isinstance(sets, list | tuple) and sets) or table:
        if pools is not None:
            raise TprobeError(
                "pool does not apply to a feature table or a FeatureSet (it pools a store's tokens); drop it"
            )
        if table:
            from tprobe.features.assemble import table_set

            path, opts = features, dict(table_options or {})
            sets = [table_set(path, prepared().manifest, **opts)]
        if not all(isinstance(fs, FeatureSet) for fs in sets):
            raise TprobeError(
                "features: give FeatureSets, a feature table, a store or None (a model's store)"
            )
        names = ["table"] if table else [fs.name for fs in sets]  # a table's progress lines: "table · head"
        return [(n, lambda _n, fs=fs: fs) for n, fs in zip(names, sets, strict=True)], None, ["cls"]
    pools = ["cls"] if pools is None else list(pools)
    if isinstance(features, FeatureStore):
        features = features.path
    if features is None:
        from tprobe.cache.keys import find_store
        from tprobe.models.backbones import expand_models, resolve_model

        layered = any(p in ("layers", "last4") or "@" in p for p in pools)
        found = {}
        for m in expand_models([model] if isinstance(model, str | None) else list(model)):
            ref = resolve_model(m or "dinov2-small-reg", revision, offline=offline)
            found[m] = find_store(
                cache, prepared(patch_size=ref.patch_size, model_name=ref.name), ref, layered=layered
            )
        if len(found) > 1:  # several models: each one's store, sources named "<model> · <pool>"
            stores = [(m, s, _layer_pools(s, pools)) for m, s in found.items()]
            return model_sources(stores), None, list(dict.fromkeys(q for *_, ps in stores for q in ps))
        store = next(iter(found.values()))
    elif isinstance(features, str | Path):
        store = Path(features)
        if data is not None:
            from tprobe.features.assemble import check_store_matches, store_patch

            check_store_matches(store, prepared(patch_size=store_patch(store)))
    else:
        raise TprobeError(
            f"features: a {type(features).__name__}; give FeatureSets, a feature table, a store or None"
        )
    pools = _layer_pools(store, pools)
    return store_sources(store, pools), store, pools


def _layer_pools(store: Path, pools: Sequence[str]) -> list[str]:
    """``pools`` with ``layers`` as ``cls@`` each layer ``store`` holds."""
    if "layers" not in pools:
        return list(pools)
    layer_pools = FeatureStore.open(store).layer_pools()
    return list(dict.fromkeys(q for p in pools for q in (layer_pools if p == "layers" else [p])))


def run_probes(
    sources: Sequence[Source],
    heads: Sequence[str],
    *,
    out: str | Path | None = None,
    probe_kwargs: dict | None = None,
    progress: Callable[[SweepEvent], None] | None = None,
) -> ProbeRun | SweepResult:
    """One source and one head: the fitted :class:`ProbeRun` (saved under ``out`` when given: its
    ``path_``); more: the sweep (:func:`run_sweep`, under ``out`` or ``runs``) and its :class:`SweepResult`."""
    if len(sources) * len(heads) > 1:
        return run_sweep(
            sources, heads, out="runs" if out is None else out, probe_kwargs=probe_kwargs, progress=progress
        )
    fitted: list[ProbeRun] = []

    def keep(ev: SweepEvent) -> None:
        if ev.kind == "run":
            fitted.append(ev.run)
        if progress is not None:
            progress(ev)

    run_sweep(sources, heads, out=out, probe_kwargs=probe_kwargs, progress=keep)
    return fitted[0]

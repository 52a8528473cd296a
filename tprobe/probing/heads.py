"""Probe heads as scikit-learn estimators, each with a small hyperparameter grid for nested CV.

Heads are saved as data, never as pickles: :func:`save_head` writes ``skops`` files and
:func:`load_head_file` loads them with an explicit list of trusted types (:data:`TRUSTED_TYPES`, on
top of skops' own safe scikit-learn and numpy types). A file naming any other type is refused
before anything in it is built, so a head received from someone else cannot run code.

Every head standardises the features first (a ``StandardScaler`` step of its pipeline, so it is
fitted on the training rows of each fold only). ``knn`` and ``prototype`` are the foundation-model
evaluation heads (DINOv2's kNN eval, SimpleShot); they then normalise their own way (L2, centring).
Without the scaler their cosine is dominated by the widest column: on a CellProfiler table cell area
carries ~80% of the variance and the kNN vote becomes an area classifier (issue 17). Their learned
state is plain numpy arrays and numbers only, so a fitted head can be saved as data (skops with
trusted types).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tprobe.errors import TprobeError

__all__ = [
    "HEADS",
    "make_head",
    "param_grid",
    "projection",
    "projection_checksum",
    "projection_width",
    "save_head",
    "load_head_file",
    "TRUSTED_TYPES",
    "KNNHead",
    "PrototypeHead",
]

HEADS = ("logreg", "mlp", "xgboost", "knn", "prototype")
# beyond skops' defaults: the MLP's optimiser state and XGBoost's model (loaded by XGBoost from its
# own serialised format, not by unpickling)
TRUSTED_TYPES = [
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "xgboost.sklearn.XGBClassifier",
    "xgboost.core.Booster",
    "tprobe.probing.heads.KNNHead",
    "tprobe.probing.heads.PrototypeHead",
]
# head files written before the stage packages (tprobe <= 0.2) name the heads' old module; they load
# as the same classes (the files' format is unchanged, only the module moved)
LEGACY_MODULES = {"tprobe.heads": "tprobe.probing.heads"}

GRIDS = {
    "logreg": {"clf__C": [0.001, 0.01, 0.1, 1.0]},
    "mlp": {"clf__alpha": [1e-3, 1e-1]},
    "xgboost": {"clf__max_depth": [2, 4]},
    "knn": {"clf__k": [5, 10, 20, 50]},
    "prototype": {},  # nothing to tune: one grid point, no inner search
}


# Inputs wider than MAX_DIMS go through a fixed Gaussian random projection first
# (``ProbeRun(max_dims="auto")``): to MAX_DIMS columns, or to HEAD_DIMS[head]. XGBoost gets 512: a tree
# splits on one column at a time, so its cost grows with the width (each fit bins and histograms every
# column), and the columns of a random projection are random mixtures anyway, so more of them add
# little. On the random ViT-S concat cache 512 columns cost 0.29x the CPU of 2048 at +0.008 mean AUC
# (docs/guide/benchmarks.md, "Probe sweep"). Inputs narrow enough to keep their own columns are never projected: on
# cls+mean (768 columns) a 512-column projection cost xgboost 0.03 AUC.
MAX_DIMS = 2048
HEAD_DIMS = {"xgboost": 512}


def projection_width(name: str, n_features: int, max_dims: int | str | None = "auto") -> int | None:
    """How many columns head ``name`` projects ``n_features`` inputs to; ``None``: no projection.

    ``max_dims`` ``"auto"``: inputs wider than :data:`MAX_DIMS` go to the head's width
    (:data:`HEAD_DIMS`, else MAX_DIMS); an int: inputs wider than it go to it; ``None``: never.
    """
    if max_dims == "auto":
        return HEAD_DIMS.get(name, MAX_DIMS) if n_features > MAX_DIMS else None
    if max_dims is not None and (isinstance(max_dims, str) or int(max_dims) < 1):
        raise TprobeError(f"max_dims {max_dims!r} is not 'auto', None or a positive width")
    return max_dims if max_dims is not None and n_features > max_dims else None


def _l2(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# KNNHead.predict_proba computes at most this many query x training similarities at a time (float32: 8 MiB
# per worker)
TOPK_BLOCK = 2**21
# query rows whose similarities are partitioned at a time (their int64 positions: 4 MiB at 2048 columns)
TOPK_SLICE = 256
# rows L2-normalised (fit) or gathered and standardised (tprobe.probing.rowfit) at a time
ROW_BLOCK = 2048
# the kNN search takes its queries this many bytes (float32) at a time: each block of training rows is
# made once per chunk of queries and compared with every batch of it
QUERY_CHUNK_BYTES = 2**23


class KNNHead(ClassifierMixin, BaseEstimator):
    """Weighted k-nearest neighbours on cosine similarity (DINOv2's kNN evaluation).

    Features are L2-normalised; each of the ``k`` most similar training rows votes for its class
    with weight ``exp(similarity / temperature)``; the class probability is the class's share of
    the votes. ``k`` larger than the training set uses every training row.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, batch_size: int = 1024):
        self.k = k
        self.temperature = temperature
        self.batch_size = batch_size

    def fit(self, X, y):
        X = np.asarray(X)
        return self.fit_blocks(len(X), X.shape[1], lambda lo, hi: X[lo:hi], y)

    def fit_blocks(self, n: int, n_features: int, rows: Callable[[int, int], np.ndarray], y):
        """``fit`` on the ``n`` training rows that ``rows(lo, hi)`` hands out a block at a time (rows
        ``lo:hi``, as they would reach ``fit``): only their L2-normalised float32 copy is kept, built
        block by block (no float32 copy, squares and quotient of every row at once: issue 20)."""
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        self.X_ = np.empty((n, n_features), np.float32)
        for lo in range(0, n, ROW_BLOCK):
            self.X_[lo : lo + ROW_BLOCK] = _l2(rows(lo, min(lo + ROW_BLOCK, n)))
        self.y_ = np.searchsorted(self.classes_, y).astype(np.int64)  # index into classes_
        self.n_features_in_ = int(n_features)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.predict_proba_path(X, [self.k])[self.k]

    def predict_proba_path(self, X, ks) -> dict[int, np.ndarray]:
        """``{k: predict_proba(X) with that k}`` for every ``k`` in ``ks``, from ONE neighbour search (the
        largest k's, sorted): the engine scores a whole ``clf__k`` grid at the cost of one prediction."""
        X = np.asarray(X)
        return knn_votes(
            lambda lo, hi: _l2(X[lo:hi]),
            len(X),
            X.shape[1],
            lambda lo, hi: self.X_[lo:hi],
            self.y_,
            len(self.classes_),
            ks,
            temperature=self.temperature,
            batch_size=self.batch_size,
        )

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def knn_votes(
    queries: Callable[[int, int], np.ndarray],
    n_queries: int,
    n_features: int,
    train: Callable[[int, int], np.ndarray],
    labels: np.ndarray,
    n_classes: int,
    ks,
    *,
    temperature: float,
    batch_size: int,
) -> dict[int, np.ndarray]:
    """:meth:`KNNHead.predict_proba_path`'s numbers, the rows handed out a block at a time.

    ``queries(lo, hi)`` and ``train(lo, hi)``: the L2-normalised float32 query / training rows
    ``lo:hi``; ``labels``: each training row's class index. The queries come a chunk of
    :data:`QUERY_CHUNK_BYTES` at a time; for each chunk every block of training rows is made once
    and compared with each batch of ``batch_size`` queries (at most :data:`TOPK_BLOCK` similarities
    at a time), each batch keeping its running ``k`` best: memory bounded whatever the number of
    rows, never a queries x training-rows matrix (400k training rows: issue 20), and the training
    rows need not be held normalised (``tprobe.probing.rowfit`` standardises them block by block).
    """
    ks = sorted({int(k) for k in ks})
    n_train = len(labels)
    k_max = int(min(ks[-1], n_train))
    out = {k: np.zeros((n_queries, n_classes), dtype=np.float64) for k in ks}
    if n_queries == 0:
        return out
    per_chunk = max(1, QUERY_CHUNK_BYTES // (4 * max(n_features, 1)) // batch_size) * batch_size
    # training rows per block: TOPK_BLOCK similarities for a full batch (a short batch takes the same
    # blocks: before, it took wider ones, a block of the whole training set for a batch of one query)
    width = max(k_max, TOPK_BLOCK // batch_size, 1)
    for c0 in range(0, n_queries, per_chunk):
        c1 = min(c0 + per_chunk, n_queries)
        Q = np.empty((c1 - c0, n_features), np.float32)
        for lo in range(c0, c1, ROW_BLOCK):  # made a block at a time: no temporaries of the whole chunk
            Q[lo - c0 : lo - c0 + ROW_BLOCK] = queries(lo, min(lo + ROW_BLOCK, c1))
        starts = range(0, c1 - c0, batch_size)
        sizes = [min(batch_size, c1 - c0 - s) for s in starts]
        best = [(np.empty((m, 0), np.float32), np.empty((m, 0), np.int64)) for m in sizes]
        for lo in range(0, n_train, width):
            block = train(lo, min(lo + width, n_train))
            for i, s in enumerate(starts):
                q = Q[s : s + batch_size]
                best[i] = _merge_top_k(q, block, labels[lo : lo + len(block)], *best[i], k_max)
            del block
        for i, s in enumerate(starts):
            sims, lab = best[i]
            order = np.argsort(-sims, axis=1, kind="stable")  # most similar first
            sims, lab = np.take_along_axis(sims, order, axis=1), np.take_along_axis(lab, order, axis=1)
            rows = slice(c0 + s, c0 + s + len(sims))
            for k in ks:
                kk = min(k, k_max)
                w = _softmax(sims[:, :kk].astype(np.float64) / temperature)  # exp(s/T) over kk neighbours
                for c in range(n_classes):
                    out[k][rows, c] = (w * (lab[:, :kk] == c)).sum(axis=1)
        del Q
    return out


def _merge_top_k(q, block, block_labels, best_s, best_y, k):
    """The ``k`` largest similarities of each query row ``q`` among its running best (``best_s``,
    their labels ``best_y``; empty at first) and this block of training rows."""
    sims = q @ block.T
    kk = min(k, sims.shape[1])
    # the kk largest, no negated copy; partitioned a slice of rows at a time (each row's selection is its
    # own), so the int64 positions of a whole slice, not of every similarity, are held at once
    top = np.empty((len(q), kk), np.intp)
    for r in range(0, len(q), TOPK_SLICE):
        top[r : r + TOPK_SLICE] = np.argpartition(sims[r : r + TOPK_SLICE], sims.shape[1] - kk, axis=1)[
            :, -kk:
        ]
    cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, axis=1)], axis=1)
    cand_y = np.concatenate([best_y, block_labels[top]], axis=1)
    del sims, top
    if cand_s.shape[1] > k:  # merge: keep the k best of the running best and this block's
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        cand_s, cand_y = np.take_along_axis(cand_s, keep, axis=1), np.take_along_axis(cand_y, keep, axis=1)
    return cand_s, cand_y


class PrototypeHead(ClassifierMixin, BaseEstimator):
    """Nearest class mean after centring and L2 normalisation (SimpleShot, Wang et al. 2019).

    ``fit`` centres the features on the training mean, L2-normalises them, and keeps each class's
    mean, L2-normalised, as its prototype. ``predict_proba`` is a softmax over the cosine
    similarities to the prototypes divided by ``temperature`` (default 0.1). The temperature only
    sets how confident the probabilities look: the ranking of cells, hence ROC AUC, average
    precision, and the predicted class are the same for every temperature.
    """

    def __init__(self, temperature: float = 0.1):
        self.temperature = temperature

    def fit(self, X, y):
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
        self.classes_ = np.unique(y)
        self.mean_ = X.mean(axis=0)
        Z = _l2(X - self.mean_)
        self.prototypes_ = _l2(np.stack([Z[y == c].mean(axis=0) for c in self.classes_]))
        self.n_features_in_ = int(X.shape[1])
        return self

    def predict_proba(self, X) -> np.ndarray:
        Z = _l2(np.asarray(X, dtype=np.float32) - self.mean_)
        return _softmax((Z @ self.prototypes_.T).astype(np.float64) / self.temperature)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def make_head(
    name: str,
    *,
    seed: int = 0,
    class_weight: str | None = "balanced",
    penalty: str = "l2",
    n_jobs: int = 1,
    scale: bool = True,
    **params,
) -> Pipeline:
    """A fresh unfitted head: standardise (a step fitted on the training rows only), then the classifier.

    ``scale=False`` (``--normalize none``) leaves out the standardisation: the classifier sees the
    features as given."""
    if name not in HEADS:
        raise TprobeError(f"head {name!r} is not one of {', '.join(HEADS)}")
    if penalty not in ("l1", "l2"):
        raise TprobeError(f"penalty {penalty!r} is not l1 or l2")
    steps = [("scale", StandardScaler())] if scale else []
    if name == "knn":
        clf = KNNHead()
    elif name == "prototype":
        clf = PrototypeHead()
    elif name == "logreg":
        clf = LogisticRegression(
            C=0.1,
            l1_ratio=1.0 if penalty == "l1" else 0.0,
            solver="liblinear" if penalty == "l1" else "lbfgs",
            class_weight=class_weight,
            max_iter=2000,
            random_state=seed,
        )
    elif name == "mlp":
        clf = MLPClassifier(
            hidden_layer_sizes=(256,),
            alpha=1e-3,
            early_stopping=True,
            validation_fraction=0.15,
            n_iter_no_change=10,
            max_iter=300,
            random_state=seed,
        )
    else:
        from xgboost import XGBClassifier

        # 32 histogram bins, not 256: ~6x faster on a few hundred training rows x 2048 features,
        # with sweep AUCs within 0.01 of 256 bins (docs/guide/benchmarks.md, "Probe sweep")
        clf = XGBClassifier(
            n_estimators=200,
            learning_rate=0.1,
            max_depth=3,
            tree_method="hist",
            max_bin=32,
            subsample=0.8,
            colsample_bytree=0.5,
            n_jobs=n_jobs,
            random_state=seed,
            eval_metric="logloss",
        )
    steps.append(("clf", clf))
    pipe = Pipeline(steps)
    pipe.set_params(**params)
    return pipe


def param_grid(name: str) -> list[dict]:
    """Every combination of the head's grid, as a list of ``set_params`` dicts."""
    grid = GRIDS[name]
    if not grid:
        return [{}]
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


_PROJECTIONS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (width, seed) -> widest alive


def projection(n_features: int, n_components: int, seed: int):
    """The fixed Gaussian random projection for wide inputs, determined by (width, components, seed) alone:
    a run records those three numbers and rebuilds it, never stores it.

    scikit-learn draws the matrix row by row as ``N(0, 1/components)``; so while a projection of the same
    width and seed with 4^k times the components is alive, its first rows times 2^k are this one's,
    exactly (a test compares them), and are taken instead of drawing again (~2 s for a concat input).
    """
    import copy

    from sklearn.random_projection import GaussianRandomProjection

    big = _PROJECTIONS.get((n_features, seed))
    if big is not None and big.n_components_ > n_components:
        ratio = big.n_components_ // n_components
        k = ratio.bit_length() // 2
        if big.n_components_ % n_components == 0 and 4**k == ratio:
            proj = copy.copy(big)
            proj.n_components = proj.n_components_ = n_components
            proj.components_ = big.components_[:n_components] * np.asarray(2**k, big.components_.dtype)
            return proj
    proj = GaussianRandomProjection(n_components, random_state=seed).fit(
        np.zeros((1, n_features), np.float32)
    )
    if big is None or n_components > big.n_components_:
        _PROJECTIONS[(n_features, seed)] = proj
    return proj


def projection_checksum(proj) -> str:
    """``"xxh3_128:<hex>"`` of a projection's matrix (dtype, shape and bytes): a run records it, and
    ``predict`` refuses a rebuilt matrix that differs (another scikit-learn drawing another stream)."""
    import xxhash

    a = np.ascontiguousarray(proj.components_)
    h = xxhash.xxh3_128(f"{a.dtype.str}:{a.shape}".encode())
    h.update(a.data)
    return "xxh3_128:" + h.hexdigest()


def save_head(model, path: str | Path) -> Path:
    """Save a fitted head as a skops file (data only)."""
    import skops.io as sio

    sio.dump(model, path)
    return Path(path)


def load_head_file(path: str | Path):
    """Load a head saved by :func:`save_head`, refusing any type outside skops' defaults and TRUSTED_TYPES."""
    import zipfile

    import skops.io as sio

    path = Path(path)
    try:
        data = _migrated(path.read_bytes())
        untrusted = sio.get_untrusted_types(data=data)
    except FileNotFoundError:
        raise TprobeError(f"{path}: not found; rerun `tprobe probe` without --no-final-head") from None
    except (zipfile.BadZipFile, ValueError, KeyError, OSError) as exc:
        raise TprobeError(
            f"{path}: not a tprobe head file ({type(exc).__name__}); it was not loaded"
        ) from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise TprobeError(
            f"{path}: names types tprobe does not trust ({', '.join(refused[:3])}); "
            "it was not loaded — retrain the probe yourself"
        )
    try:
        return sio.loads(data, trusted=untrusted)
    except Exception as exc:  # noqa: BLE001 - any failure to build the head is the file's fault
        raise TprobeError(
            f"{path}: cannot be loaded as a head ({type(exc).__name__}); retrain the probe"
        ) from None


def _migrated(data: bytes) -> bytes:
    """``data`` (a skops file's bytes) with :data:`LEGACY_MODULES` renamed in its schema; as is otherwise."""
    import io
    import json
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as src:
        schema = json.loads(src.read("schema.json"))
        if not _rename_modules(schema):
            return data
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                body = json.dumps(schema).encode() if info.filename == "schema.json" else src.read(info)
                dst.writestr(info, body)
    return out.getvalue()


def _rename_modules(node) -> bool:
    """Rename legacy ``__module__`` values in a skops schema in place; whether any was renamed."""
    renamed = False
    if isinstance(node, dict):
        module = node.get("__module__")
        if isinstance(module, str) and module in LEGACY_MODULES:
            node["__module__"] = LEGACY_MODULES[module]
            renamed = True
        for value in node.values():
            renamed = _rename_modules(value) or renamed
    elif isinstance(node, list):
        for value in node:
            renamed = _rename_modules(value) or renamed
    return renamed

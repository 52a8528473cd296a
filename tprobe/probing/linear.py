"""Logistic regression for large probes: the whole ``C`` grid as one batched torch model.

:class:`TorchLogisticRegression` fits scikit-learn's L2-penalised binary logistic regression - the
objective ``C * sum_i s_i log(1 + exp(-y_i z_i)) + 0.5 * ||w||^2`` with ``s_i`` the
``class_weight="balanced"`` weights - on standardised features (mean and scale of the training rows,
as ``StandardScaler``), with full-batch L-BFGS (``torch.optim.LBFGS``, strong Wolfe line search) on
whatever device is present. :meth:`~TorchLogisticRegression.fit_path` trains K such models, one per
``C``, at once (DINOv2's linear evaluation trains its heads in parallel the same way): one pass over
the rows per L-BFGS step serves every ``C``, so the grid costs about one fit. Each model's objective
is divided by ``C * sum(s)`` (scikit-learn's own scaling), which leaves its minimiser unchanged.

Memory: the rows are never copied on CPU. Standardisation is folded into the weights
(``((x - mean) / scale) . w + b = x . (w / scale) + (b - (mean / scale) . w)``), the training rows are
read as contiguous slices of ``X`` when they form few runs (rows sorted by donor: the case of a
leave-one-donor-out split), else every row is read with weight 0 outside the training rows; the only
temporaries are ``block_rows x K`` logits. Matrix products run in float32 (``X``'s own dtype), the
optimiser state in float64.

:meth:`~TorchLogisticRegression.to_sklearn` turns a fitted model into a plain scikit-learn pipeline
(``StandardScaler`` + ``LogisticRegression`` holding the learned numbers) that saves as data (skops).
"""

from __future__ import annotations

import copy
from numbers import Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from tprobe.errors import TprobeError

__all__ = [
    "TorchLogisticRegression",
    "make_logreg",
    "row_runs",
    "SOLVERS",
    "TORCH_MIN_ROWS",
    "resolve_solver",
]

SOLVERS = ("auto", "lbfgs", "torch")
# solver "auto" trains logreg with TorchLogisticRegression from this many training rows (original views) up:
# below it scikit-learn's lbfgs is fast already and stays the reference
TORCH_MIN_ROWS = 20_000
MAX_RUNS = 64  # training rows in at most this many contiguous runs are read as slices, else masked


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the contiguous runs of sorted row indices ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.r_[0, cut]
    stops = np.r_[cut, len(rows)]
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TprobeError(
            f"device {name!r} is not 'auto', 'cpu' or a torch device such as 'cuda:0'"
        ) from None


class TorchLogisticRegression(ClassifierMixin, BaseEstimator):
    """Binary L2 logistic regression equal to scikit-learn's ``LogisticRegression`` (lbfgs) after
    ``StandardScaler``, fitted with torch; :meth:`fit_path` fits a whole ``C`` grid at once.

    ``coef_`` (1, n_features) and ``intercept_`` (1,) apply to the features as given to ``fit``
    (the standardisation is folded in); ``mean_`` and ``scale_`` are the training rows' statistics,
    ``coef_std_`` the coefficients on the standardised features (scikit-learn's after its scaler).
    ``tol``: L-BFGS stops once no gradient entry of the scaled objective (every C's) exceeds it -
    scikit-learn's lbfgs criterion and default (1e-4) on the same scaling; the tests use 1e-8.
    """

    def __init__(
        self,
        C: float = 1.0,
        *,
        class_weight: str | None = "balanced",
        standardize: bool = True,
        tol: float = 1e-4,
        max_iter: int = 500,
        device: str = "auto",
        block_rows: int = 8192,
    ):
        self.C = C
        self.class_weight = class_weight
        self.standardize = standardize
        self.tol = tol
        self.max_iter = max_iter
        self.device = device
        self.block_rows = block_rows

    # -- parameters -----------------------------------------------------------------------------------
    def _check_params(self, Cs) -> list[float]:
        Cs = [Cs] if isinstance(Cs, Real) else list(Cs)
        if not Cs or any(not isinstance(c, Real) or not np.isfinite(c) or c <= 0 for c in Cs):
            raise TprobeError(f"C {Cs!r}: every C must be a positive finite number")
        if self.class_weight not in (None, "balanced"):
            raise TprobeError(f"class_weight {self.class_weight!r} is not None or 'balanced'")
        if not isinstance(self.tol, Real) or not self.tol > 0:
            raise TprobeError(f"tol {self.tol!r} must be a positive number")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise TprobeError(f"max_iter {self.max_iter!r} must be a positive integer")
        if not isinstance(self.block_rows, int) or self.block_rows < 1:
            raise TprobeError(f"block_rows {self.block_rows!r} must be a positive integer")
        _device(self.device)
        return [float(c) for c in Cs]

    # -- fitting --------------------------------------------------------------------------------------
    def fit(self, X, y, rows=None):
        """Fit one model (``self.C``) on ``X[rows]`` (every row when ``rows`` is None); returns self."""
        fitted = self.fit_path(X, y, [self.C], rows=rows)[0]
        self.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
        return self

    def fit_path(self, X, y, Cs, rows=None) -> list[TorchLogisticRegression]:
        """Fit one model per ``C`` in ``Cs`` at once on ``X[rows]``; return them, fitted, in order.

        ``rows`` (sorted row indices) selects the training rows without copying ``X``."""
        import torch

        Cs = self._check_params(Cs)
        X = np.asarray(X)
        if X.ndim != 2 or not np.issubdtype(X.dtype, np.floating):
            raise TprobeError(f"X must be a 2-D float array, got shape {X.shape} dtype {X.dtype}")
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float32)
        X = np.ascontiguousarray(X)
        n_all, d = X.shape
        y = np.asarray(y)
        if len(y) != n_all:
            raise TprobeError(f"X has {n_all} rows but y has {len(y)}")
        rows = np.arange(n_all) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= n_all):
            raise TprobeError("rows must be sorted, unique row indices of X")
        yr = y[rows]
        classes = np.unique(yr)
        if len(classes) != 2:
            raise TprobeError(
                f"logistic regression needs exactly 2 classes in the training rows, got {len(classes)}"
            )
        dev = _device(self.device)
        dtype = torch.float32 if X.dtype == np.float32 else torch.float64
        t = (yr == classes[1]).astype(np.float64)
        n = len(rows)
        if self.class_weight == "balanced":
            counts = np.array([n - t.sum(), t.sum()])
            cw = n / (2 * counts)
        else:
            cw = np.ones(2)
        s = np.where(t == 1, cw[1], cw[0])
        S = float(s.sum())

        # the training rows as (row block of X, targets, weights): slices of X when the rows form few
        # runs, else every row of X with weight 0 outside ``rows``
        runs = row_runs(rows)
        if len(runs) > MAX_RUNS:
            t_all, s_all = np.zeros(n_all), np.zeros(n_all)
            t_all[rows], s_all[rows] = t, s
            runs, t, s, offsets = [(0, n_all)], t_all, s_all, [0]
        else:
            offsets = np.r_[0, np.cumsum([b - a for a, b in runs])[:-1]].tolist()
        blocks = []
        for (a, b), off in zip(runs, offsets, strict=True):
            for lo in range(a, b, self.block_rows):
                hi = min(b, lo + self.block_rows)
                xb = torch.from_numpy(X[lo:hi]).to(dev)
                tb = torch.as_tensor(t[off + lo - a : off + hi - a], dtype=dtype, device=dev)
                sb = torch.as_tensor(s[off + lo - a : off + hi - a] / S, dtype=dtype, device=dev)
                blocks.append((xb, tb[:, None], sb[:, None]))

        # training-row statistics as StandardScaler (scale 1 for constant columns), from float64 sums over
        # small gathered chunks of the rows (a chunk of 2048 rows is the only copy)
        sum1 = np.zeros(d)
        for i in range(0, n, 2048):
            sum1 += X[rows[i : i + 2048]].sum(0, dtype=np.float64)
        mean_np = sum1 / n
        sum2, m32 = np.zeros(d), mean_np.astype(X.dtype)
        for i in range(0, n, 2048):
            dx = X[rows[i : i + 2048]]
            dx -= m32
            dx *= dx
            sum2 += dx.sum(0, dtype=np.float64)
            del dx
        scale_np = np.sqrt(sum2 / n)
        scale_np[scale_np < 10 * np.finfo(np.float64).eps] = 1.0
        if not self.standardize:
            mean_np, scale_np = np.zeros(d), np.ones(d)
        mean = torch.as_tensor(mean_np, dtype=torch.float64, device=dev)
        scale = torch.as_tensor(scale_np, dtype=torch.float64, device=dev)

        K = len(Cs)
        inv_c = torch.tensor([1.0 / c for c in Cs], dtype=torch.float64, device=dev)  # penalty: |w|^2/(2 C S)
        params = torch.zeros(K, d + 1, dtype=torch.float64, device=dev, requires_grad=True)
        mu_over = mean / scale

        def closure():
            w, b = params[:, :d], params[:, d]
            V = (w / scale).T.contiguous()  # (d, K): weights on the raw features
            c = b - w @ mu_over  # (K,)
            Vf, cf = V.to(dtype), c.to(dtype)
            loss = torch.zeros(K, dtype=torch.float64, device=dev)
            g_raw = torch.zeros(d, K, dtype=torch.float64, device=dev)
            r_sum = torch.zeros(K, dtype=torch.float64, device=dev)
            with torch.no_grad():
                for xb, tb, sb in blocks:
                    z = xb @ Vf + cf  # (rows, K)
                    # s * log(1 + exp(-y z)) for y in {-1, 1} = s * (softplus(z) - t z)
                    loss += (sb * (torch.nn.functional.softplus(z) - tb * z)).sum(0, dtype=torch.float64)
                    r = sb * (torch.sigmoid(z) - tb)
                    g_raw += (r.T @ xb).T.double()  # r.T @ X: ~3x faster than X.T @ r on CPU
                    r_sum += r.sum(0, dtype=torch.float64)
                gw = ((g_raw - mean[:, None] * r_sum[None, :]) / scale[:, None]).T + w.detach() * (
                    inv_c[:, None] / S
                )
                total = loss.sum() + 0.5 * (inv_c / S * (w.detach() ** 2).sum(1)).sum()
                params.grad = torch.cat([gw, r_sum[:, None]], dim=1)
            return float(total)

        opt = torch.optim.LBFGS(
            [params],
            lr=1.0,
            max_iter=self.max_iter,
            max_eval=int(self.max_iter * 1.25),
            tolerance_grad=self.tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        opt.step(closure)
        state = opt.state[opt._params[0]]
        n_iter = int(state.get("n_iter", 0))
        P = params.detach().cpu().numpy()
        out = []
        for k, C in enumerate(Cs):
            m = copy.copy(self)
            m.C = C
            w, b = P[k, :d], P[k, d]
            m.classes_ = classes
            m.n_features_in_ = int(d)
            m.mean_, m.scale_ = mean_np.copy(), scale_np.copy()
            m.var_ = (scale_np**2).copy()
            m.n_samples_seen_ = int(n)
            m.coef_std_ = w[None, :].copy()
            m.intercept_std_ = np.array([b])
            m.coef_ = (w / scale_np)[None, :]
            m.intercept_ = np.array([b - float(w @ (mean_np / scale_np))])
            m.n_iter_ = np.array([n_iter])
            out.append(m)
        return out

    # -- prediction -----------------------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise TprobeError("TorchLogisticRegression is not fitted; call fit first")

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64 if np.asarray(X).dtype == np.float64 else np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise TprobeError(f"X has {X.shape[-1]} features; the model was fitted on {self.n_features_in_}")
        return ((X - self.mean_.astype(X.dtype)) / self.scale_.astype(X.dtype)).astype(
            np.float64
        ) @ self.coef_std_[0] + self.intercept_std_[0]

    def predict_proba_rows(self, X, rows, chunk: int = 512) -> np.ndarray:
        """``predict_proba(X[rows])`` without copying more than ``chunk`` rows of ``X`` at a time.

        A chunk's temporaries (the gathered rows, standardised, then in float64) take ~16 bytes a value:
        3 MB a worker at 512 rows x 384 features (2048 rows held 12 MB). A row's bits depend on where the BLAS
        matrix-vector kernel meets it within its chunk (OpenBLAS sums a few rows at a time; chunks of 513 or of
        4 rows change last bits), so chunks keep to multiples of 512: 512 gives the bits 2048 gave (a test
        compares them)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), 2))
        for i in range(0, len(rows), chunk):
            out[i : i + chunk] = self.predict_proba(X[rows[i : i + chunk]])
        return out

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        p = 1.0 / (1.0 + np.exp(-z))
        return np.column_stack([1 - p, p])

    def predict(self, X) -> np.ndarray:
        return self.classes_[(self.decision_function(X) > 0).astype(int)]

    def to_sklearn(self):
        """A fitted scikit-learn ``Pipeline([("scale", StandardScaler), ("clf", LogisticRegression)])``
        holding this model's numbers (without the scaler when ``standardize=False``): the form saved
        as a head (data only, no tprobe type)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        self._check_fitted()
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = self.mean_.copy(), self.scale_.copy(), self.var_.copy()
        scaler.n_features_in_, scaler.n_samples_seen_ = self.n_features_in_, self.n_samples_seen_
        clf = LogisticRegression(
            C=self.C, class_weight=self.class_weight, solver="lbfgs", max_iter=self.max_iter
        )
        clf.classes_ = self.classes_.copy()
        clf.coef_ = self.coef_std_.copy()
        clf.intercept_ = self.intercept_std_.copy()
        clf.n_features_in_ = self.n_features_in_
        clf.n_iter_ = self.n_iter_.copy()
        return Pipeline([("scale", scaler), ("clf", clf)] if self.standardize else [("clf", clf)])


def resolve_solver(solver: str, head: str, penalty: str, n_rows: int) -> str | None:
    """The logreg solver a probe uses: ``"lbfgs"`` (scikit-learn) or ``"torch"``; None for other heads.

    ``"auto"`` picks torch for an L2 logreg trained on at least :data:`TORCH_MIN_ROWS` rows."""
    if solver not in SOLVERS:
        raise TprobeError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if head != "logreg":
        return None
    if solver == "torch" and penalty != "l2":
        raise TprobeError(
            f"solver 'torch' fits L2 logistic regression only; penalty {penalty!r} needs --solver lbfgs"
        )
    if solver == "auto":
        return "torch" if penalty == "l2" and n_rows >= TORCH_MIN_ROWS else "lbfgs"
    return solver


def make_logreg(
    *, seed: int = 0, class_weight: str | None = "balanced", penalty: str = "l2", scale: bool = True, **params
):
    """The torch logreg head as tprobe's engines use it: a one-step pipeline (the model standardises
    the training rows itself unless ``scale=False``), ``clf__C`` tunable like ``heads.make_head("logreg")``'s."""
    from sklearn.pipeline import Pipeline

    if penalty != "l2":
        raise TprobeError(f"solver 'torch' fits L2 logistic regression only, not penalty {penalty!r}")
    pipe = Pipeline([("clf", TorchLogisticRegression(C=0.1, class_weight=class_weight, standardize=scale))])
    return pipe.set_params(**params)

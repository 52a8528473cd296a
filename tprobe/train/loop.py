"""A small, generic torch trainer for end-to-end models (fine-tuned DINOv2, LeNet), one fold at a time.

Each model maps ``(B, H, W)`` grey images in [0, 1] to one activation logit per image and offers
``param_groups(lr_head, lr_backbone)``. Training: BCE with logits (optional positive-class weight),
AdamW, linear warm-up then cosine decay, gradient clipping, random dihedral views on the fly,
early stopping on a validation donor taken from the training donors, best-epoch weights restored.
A checkpoint after every epoch lets an interrupted fold resume.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

from tprobe.data.preprocess import PreprocessConfig, load_view
from tprobe.errors import TprobeError
from tprobe.features.sources import CLASS_NAMES
from tprobe.train import PRECISIONS

__all__ = [
    "TrainConfig",
    "pos_weight_value",
    "ImageRows",
    "train_fold",
    "run_folds",
    "predict_rows",
    "pick_validation_donor",
]


@dataclass
class TrainConfig:
    """The training of an end-to-end model (:class:`~tprobe.train.finetune.FinetuneRun`, LeNet):
    AdamW with warm-up then cosine decay, early stopping after ``patience`` epochs without a better
    validation AUC. ``pos_weight``: "auto" (negatives/positives), None or a number; ``precision``:
    one of ``tprobe.train.PRECISIONS``."""

    epochs: int = 10
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_backbone: float = 1e-5
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3
    pos_weight: str | float | None = "auto"  # auto = n_negative / n_positive of the training rows
    seed: int = 0
    precision: str = "auto"  # auto = fp16 autocast on GPU, fp32 on CPU

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise TprobeError("--epochs and --batch-size must be >= 1")
        if self.precision not in PRECISIONS:
            raise TprobeError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        self.pos_weight = pos_weight_value(self.pos_weight)

    def to_dict(self) -> dict:
        return asdict(self)


def pos_weight_value(value: str | float | None) -> str | float | None:
    """The BCE positive-class weight from ``auto``, ``none`` (or None) or a number (also as text)."""
    if value is None or value == "none":
        return None
    if value == "auto":
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TprobeError(f"--pos-weight {value!r}: use auto, none or a number") from None


class ImageRows(Dataset):
    """Manifest rows as (image, label); ``augment`` draws a random view of each cell per visit."""

    def __init__(self, rows: pd.DataFrame, prep: PreprocessConfig, *, augment: bool = False, seed: int = 0):
        self.paths, self.labels = rows["path"].tolist(), rows["label"].to_numpy(np.float32)
        self.views = rows["view"].tolist()
        self.prep, self.augment = prep, augment
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        view = self.rng.choice(self.prep.view_names) if self.augment else self.views[i]
        return torch.from_numpy(load_view(self.paths[i], view, self.prep)), self.labels[i]


def pick_validation_donor(rows: pd.DataFrame, fold_index: int) -> str:
    """A training donor with both classes, rotating with the fold so each fold differs."""
    both = sorted(d for d, g in rows.groupby("donor") if g["label"].nunique() == 2)
    if not both:
        raise TprobeError("no training donor has both classes; early stopping needs one")
    val = both[fold_index % len(both)]
    rest = rows[rows["donor"] != val]
    if (
        len(rest) and rest["label"].nunique() < 2
    ):  # the network would learn from one class (and its AUC be reported)
        kind = CLASS_NAMES.get(rest["label"].iloc[0], rest["label"].iloc[0])
        raise TprobeError(
            f"fold {fold_index}: with {val} held out for early stopping, the other training donors "
            f"({', '.join(sorted(map(str, set(rest['donor']))))}) hold only {kind} cells: add donors with both classes"
        )
    return val


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return (
        lambda: torch.autocast(device.type, dtype=dtype)
    ) if dtype else nullcontext, dtype is torch.float16


@torch.no_grad()
def predict_rows(
    model: torch.nn.Module, rows: pd.DataFrame, prep, device, *, batch_size=64, precision="auto"
):
    """Activation probabilities for manifest ``rows`` (their own views, no augmentation)."""
    model.eval()
    ctx, _ = _autocast(device, precision)
    out = []
    for x, _ in DataLoader(ImageRows(rows, prep), batch_size=batch_size):
        with ctx():
            out.append(torch.sigmoid(model(x.to(device)).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _load_checkpoint(path: Path, device) -> dict:
    """A training checkpoint, loaded with ``weights_only=True`` (tensors, numbers, containers: no code)."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the safe unpickler refuses anything else
        raise TprobeError(
            f"{path}: not a checkpoint tprobe can load safely ({type(exc).__name__}); delete it to "
            "restart this fold"
        ) from None
    if not isinstance(ck, dict) or not {"model", "opt", "sched", "state"} <= set(ck):
        raise TprobeError(f"{path}: not a tprobe checkpoint; delete it to restart this fold")
    return ck


def train_fold(
    make_model: Callable[[], torch.nn.Module],
    train: pd.DataFrame,
    val: pd.DataFrame,
    prep: PreprocessConfig,
    cfg: TrainConfig,
    device: torch.device,
    *,
    checkpoint: Path | None = None,
    log: Callable[[dict], None] = print,
):
    """Train one fold; returns (model with best-epoch weights, curves DataFrame)."""
    torch.manual_seed(cfg.seed)
    model = make_model().to(device)
    y = train["label"].to_numpy()
    pw = cfg.pos_weight
    if pw == "auto":
        pw = float((y == 0).sum() / max(1, (y == 1).sum()))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw, device=device) if pw else None)
    opt = torch.optim.AdamW(model.param_groups(cfg.lr_head, cfg.lr_backbone), weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warm = max(1, int(cfg.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        ),
    )
    ctx, use_scaler = _autocast(device, cfg.precision)
    scaler = torch.amp.GradScaler(enabled=use_scaler)
    state = {"epoch": 0, "best": -math.inf, "best_state": None, "bad": 0, "curves": []}
    if checkpoint is not None and checkpoint.exists():
        ck = _load_checkpoint(checkpoint, device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        state = ck["state"]
        if ck.get("scaler") and scaler.is_enabled():  # older checkpoints, and fp32 runs' (empty), have none
            scaler.load_state_dict(ck["scaler"])
    data = ImageRows(train, prep, augment=True, seed=cfg.seed)
    while state["epoch"] < cfg.epochs and state["bad"] < cfg.patience:
        model.train()
        # each epoch's random views (and dropout) are drawn from its own seed, so a fold resumed from a
        # checkpoint trains exactly as it would have without the interruption
        data.rng = np.random.default_rng(cfg.seed + state["epoch"])
        torch.manual_seed(cfg.seed + state["epoch"])
        t0, total, n = time.perf_counter(), 0.0, 0
        gen = torch.Generator().manual_seed(cfg.seed + state["epoch"])
        for x, t in DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=gen):
            x, t = x.to(device, non_blocking=True), t.to(device)
            with ctx():
                loss = loss_fn(model(x).float(), t)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total, n = total + loss.item() * len(x), n + len(x)
        seconds = time.perf_counter() - t0
        p = predict_rows(model, val, prep, device, precision=cfg.precision)
        yv = val["label"].to_numpy()
        val_loss = float(
            torch.nn.functional.binary_cross_entropy(
                torch.tensor(p).clamp(1e-6, 1 - 1e-6), torch.tensor(yv, dtype=torch.float32)
            )
        )
        val_auc = float(roc_auc_score(yv, p)) if len(set(yv)) == 2 else float("nan")
        state["epoch"] += 1
        row = {
            "epoch": state["epoch"],
            "train_loss": total / max(1, n),
            "val_loss": val_loss,
            "val_auc": val_auc,
            "images_per_s": n / seconds if seconds else float("nan"),
        }
        if device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        else:
            import resource

            row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
        state["curves"].append(row)
        log(row)
        score = val_auc if not math.isnan(val_auc) else -val_loss
        if score > state["best"]:
            state["best"], state["bad"] = score, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad"] += 1
        if checkpoint is not None:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "state": state,
                },
                tmp,
            )
            tmp.replace(checkpoint)
    if state["best_state"] is not None:
        model.load_state_dict(copy.deepcopy(state["best_state"]))
    return model, pd.DataFrame(state["curves"])


def run_folds(
    make_model,
    rows: pd.DataFrame,
    plan,
    prep: PreprocessConfig,
    cfg: TrainConfig,
    device,
    run: Path,
    *,
    log=print,
    save_state=None,
    checkpoints: bool = True,
):
    """Train and score every fold of ``plan`` (checkpointed in ``run/checkpoints`` unless ``checkpoints``
    is False: for runs that are never resumed).

    Returns (out-of-fold predictions in the probe schema, learning curves).
    ``save_state(model) -> dict`` chooses what is saved as ``run/fold<i>.pt`` (None: nothing).
    """
    if checkpoints:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    preds, curves = [], []
    # every fold's validation donor first: a fold that cannot train on both classes stops the run before
    # any fold has spent its training time
    val_donors = [pick_validation_donor(rows.iloc[fold.train], fold.index) for fold in plan]
    for fold, val_donor in zip(plan, val_donors, strict=True):
        train_rows = rows.iloc[fold.train]
        is_val = train_rows["donor"] == val_donor
        log({"fold": fold.index, "test": ",".join(fold.test_donors), "validation": val_donor})
        try:
            model, curve = train_fold(
                make_model,
                train_rows[~is_val],
                train_rows[is_val],
                prep,
                cfg,
                device,
                checkpoint=run / "checkpoints" / f"fold{fold.index}.pt" if checkpoints else None,
                log=log,
            )
        except torch.cuda.OutOfMemoryError:
            raise TprobeError(
                f"out of GPU memory at --batch-size {cfg.batch_size}; rerun with a smaller "
                "--batch-size and --resume (finished epochs are kept)"
            ) from None
        test_rows = rows.iloc[fold.test]
        p = predict_rows(model, test_rows, prep, device, precision=cfg.precision)
        preds.append(
            test_rows[["image_id", "donor", "group", "label"]].assign(p_activated=p, fold=fold.index)
        )
        curves.append(
            curve.assign(fold=fold.index, validation_donor=val_donor, test_donor=",".join(fold.test_donors))
        )
        if save_state is not None:
            torch.save(save_state(model), run / f"fold{fold.index}.pt")
    return pd.concat(preds, ignore_index=True), pd.concat(curves, ignore_index=True)

"""Wang et al.'s baselines on the same donor splits and run-directory schema as ``probe``.

- ``frequency``: every test cell gets its training donors' activated fraction;
- ``pixel-logreg``: L1 logistic regression on raw pixels (C chosen by the inner donor CV);
- ``pixel-mlp``: a one-hidden-layer network on raw pixels;
- ``lenet``: two conv + pool blocks and two dense layers, trained end to end in torch;
- ``inception-frozen``: ImageNet Inception v3's pooled 2048-d features of each cell + L2 logistic
  regression (C chosen by the inner donor CV), as ``pixel-logreg``;
- ``inception-finetuned``: Inception v3 + a linear layer, trained end to end like ``lenet``.

The Inception baselines (:mod:`tprobe.models.inception`) take the preprocessing canvas upsampled to
``inception_size`` (default 299 px) and the weights ``inception_weights`` names (default
``timm/inception_v3.tv_in1k`` from the Hugging Face hub; ``random`` = a plumbing check). ``all``
runs the four others: name the Inception ones explicitly (they download ImageNet weights, and
fine-tuning at 299 px wants a GPU).

Pixel inputs are each cell zero-padded, centred, on a ``PIXEL_CANVAS`` (64 px) square; larger
cells are shrunk to fit. The cells here are ~20 px, so 64 px keeps every pixel of almost every cell
while keeping the inputs at 4096 values.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from tprobe.data.preprocess import PIXEL_CANVAS, Preprocessed, load_view
from tprobe.errors import TprobeError
from tprobe.features.pixels import pixel_features, pixel_prep
from tprobe.features.sources import META, FeatureSet, FeatureSource
from tprobe.models.inception import HUB_ID, INPUT_SIZE, InceptionWeights
from tprobe.probing.evaluate import (
    Evaluation,
    check_plan,
    check_train_donors,
    evaluate,
    frequency_predictions,
    split_plan,
)
from tprobe.probing.run import ProbeRun
from tprobe.runs.record import RunRecord, make_run_dir, save_run
from tprobe.train import ALL, BASELINES, INCEPTION, baseline_names

__all__ = [
    "BASELINES",
    "ALL",
    "RUNNERS",
    "BaselineRun",
    "baseline_names",
    "PIXEL_CANVAS",
    "LeNet",
    "pixel_features",  # re-exported: tprobe.features.pixels
    "inception_feature_set",
    "run_baseline",
]

logger = logging.getLogger(__name__)


def inception_feature_set(
    pre: Preprocessed,
    weights,
    *,
    size: int = INPUT_SIZE,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
) -> FeatureSet:
    """Inception v3's pooled 2048-d features of each kept cell's original view (``weights``: an
    :class:`~tprobe.models.inception.InceptionWeights`), computed in batches without gradients."""
    from tprobe.models.backbones import pick_device
    from tprobe.models.inception import inception_features, load_inception

    rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
    net, dev = load_inception(weights, seed=seed), pick_device(device)
    paths = rows["path"].tolist()
    X = np.concatenate(
        [np.zeros((0, 2048), np.float32)]
        + [
            inception_features(
                net,
                np.stack([load_view(p, "orig", pre.config) for p in paths[i : i + batch_size]]),
                size=size,
                batch_size=batch_size,
                device=dev,
            )
            for i in range(0, len(paths), batch_size)
        ]
    )
    source = FeatureSource(
        kind="baseline",
        name="inception-frozen",
        model=weights.name,
        model_source=weights.source,
        resolved_revision=weights.resolved,
        random_init=weights.random_init,
        canvas=size,
        preprocess=pre.config.to_dict(),
        preprocess_hash=pre.config.hash,
        dataset_fingerprint=pre.fingerprint,
    )
    return FeatureSet(X, rows[META], source)


class LeNet(nn.Module):
    """LeNet-5 style: conv(6,5)-pool-conv(16,5)-pool-fc120-fc84-fc1 on 64 px images of ``in_channels`` channels."""

    def __init__(self, side: int = PIXEL_CANVAS, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        n = ((side - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * n * n, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.ndim == 4 else x.unsqueeze(1)  # (B, H, W) grey or (B, C, H, W)
        return self.classifier(self.features(x)).squeeze(1)

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": lr_head}]


def progress_logger(name: str):
    """The default ``log`` of :func:`run_baseline`: each training row (a fold's start, an epoch's
    losses) as one INFO line of this module's logger (the CLI shows them on stderr), with the time since
    the baseline started."""
    t0 = time.perf_counter()

    def log(row: dict) -> None:
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        logger.info("baseline %s: %s (%.0f s)", name, text, time.perf_counter() - t0)

    return log


class BaselineRun(NamedTuple):
    """One finished baseline: its run folder and its evaluation (unpacks as ``run, ev``)."""

    path: Path
    evaluation: Evaluation

    @property
    def record(self) -> RunRecord:
        """The run's record (config.json)."""
        return RunRecord.load(self.path)

    @property
    def name(self) -> str:
        return self.record.options["baseline"]

    @property
    def random_weights(self) -> bool:
        """Whether an Inception baseline ran on random weights (a plumbing check, not a result)."""
        return self.record.random_weights


@dataclass
class _Job:
    """One baseline's settings, shared by the runners of :data:`RUNNERS`."""

    name: str
    out: Path
    split: str
    test_donor: str | None
    seed: int
    n_boot: int
    epochs: int
    device: str
    weights: InceptionWeights | None  # the Inception baselines' weights
    size: int
    data: str | None
    log: Callable[[dict], None]

    def options(self) -> dict:
        common = {
            "baseline": self.name,
            "split": self.split,
            "test_donor": self.test_donor,
            "seed": self.seed,
        }
        if self.weights is not None:
            common |= {"inception_size": self.size, "inception_weights": self.weights.name}
        return common

    def probe(self, fs: FeatureSet, head: str, penalty: str) -> BaselineRun:
        """Fit a probe head on ``fs`` (inner donor CV, no final head) and save it as this baseline."""

        def on_fold(fp) -> None:  # one line per outer fold
            self.log({"step": f"{fp.step}/{fp.n_steps}", "what": str(fp)})

        probe = ProbeRun(
            head=head,
            penalty=penalty,
            split=self.split,
            test_donor=self.test_donor,
            seed=self.seed,
            n_boot=self.n_boot,
            max_dims=None,
            final_head=False,
            data=self.data,
        ).fit(fs, progress=on_fold)
        run = probe.save(self.out, f"baseline-{self.name}", command="baseline", extra_options=self.options())
        return BaselineRun(run, probe.evaluation_)

    def split_rows(self, pre: Preprocessed):
        """The original views and their checked outer folds."""
        rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
        plan = split_plan(rows, self.split, test_donor=self.test_donor)
        check_plan(plan, rows)
        return rows, plan

    def record(self, pre: Preprocessed, run: Path) -> RunRecord:
        features = FeatureSource(
            kind="baseline",
            name=self.name,
            preprocess=pre.config.to_dict(),
            preprocess_hash=pre.config.hash,
            dataset_fingerprint=pre.fingerprint,
        )
        w = self.weights
        if w is not None:  # the model's identity; random weights mark the run as a plumbing check
            features = dataclasses.replace(
                features,
                model=w.name,
                model_source=w.source,
                resolved_revision=w.resolved,
                random_init=w.random_init,
            )
        return RunRecord(
            command="baseline", name=run.name, features=features, options=self.options(), data=self.data
        )

    def train(self, pre: Preprocessed, make, prep, cfg, canvas: int, *, checkpoints: bool) -> BaselineRun:
        """Train ``make()`` on every fold with the fine-tuning loop (``cfg(device)``: its TrainConfig;
        ``prep``: the images' preprocessing; ``canvas``: the input side recorded); save the run with
        its curves. Per-epoch ``checkpoints`` only where they are small (baseline runs never resume)."""
        from tprobe.models.backbones import pick_device
        from tprobe.plot.figures import learning_curves
        from tprobe.train.loop import run_folds

        rows, plan = self.split_rows(pre)
        check_train_donors(plan, rows, what=self.name, split=self.split)
        run = make_run_dir(self.out, f"baseline-{self.name}")
        record = self.record(pre, run)
        dev = pick_device(self.device)
        config = cfg(dev)
        preds, curves = run_folds(
            make, rows, plan, prep, config, dev, run, log=self.log, checkpoints=checkpoints
        )
        ev = evaluate(preds, rows, plan, n_boot=self.n_boot, seed=self.seed)
        record.options["train"] = config.to_dict()
        record.features.canvas = canvas
        save_run(run, record=record, evaluation=ev, plan=plan, meta=rows)
        curves.to_csv(run / "curves.csv", index=False)
        learning_curves(curves, run / "curves.png", title=record.title)
        return BaselineRun(run, ev)


def _frequency(job: _Job, pre: Preprocessed) -> BaselineRun:
    """Every test cell gets its training donors' activated fraction."""
    rows, plan = job.split_rows(pre)
    run = make_run_dir(job.out, f"baseline-{job.name}")
    ev = evaluate(frequency_predictions(rows, plan), rows, plan, n_boot=job.n_boot, seed=job.seed)
    save_run(run, record=job.record(pre, run), evaluation=ev, plan=plan, meta=rows)
    return BaselineRun(run, ev)


def _pixel_probe(head: str, penalty: str):
    """A probe ``head`` on the raw pixels of each cell (pixel-logreg: L1 logreg; pixel-mlp: one hidden layer)."""

    def run(job: _Job, pre: Preprocessed) -> BaselineRun:
        fs = pixel_features(pre)
        job.log(
            {"features": f"{fs.X.shape[0]} cells x {fs.X.shape[1]} pixels", "head": f"{head} ({penalty})"}
        )
        return job.probe(fs, head, penalty)

    return run


def _inception_frozen(job: _Job, pre: Preprocessed) -> BaselineRun:
    """Inception v3's pooled 2048-d features + L2 logistic regression."""
    job.log({"features": f"Inception v3 on {int((pre.kept['view'] == 'orig').sum())} cells"})
    fs = inception_feature_set(pre, job.weights, size=job.size, seed=job.seed, device=job.device)
    return job.probe(fs, "logreg", "l2")


def _lenet(job: _Job, pre: Preprocessed) -> BaselineRun:
    """LeNet trained end to end on the 64 px pixel canvas (checkpointed per epoch: it is small)."""
    from tprobe.train.loop import TrainConfig

    in_channels = max(1, len(pre.config.used_channels))  # 1 grey, 3 rgb, C per-channel

    def cfg(dev):
        return TrainConfig(
            epochs=job.epochs, batch_size=32, lr_head=1e-3, weight_decay=1e-4, patience=5, seed=job.seed
        )

    return job.train(
        pre, lambda: LeNet(in_channels=in_channels), pixel_prep(pre), cfg, PIXEL_CANVAS, checkpoints=True
    )


def _inception_finetuned(job: _Job, pre: Preprocessed) -> BaselineRun:
    """Inception v3 + a linear layer trained end to end (no per-epoch checkpoints: ~0.4 GB each)."""
    from tprobe.models.inception import InceptionClassifier, load_inception
    from tprobe.train.loop import TrainConfig

    def cfg(dev):  # bf16 on GPUs: fp16 overflows on a random-init network's eval-mode activations
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        return TrainConfig(
            epochs=job.epochs,
            batch_size=32,
            lr_head=1e-3,
            lr_backbone=1e-4,
            weight_decay=1e-4,
            patience=5,
            seed=job.seed,
            precision=precision,
        )

    def make():
        return InceptionClassifier(load_inception(job.weights, seed=job.seed), size=job.size)

    return job.train(pre, make, pre.config, cfg, job.size, checkpoints=False)


# name -> runner(job, pre): each baseline in one short function
RUNNERS: dict[str, Callable[[_Job, Preprocessed], BaselineRun]] = {
    "frequency": _frequency,
    "pixel-logreg": _pixel_probe("logreg", "l1"),
    "pixel-mlp": _pixel_probe("mlp", "l2"),
    "lenet": _lenet,
    "inception-frozen": _inception_frozen,
    "inception-finetuned": _inception_finetuned,
}


def run_baseline(
    name: str,
    pre: Preprocessed,
    out: str | Path,
    *,
    split: str = "leave-one-donor-out",
    test_donor: str | None = None,
    seed: int = 0,
    n_boot: int = 2000,
    epochs: int = 30,
    device: str = "auto",
    inception_weights=HUB_ID,
    inception_size: int = INPUT_SIZE,
    log=None,
    data: str | None = None,
) -> BaselineRun:
    """Run one baseline into a new run folder under ``out``; returns a :class:`BaselineRun` (run, evaluation).

    ``inception_weights``: a hub id, a folder holding ``model.safetensors``, ``random``, or an
    already resolved :class:`~tprobe.models.inception.InceptionWeights`. ``log(row: dict)`` gets the progress
    (each fold's start, each epoch; each outer fold of the probe-based ones) [default:
    :func:`progress_logger`, INFO lines of this module's logger].
    """
    if name not in BASELINES:
        raise TprobeError(f"baseline {name!r} is not one of {', '.join(BASELINES)}, all")
    weights = None
    if name in INCEPTION:
        from tprobe.models.inception import check_size, resolve_weights

        pre.config.require_one_image("the Inception baselines")
        inception_size = check_size(inception_size)
        weights = (
            resolve_weights(inception_weights) if isinstance(inception_weights, str) else inception_weights
        )
    job = _Job(
        name=name,
        out=Path(out),
        split=split,
        test_donor=test_donor,
        seed=seed,
        n_boot=n_boot,
        epochs=epochs,
        device=device,
        weights=weights,
        size=inception_size,
        data=data,
        log=log or progress_logger(name),
    )
    return RUNNERS[name](job, pre)

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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tprobe.data.preprocess import PIXEL_CANVAS, Preprocessed, load_view
from tprobe.errors import TprobeError
from tprobe.features.pixels import pixel_features, pixel_prep
from tprobe.features.sources import META, FeatureSet, FeatureSource
from tprobe.models.inception import HUB_ID, INPUT_SIZE
from tprobe.probing.evaluate import check_plan, evaluate, frequency_predictions, split_plan
from tprobe.probing.run import ProbeRun
from tprobe.runs.record import RunRecord, make_run_dir, save_run

__all__ = [
    "BASELINES",
    "ALL",
    "PIXEL_CANVAS",
    "LeNet",
    "pixel_features",  # re-exported: tprobe.features.pixels
    "inception_feature_set",
    "run_baseline",
]

logger = logging.getLogger(__name__)

BASELINES = ("frequency", "pixel-logreg", "pixel-mlp", "lenet", "inception-frozen", "inception-finetuned")
ALL = BASELINES[:4]  # what ``--name all`` runs
INCEPTION = ("inception-frozen", "inception-finetuned")


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
):
    """Run one baseline; returns (run directory, Evaluation).

    ``inception_weights``: a hub id, a folder holding ``model.safetensors``, ``random``, or an
    already resolved :class:`~tprobe.models.inception.InceptionWeights`. ``log(row: dict)`` gets the progress
    (each fold's start, each epoch; each outer fold of the probe-based ones) [default:
    :func:`progress_logger`, INFO lines of this module's logger].
    """
    log = log or progress_logger(name)

    def on_fold(fp) -> None:  # the probe-based baselines: one line per outer fold
        log({"step": f"{fp.step}/{fp.n_steps}", "what": str(fp)})

    if name not in BASELINES:
        raise TprobeError(f"baseline {name!r} is not one of {', '.join(BASELINES)}, all")
    if name in INCEPTION:
        pre.config.require_one_image("the Inception baselines")
    common = {"baseline": name, "split": split, "test_donor": test_donor, "seed": seed}
    weights = None
    if name in INCEPTION:
        from tprobe.models.inception import check_size, resolve_weights

        common["inception_size"] = check_size(inception_size)
        weights = (
            resolve_weights(inception_weights) if isinstance(inception_weights, str) else inception_weights
        )
        common["inception_weights"] = weights.name
    if name == "inception-frozen":
        log({"features": f"Inception v3 on {int((pre.kept['view'] == 'orig').sum())} cells"})
        fs = inception_feature_set(pre, weights, size=inception_size, seed=seed, device=device)
        probe = ProbeRun(
            head="logreg",
            penalty="l2",
            split=split,
            test_donor=test_donor,
            seed=seed,
            n_boot=n_boot,
            max_dims=None,
            final_head=False,
            data=data,
        ).fit(fs, progress=on_fold)
        run = probe.save(out, f"baseline-{name}", command="baseline", extra_options=common)
        return run, probe.evaluation_
    if name in ("pixel-logreg", "pixel-mlp"):
        fs = pixel_features(pre)
        head, penalty = ("logreg", "l1") if name == "pixel-logreg" else ("mlp", "l2")
        log({"features": f"{fs.X.shape[0]} cells x {fs.X.shape[1]} pixels", "head": f"{head} ({penalty})"})
        probe = ProbeRun(
            head=head,
            penalty=penalty,
            split=split,
            test_donor=test_donor,
            seed=seed,
            n_boot=n_boot,
            max_dims=None,
            final_head=False,
            data=data,
        ).fit(fs, progress=on_fold)
        run = probe.save(out, f"baseline-{name}", command="baseline", extra_options=common)
        return run, probe.evaluation_
    rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
    plan = split_plan(rows, split, test_donor=test_donor)
    check_plan(plan, rows)
    if name == "inception-finetuned":
        _check_train_donors(rows, plan, split)
    run = make_run_dir(out, f"baseline-{name}")
    features = FeatureSource(
        kind="baseline",
        name=name,
        preprocess=pre.config.to_dict(),
        preprocess_hash=pre.config.hash,
        dataset_fingerprint=pre.fingerprint,
    )
    if weights is not None:  # the model's identity; random weights mark the run as a plumbing check
        features = dataclasses.replace(
            features,
            model=weights.name,
            model_source=weights.source,
            resolved_revision=weights.resolved,
            random_init=weights.random_init,
        )
    record = RunRecord(command="baseline", name=run.name, features=features, options=common, data=data)
    if name == "frequency":
        ev = evaluate(frequency_predictions(rows, plan), rows, plan, n_boot=n_boot, seed=seed)
        save_run(run, record=record, evaluation=ev, plan=plan, meta=rows)
        return run, ev
    from tprobe.models.backbones import pick_device
    from tprobe.plot.figures import learning_curves
    from tprobe.train.loop import TrainConfig, run_folds

    dev = pick_device(device)
    if name == "lenet":
        cfg = TrainConfig(
            epochs=epochs, batch_size=32, lr_head=1e-3, weight_decay=1e-4, patience=5, seed=seed
        )
        in_channels = max(1, len(pre.config.used_channels))  # 1 grey, 3 rgb, C per-channel

        def make():
            return LeNet(in_channels=in_channels)

        prep, canvas = pixel_prep(pre), PIXEL_CANVAS
    else:
        from tprobe.models.inception import InceptionClassifier, load_inception

        # bf16 on GPUs: fp16 overflows on a random-init network's eval-mode activations
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=32,
            lr_head=1e-3,
            lr_backbone=1e-4,
            weight_decay=1e-4,
            patience=5,
            seed=seed,
            precision=precision,
        )
        prep, canvas = pre.config, inception_size

        def make():
            return InceptionClassifier(load_inception(weights, seed=seed), size=inception_size)

    # baseline runs are never resumed (each gets a new folder): no per-epoch checkpoints (~0.4 GB for Inception)
    preds, curves = run_folds(make, rows, plan, prep, cfg, dev, run, log=log, checkpoints=name == "lenet")
    ev = evaluate(preds, rows, plan, n_boot=n_boot, seed=seed)
    record.options["train"] = cfg.to_dict()
    record.features.canvas = canvas
    save_run(run, record=record, evaluation=ev, plan=plan, meta=rows)
    curves.to_csv(run / "curves.csv", index=False)
    learning_curves(curves, run / "curves.png", title=record.title)
    return run, ev


def _check_train_donors(rows, plan, split: str) -> None:
    """Each fold needs a validation donor (early stopping) and at least one other donor to train on."""
    for fold in plan:
        train = sorted(set(rows["donor"].iloc[fold.train]))
        if len(train) < 2:
            raise TprobeError(
                f"inception-finetuned needs at least 2 training donors per fold (one for early "
                f"stopping, one or more to train on); with split {split!r} fold {fold.index} has "
                f"{len(train)} — add donors"
            )

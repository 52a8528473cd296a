"""Wang et al.'s baselines on the same donor splits and run-directory schema as ``probe``.

- ``frequency``: every test cell gets its training donors' activated fraction;
- ``pixel-logreg``: L1 logistic regression on raw pixels (C chosen by the inner donor CV);
- ``pixel-mlp``: a one-hidden-layer network on raw pixels;
- ``lenet``: two conv + pool blocks and two dense layers, trained end to end in torch.

Pixel inputs are each cell zero-padded, centred, on a ``PIXEL_CANVAS`` (64 px) square; larger
cells are shrunk to fit. The cells here are ~20 px, so 64 px keeps every pixel of almost every cell
while keeping the inputs at 4096 values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tprobe.errors import TprobeError
from tprobe.evaluate import check_plan, evaluate, frequency_predictions, split_plan
from tprobe.features import META, FeatureSet, FeatureSource
from tprobe.preprocess import Preprocessed, load_view
from tprobe.probe import ProbeRun
from tprobe.runs import RunRecord, make_run_dir, save_run

__all__ = ["BASELINES", "PIXEL_CANVAS", "LeNet", "pixel_features", "run_baseline"]

BASELINES = ("frequency", "pixel-logreg", "pixel-mlp", "lenet")
PIXEL_CANVAS = 64


def _pixel_prep(pre: Preprocessed):
    return dataclasses.replace(pre.config, canvas=PIXEL_CANVAS, fit="resize")


def pixel_features(pre: Preprocessed) -> FeatureSet:
    """Raw pixels of each kept cell's original view on the 64 px canvas, flattened (values 0..1)."""
    rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
    prep = _pixel_prep(pre)
    X = np.stack([load_view(p, "orig", prep).ravel() for p in rows["path"]]).astype(np.float32)
    source = FeatureSource(kind="pixels", name="pixels", canvas=PIXEL_CANVAS, preprocess=pre.config.to_dict(),
                           preprocess_hash=pre.config.hash, dataset_fingerprint=pre.fingerprint)  # fmt: skip
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


def run_baseline(name: str, pre: Preprocessed, out: str | Path, *, split: str = "leave-one-donor-out",
                 test_donor: str | None = None, seed: int = 0, n_boot: int = 2000, epochs: int = 30,
                 device: str = "auto", log=print):  # fmt: skip
    """Run one baseline; returns (run directory, Evaluation)."""
    if name not in BASELINES:
        raise TprobeError(f"baseline {name!r} is not one of {', '.join(BASELINES)}, all")
    common = {"baseline": name, "split": split, "test_donor": test_donor, "seed": seed}
    if name in ("pixel-logreg", "pixel-mlp"):
        fs = pixel_features(pre)
        head, penalty = ("logreg", "l1") if name == "pixel-logreg" else ("mlp", "l2")
        probe = ProbeRun(head=head, penalty=penalty, split=split, test_donor=test_donor, seed=seed,
                         n_boot=n_boot, max_dims=None, final_head=False).fit(fs)  # fmt: skip
        run = probe.save(out, f"baseline-{name}", command="baseline", extra_options=common)
        return run, probe.evaluation_
    rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
    plan = split_plan(rows, split, test_donor=test_donor)
    check_plan(plan, rows)
    run = make_run_dir(out, f"baseline-{name}")
    features = FeatureSource(kind="baseline", name=name, preprocess=pre.config.to_dict(),
                             preprocess_hash=pre.config.hash, dataset_fingerprint=pre.fingerprint)  # fmt: skip
    record = RunRecord(command="baseline", name=run.name, features=features, options=common)
    if name == "frequency":
        ev = evaluate(frequency_predictions(rows, plan), rows, plan, n_boot=n_boot, seed=seed)
        save_run(run, record=record, evaluation=ev, plan=plan, meta=rows)
        return run, ev
    from tprobe.backbones import pick_device
    from tprobe.plots import learning_curves
    from tprobe.training import TrainConfig, run_folds

    cfg = TrainConfig(epochs=epochs, batch_size=32, lr_head=1e-3, weight_decay=1e-4, patience=5, seed=seed)
    in_channels = max(1, len(pre.config.used_channels)) if pre.config.channel_mode != "grey" else 1
    preds, curves = run_folds(lambda: LeNet(in_channels=in_channels), rows, plan, _pixel_prep(pre), cfg,
                              pick_device(device), run, log=log)  # fmt: skip
    ev = evaluate(preds, rows, plan, n_boot=n_boot, seed=seed)
    record.options["train"] = cfg.to_dict()
    record.features.canvas = PIXEL_CANVAS
    save_run(run, record=record, evaluation=ev, plan=plan, meta=rows)
    curves.to_csv(run / "curves.csv", index=False)
    learning_curves(curves, run / "curves.png")
    return run, ev

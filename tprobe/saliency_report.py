"""Saliency grids for a finetune run: per held-out donor, a sample of right and wrong calls."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tprobe.preprocess import Preprocessed

__all__ = ["saliency_for_run"]


def saliency_for_run(run: str | Path, pre: Preprocessed | None, *, n: int = 8) -> list[Path]:
    """Write ``saliency_<donor>.png`` for each fold of ``run``; returns the paths."""
    from tprobe.dataset import discover
    from tprobe.finetune import load_fold_model
    from tprobe.preprocess import PreprocessConfig, preprocess
    from tprobe.runs import read_json
    from tprobe.saliency import saliency_grid

    run = Path(run)
    cfg = read_json(run / "config.json")
    pred = pd.read_parquet(run / "predictions.parquet")
    prep = PreprocessConfig(**{k: v for k, v in cfg["features"]["preprocess"].items() if k != "version"})
    if pre is None:
        pre = preprocess(discover(cfg.get("data")), prep)
    rows = pre.kept.set_index("image_id")
    pred = pred[pred["image_id"].isin(rows.index)]
    pred = pred.assign(right=(pred["p_activated"] >= 0.5) == (pred["label"] == 1))
    paths = []
    for (fold, donor), d in pred.groupby(["fold", "donor"]):
        wrong = d[~d["right"]].head(n // 2)
        right = d[d["right"]].head(n - len(wrong))
        pick = pd.concat([right, wrong])
        if pick.empty:
            continue
        model = load_fold_model(run, int(fold))
        sample = rows.loc[pick["image_id"]].reset_index()
        out = run / f"saliency_{donor}.png"
        saliency_grid(model, sample, prep, out, title=f"{donor}: {len(right)} right, {len(wrong)} wrong")
        paths.append(out)
    return paths

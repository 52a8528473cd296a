"""Saliency grids for a finetune run: per held-out donor, a sample of right and wrong calls."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tprobe.data.preprocess import Preprocessed

__all__ = ["saliency_for_run"]


def saliency_for_run(run: str | Path, pre: Preprocessed | None, *, n: int = 8) -> list[Path]:
    """Write ``saliency_<donor>.png`` for each fold of ``run`` (donor made safe by ``runs.safe_name``)."""
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.errors import TprobeError
    from tprobe.runs.record import RunRecord, inside, safe_name
    from tprobe.train.finetune import load_fold_model
    from tprobe.train.saliency import saliency_grid

    run = Path(run)
    record = RunRecord.load(run)
    if record.command != "finetune":
        raise TprobeError(f"{run}: is not a `tprobe finetune` run; saliency needs a fine-tuned model")
    try:
        pred = pd.read_parquet(run / "predictions.parquet")
    except (OSError, ValueError) as exc:
        raise TprobeError(
            f"{run / 'predictions.parquet'}: unreadable ({type(exc).__name__}); rerun the fine-tuning"
        ) from None
    prep = record.preprocess_config()
    if pre is None:
        pre = preprocess(
            discover(record.data, channel_files=prep.channel_files, channels=prep.channels), prep
        )
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
        out = inside(run, f"saliency_{safe_name(donor)}.png")  # a donor name is data: never a path
        saliency_grid(
            model,
            sample,
            prep,
            out,
            title=f"{record.title} — held-out {donor}: {len(right)} right, {len(wrong)} wrong calls",
        )
        paths.append(out)
    return paths

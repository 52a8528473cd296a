"""End-to-end training of a DINOv2 backbone + linear head on the same donor splits as ``probe``.

It skips the embedding cache on purpose: the backbone's weights change (unless ``freeze``).
The head is one linear layer on a pooled representation (default ``concat``: CLS, registers and
every patch token, as in the DINOv2 study), trained with a sigmoid + BCE loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from tprobe.data.preprocess import Preprocessed
from tprobe.errors import TprobeError
from tprobe.features.sources import FeatureSource
from tprobe.models.backbones import Backbone, ModelRef, pick_device
from tprobe.models.tokens import check_pool, pool_tokens
from tprobe.probing.evaluate import check_plan, check_train_donors, evaluate, split_plan
from tprobe.runs.record import RunRecord, inside, save_run
from tprobe.train.loop import TrainConfig, run_folds

__all__ = ["DinoClassifier", "FinetuneRun", "load_fold_model", "saliency_for_run"]


class DinoClassifier(nn.Module):
    """Backbone + one linear layer on pooled tokens -> one activation logit per image."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        pool: str = "concat",
        canvas: int = 140,
        freeze: bool = False,
        unfreeze_last: int | None = None,
    ):
        super().__init__()
        check_pool(pool, backbone.num_registers)
        self.encoder = backbone.model
        self.backbone = backbone
        self.pool = pool
        self.layout = backbone.layout(canvas)
        self.head = nn.Linear(self.layout.width(pool), 1)
        if freeze or unfreeze_last is not None:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        if unfreeze_last:
            layers = backbone.blocks
            if not 0 < unfreeze_last <= len(layers):
                raise TprobeError(f"--unfreeze-last {unfreeze_last}: the model has {len(layers)} layers")
            for module in [*layers[-unfreeze_last:], backbone.final_norm]:
                for p in module.parameters():
                    p.requires_grad_(True)

    def forward(self, images: torch.Tensor, output_attentions: bool = False):
        out = self.encoder(
            pixel_values=self.backbone.pixel_values(images), output_attentions=output_attentions
        )
        logit = self.head(pool_tokens(*self.layout.split(out.last_hidden_state), self.pool)).squeeze(1)
        return (logit, out.attentions) if output_attentions else logit

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict]:
        body = [p for p in self.encoder.parameters() if p.requires_grad]
        groups = [{"params": list(self.head.parameters()), "lr": lr_head}]
        return groups + ([{"params": body, "lr": lr_backbone}] if body else [])

    def trainable_state(self) -> dict:
        """The weights that training can change (head only when frozen): what a run saves."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in names}


@dataclass
class FinetuneRun:
    """Leave-donors-out end-to-end training; ``fit(pre, run_dir)`` writes a probe-schema run directory."""

    model: ModelRef
    pool: str = "concat"
    freeze: bool = False
    unfreeze_last: int | None = None
    split: str = "leave-one-donor-out"
    test_donor: str | None = None
    n_splits: int = 5
    device: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    n_boot: int = 2000
    data: str | None = None  # the --data given (None = bundled sample), recorded for saliency/reruns

    def _make(self, dev, canvas):
        def make():
            bb = Backbone.from_pretrained(self.model, device="cpu")
            return DinoClassifier(
                bb, pool=self.pool, canvas=canvas, freeze=self.freeze, unfreeze_last=self.unfreeze_last
            ).to(dev)

        return make

    def record(self, pre: Preprocessed) -> RunRecord:
        """The run record (config.json) of this fine-tuning run."""
        m = self.model
        mode = "frozen" if self.freeze else "finetuned"
        features = FeatureSource(
            kind="finetune",
            name=f"{Path(m.name).name}-{self.pool}-{mode}",
            pool=self.pool,
            model=m.name,
            model_source=m.source,
            resolved_revision=m.resolved,
            random_init=m.random_init,
            preprocess=pre.config.to_dict(),
            preprocess_hash=pre.config.hash,
            dataset_fingerprint=pre.fingerprint,
        )
        options = {
            "pool": self.pool,
            "freeze": self.freeze,
            "unfreeze_last": self.unfreeze_last,
            "split": self.split,
            "test_donor": self.test_donor,
            "n_splits": self.n_splits,
            "train": self.train.to_dict(),
            "n_boot": self.n_boot,
        }
        return RunRecord(
            command="finetune", name=features.name, features=features, options=options, data=self.data
        )

    @classmethod
    def from_run(cls, run: str | Path, *, offline: bool = False) -> FinetuneRun:
        """The job an interrupted fine-tuning run folder recorded, to ``fit`` again into that folder.

        Its recorded options win: a resumed run must train what it started. The model is resolved
        again from its recorded source and keeps the name it was first given (``./m``, an alias),
        so the record still matches.
        """
        import dataclasses

        from tprobe.models.backbones import resolve_model

        old = RunRecord.load(run)
        if old.command != "finetune":
            raise TprobeError(f"{run}: is not a `tprobe finetune` run; --resume continues fine-tuning runs")
        o = old.options
        ref = resolve_model(old.features.model_source, None, offline=offline)
        if old.features.model:  # `./m` or an alias as first given: the record must match
            ref = dataclasses.replace(ref, name=old.features.model)
        return cls(
            ref,
            pool=o["pool"],
            freeze=o["freeze"],
            unfreeze_last=o["unfreeze_last"],
            split=o["split"],
            test_donor=o["test_donor"],
            n_splits=o.get("n_splits", 5),
            train=TrainConfig(**o["train"]),
            n_boot=o.get("n_boot", 2000),
            data=old.data,
        )

    def fit(self, pre: Preprocessed, run: str | Path, log=print) -> FinetuneRun:
        """Train every fold into the run folder ``run`` (config.json first, then a checkpoint per epoch
        in ``run/checkpoints``: an interrupted fit resumes there), then :meth:`save` the results.

        Refits into a folder holding a run with other options are refused. ``log(row: dict)`` gets each
        fold's start and each epoch's losses."""
        pre.config.require_one_image("finetune")
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        record = self.record(pre)
        if (run / "config.json").exists():
            old = RunRecord.load(run)
            if (old.options, old.features.to_dict()) != (record.options, record.features.to_dict()):
                raise TprobeError(f"{run}: holds a run with other options; use a new --out to start fresh")
        else:
            record.save(run)
        rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
        donors = sorted(set(rows["donor"]))
        if self.split != "group-kfold" and len(donors) < 3:
            raise TprobeError(
                f"fine-tuning with split {self.split!r} needs at least 3 donors (one held out, one "
                f"for early stopping, one or more to train on); the data has {len(donors)} "
                f"({', '.join(donors)})"
            )
        dev = pick_device(self.device)
        plan = split_plan(rows, self.split, test_donor=self.test_donor, n_splits=self.n_splits)
        check_plan(plan, rows)
        check_train_donors(plan, rows, what="fine-tuning", split=self.split)
        predictions, self.curves_ = run_folds(
            self._make(dev, pre.config.canvas),
            rows,
            plan,
            pre.config,
            self.train,
            dev,
            run,
            log=log,
            save_state=lambda m: m.trainable_state(),
        )
        self.evaluation_ = evaluate(predictions, rows, plan, n_boot=self.n_boot, seed=self.train.seed)
        self.plan_, self.rows_, self.record_, self.run_ = plan, rows, record, run
        self.save()
        return self

    def save(self, run: str | Path | None = None) -> Path:
        """Write the run-directory files of the fitted run (the probe's: record, metrics, splits,
        predictions, figures; plus curves.csv/curves.png) into ``run`` [default: the folder it was
        trained in, which also holds the per-fold weights ``fold<i>.pt``]; return its path."""
        from tprobe.plot.figures import learning_curves

        run = Path(run) if run is not None else self.run_
        save_run(run, record=self.record_, evaluation=self.evaluation_, plan=self.plan_, meta=self.rows_)
        self.curves_.to_csv(run / "curves.csv", index=False)
        learning_curves(self.curves_, run / "curves.png", title=self.record_.title)
        return run

    def saliency(self, n: int = 8, pre: Preprocessed | None = None) -> list[Path]:
        """Saliency grids of ``n`` images per held-out donor into the fitted run's folder (``pre``: its
        images, default read again); kept in ``saliency_``. ``n=0`` writes none."""
        self.saliency_ = saliency_for_run(self.run_, pre, n=n) if n else []
        return self.saliency_


def load_fold_model(run: str | Path, fold: int, *, device: str = "cpu", attn_implementation: str = "eager"):
    """Rebuild a finetune run's classifier for ``fold`` from its saved trainable weights (tensors only)."""
    from tprobe.models.backbones import resolve_model

    run = Path(run)
    record = RunRecord.load(run)
    if record.command != "finetune":
        raise TprobeError(f"{run}: is not a `tprobe finetune` run; saliency needs a fine-tuned model")
    ref = resolve_model(record.features.model_source)
    if ref.resolved != record.features.resolved_revision:
        raise TprobeError(f"model {ref.name} has changed since run {run.name}; its fold weights do not apply")
    bb = Backbone.from_pretrained(ref, device=device, attn_implementation=attn_implementation)
    o = record.options
    model = DinoClassifier(
        bb,
        pool=o["pool"],
        canvas=record.preprocess_config().canvas,
        freeze=o["freeze"],
        unfreeze_last=o["unfreeze_last"],
    )
    path = inside(run, f"fold{int(fold)}.pt", what="weights file")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refuses anything but tensors and containers
        raise TprobeError(
            f"{path}: not a weights file tprobe can load safely ({type(exc).__name__}); rerun the fine-tuning"
        ) from None
    if not isinstance(state, dict) or set(state) - set(model.state_dict()):
        raise TprobeError(f"{path}: weights do not fit the model; rerun the fine-tuning")
    model.load_state_dict(state, strict=False)
    return model.to(bb.device).eval()


def saliency_for_run(run: str | Path, pre: Preprocessed | None, *, n: int = 8) -> list[Path]:
    """Write ``saliency_<donor>.png`` for each fold of ``run`` (donor made safe by ``runs.safe_name``)."""
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.runs.record import safe_name
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

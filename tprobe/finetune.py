"""End-to-end training of a DINOv2 backbone + linear head on the same donor splits as ``probe``.

It skips the embedding cache on purpose: the backbone's weights change (unless ``freeze``).
The head is one linear layer on a pooled representation (default ``concat``: CLS, registers and
every patch token, as in the DINOv2 study), trained with a sigmoid + BCE loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tprobe.backbones import Backbone, ModelRef, pick_device
from tprobe.errors import TprobeError
from tprobe.evaluate import check_plan, evaluate, split_plan
from tprobe.preprocess import Preprocessed
from tprobe.runs import read_json, save_run, write_json
from tprobe.store import POOLS
from tprobe.training import TrainConfig, run_folds

__all__ = ["DinoClassifier", "FinetuneRun", "pool_tokens"]


def pool_tokens(hidden: torch.Tensor, pool: str, registers: int) -> torch.Tensor:
    """Pool ``last_hidden_state`` like the store's pools (patch mean excludes registers)."""
    cls, regs, patches = hidden[:, 0], hidden[:, 1 : 1 + registers], hidden[:, 1 + registers :]
    if pool == "cls":
        return cls
    if pool == "mean":
        return patches.mean(1)
    if pool == "registers":
        return regs.mean(1)
    if pool == "cls+mean":
        return torch.cat([cls, patches.mean(1)], 1)
    return hidden.flatten(1)  # concat: CLS, registers, patches


class DinoClassifier(nn.Module):
    """Backbone + one linear layer on pooled tokens -> one activation logit per image."""

    def __init__(self, backbone: Backbone, *, pool: str = "concat", canvas: int = 140,
                 freeze: bool = False, unfreeze_last: int | None = None):  # fmt: skip
        super().__init__()
        if pool not in POOLS:
            raise TprobeError(f"--pool {pool!r} is not one of {', '.join(POOLS)}")
        if pool == "registers" and not backbone.num_registers:
            raise TprobeError(f"--pool registers: model {backbone.ref.name!r} has no register tokens; "
                              "use a -reg model or another --pool")  # fmt: skip
        self.encoder = backbone.model
        self.backbone = backbone
        self.pool = pool
        d, r, g = backbone.hidden_size, backbone.num_registers, backbone.grid(canvas)
        width = {"cls": d, "mean": d, "registers": d, "cls+mean": 2 * d, "concat": (1 + r + g * g) * d}[pool]
        self.head = nn.Linear(width, 1)
        if freeze or unfreeze_last is not None:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        if unfreeze_last:
            layers = self.encoder.encoder.layer
            if not 0 < unfreeze_last <= len(layers):
                raise TprobeError(f"--unfreeze-last {unfreeze_last}: the model has {len(layers)} layers")
            for module in [*layers[-unfreeze_last:], self.encoder.layernorm]:
                for p in module.parameters():
                    p.requires_grad_(True)

    def forward(self, images: torch.Tensor, output_attentions: bool = False):
        out = self.encoder(
            pixel_values=self.backbone.pixel_values(images), output_attentions=output_attentions
        )
        logit = self.head(pool_tokens(out.last_hidden_state, self.pool, self.backbone.num_registers)).squeeze(
            1
        )
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
            return DinoClassifier(bb, pool=self.pool, canvas=canvas, freeze=self.freeze,
                                  unfreeze_last=self.unfreeze_last).to(dev)  # fmt: skip

        return make

    def config(self, pre: Preprocessed) -> dict:
        return {"command": "finetune", "data": self.data, "model": self.model.name, "model_source": self.model.source,
                "resolved_revision": self.model.resolved, "pool": self.pool, "freeze": self.freeze,
                "unfreeze_last": self.unfreeze_last, "split": self.split, "test_donor": self.test_donor,
                "n_splits": self.n_splits, "train": self.train.to_dict(), "n_boot": self.n_boot,
                "features": {"kind": "finetune", "model": self.model.name, "pool": self.pool,
                             "preprocess": pre.config.to_dict(), "preprocess_hash": pre.config.hash,
                             "dataset_fingerprint": pre.fingerprint,
                             "name": f"{Path(self.model.name).name}-{self.pool}-"
                                     f"{'frozen' if self.freeze else 'finetuned'}"}}  # fmt: skip

    def fit(self, pre: Preprocessed, run: Path, log=print) -> FinetuneRun:
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        config = self.config(pre)
        if (run / "config.json").exists():
            old = read_json(run / "config.json")
            if {k: old.get(k) for k in config} != config:
                raise TprobeError(f"{run}: holds a run with other options; use a new --out to start fresh")
        else:
            write_json(run / "config.json", config)
        dev = pick_device(self.device)
        rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
        plan = split_plan(rows, self.split, test_donor=self.test_donor, n_splits=self.n_splits)
        check_plan(plan, rows)
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
        self.plan_, self.rows_ = plan, rows
        save_run(run, config=config, evaluation=self.evaluation_, plan=plan, meta=rows)
        self.curves_.to_csv(run / "curves.csv", index=False)
        from tprobe.plots import learning_curves

        learning_curves(self.curves_, run / "curves.png")
        return self


def load_fold_model(run: str | Path, fold: int, *, device: str = "cpu", attn_implementation: str = "eager"):
    """Rebuild a finetune run's classifier for ``fold`` from its saved trainable weights."""
    from tprobe.backbones import resolve_model

    run = Path(run)
    cfg = read_json(run / "config.json")
    if cfg.get("command") != "finetune":
        raise TprobeError(f"{run}: is not a `tprobe finetune` run; saliency needs a fine-tuned model")
    ref = resolve_model(cfg["model_source"])
    bb = Backbone.from_pretrained(ref, device=device, attn_implementation=attn_implementation)
    canvas = cfg["features"]["preprocess"]["canvas"]
    model = DinoClassifier(bb, pool=cfg["pool"], canvas=canvas, freeze=cfg["freeze"],
                           unfreeze_last=cfg["unfreeze_last"])  # fmt: skip
    state = torch.load(run / f"fold{fold}.pt", map_location=device, weights_only=True)
    missing = set(state) - set(model.state_dict())
    if missing:
        raise TprobeError(f"{run}/fold{fold}.pt: weights do not fit the model ({sorted(missing)[:2]})")
    model.load_state_dict(state, strict=False)
    return model.to(bb.device).eval()

import numpy as np
import pytest
import torch
from conftest import save_png

from tprobe.data.dataset import discover
from tprobe.data.preprocess import PreprocessConfig, preprocess
from tprobe.errors import TprobeError
from tprobe.models.backbones import Backbone, resolve_model
from tprobe.train.finetune import DinoClassifier, FinetuneRun, load_fold_model
from tprobe.train.loop import TrainConfig, train_fold
from tprobe.train.saliency import saliency_maps

PREP = PreprocessConfig(canvas=28, views="dihedral8")


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """Three donors of synthetic cells: activated = large bright disc, quiescent = small dim one."""
    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20]
    for d in (1, 2, 3):
        for i in range(10):
            for label, (r, level) in (("activated", (8, 200)), ("quiescent", (4, 90))):
                disc = ((yy - 10) ** 2 + (xx - 10) ** 2 < r * r) * level + rng.integers(0, 60, (20, 20))
                name = f"CD3_{d}_{'act' if label == 'activated' else 'noact'}_1_1_{i}.png"
                save_png(root / f"donor_{d}" / label / name, np.clip(disc, 0, 255).astype(np.uint8))
    cfg = PreprocessConfig(canvas=28, views="dihedral8", entropy_min=0, entropy_dim=0, max_components=10**6)
    return preprocess(discover(root), cfg)


def _make(path, **kw):
    return lambda: DinoClassifier(Backbone.from_pretrained(str(path), device="cpu"), canvas=28, **kw)


def _split(pre):
    rows = pre.kept[pre.kept["view"] == "orig"]
    return rows[rows["donor"] != "donor_3"], rows[rows["donor"] == "donor_3"]


def test_loss_falls_on_a_learnable_subset(learnable, tiny_reg):
    train, val = _split(learnable)
    cfg = TrainConfig(epochs=4, batch_size=8, lr_head=3e-3, lr_backbone=1e-4, patience=10)
    model, curves = train_fold(
        _make(tiny_reg, pool="cls+mean"),
        train,
        val,
        learnable.config,
        cfg,
        torch.device("cpu"),
        log=lambda r: None,
    )
    assert len(curves) == 4
    assert curves["train_loss"].iloc[-1] < curves["train_loss"].iloc[0]
    assert curves["val_auc"].max() > 0.8


def test_freeze_leaves_backbone_bit_identical(learnable, tiny_reg):
    train, val = _split(learnable)
    before = Backbone.from_pretrained(str(tiny_reg), device="cpu").model.state_dict()
    model, _ = train_fold(
        _make(tiny_reg, freeze=True),
        train,
        val,
        learnable.config,
        TrainConfig(epochs=1, batch_size=8),
        torch.device("cpu"),
        log=lambda r: None,
    )
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(model.trainable_state()) == {"head.weight", "head.bias"}


def test_unfreeze_last_trains_only_those_layers(tiny_reg):
    m = _make(tiny_reg, unfreeze_last=1)()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(".layer.1." in n for n in trainable) and not any(".layer.0." in n for n in trainable)
    with pytest.raises(TprobeError, match="has 2 layers"):
        _make(tiny_reg, unfreeze_last=5)()


def test_resume_continues_from_the_checkpoint(learnable, tiny_reg, tmp_path):
    train, val = _split(learnable)
    ck = tmp_path / "fold0.pt"
    kw = dict(checkpoint=ck, log=lambda r: None)
    _, first = train_fold(
        _make(tiny_reg),
        train,
        val,
        learnable.config,
        TrainConfig(epochs=2, batch_size=8, patience=9),
        torch.device("cpu"),
        **kw,
    )
    _, resumed = train_fold(
        _make(tiny_reg),
        train,
        val,
        learnable.config,
        TrainConfig(epochs=3, batch_size=8, patience=9),
        torch.device("cpu"),
        **kw,
    )
    assert resumed["epoch"].tolist() == [1, 2, 3]
    assert resumed["train_loss"].iloc[:2].tolist() == first["train_loss"].tolist()


def test_saliency_maps_have_the_input_shape_and_vary(learnable, tiny_reg):
    model = _make(tiny_reg)()
    from tprobe.data.preprocess import load_view

    rows = learnable.kept.head(3)
    imgs = np.stack(
        [load_view(p, v, learnable.config) for p, v in zip(rows["path"], rows["view"], strict=True)]
    )
    maps = saliency_maps(model, imgs)
    for name in ("gradient", "grad_x_input", "attention"):
        assert maps[name].shape == imgs.shape and maps[name].std() > 0, name
    assert np.all(maps["grad_x_input"][imgs == 0] == 0)


def test_registers_pool_needs_registers(tiny_plain):
    with pytest.raises(TprobeError, match="has no register tokens"):
        _make(tiny_plain, pool="registers")()


def test_finetune_run_writes_probe_schema_and_fold_weights(learnable, tiny_reg, tmp_path):
    job = FinetuneRun(
        resolve_model(str(tiny_reg)),
        pool="cls",
        freeze=True,
        n_boot=50,
        train=TrainConfig(epochs=1, batch_size=8),
    )
    job.fit(learnable, tmp_path / "run", log=lambda r: None)
    run = tmp_path / "run"
    for name in ("metrics.json", "predictions.parquet", "curves.csv", "curves.png", "roc.png", "fold0.pt"):
        assert (run / name).exists(), name
    assert set(job.evaluation_.per_donor["donor"]) == {"donor_1", "donor_2", "donor_3"}
    model = load_fold_model(run, 0)
    assert model.encoder.config._attn_implementation == "eager"


def test_cli_finetune_interrupted_then_resumed(tmp_path, tiny_reg, monkeypatch):
    """Ctrl-C during fold 2 keeps fold 0-1 checkpoints; --resume finishes with the recorded options."""
    from click.testing import CliRunner

    import tprobe.train.loop as training
    from tprobe.cli import main

    data = tmp_path / "d"
    from conftest import copy_subset

    copy_subset(data, donors=("donor_1", "donor_3", "donor_6"), per_class=5)
    args = [
        "finetune",
        "--model",
        str(tiny_reg),
        "--data",
        str(data),
        "--pool",
        "cls",
        "--freeze",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--saliency-n",
        "2",
        "--out",
        str(tmp_path / "runs"),
    ]
    real = training.train_fold
    calls = []

    def flaky(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(training, "train_fold", flaky)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 130 and "rerun" in r.output
    run = next((tmp_path / "runs").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["fold0.pt", "fold1.pt"]
    monkeypatch.setattr(training, "train_fold", real)
    r = CliRunner().invoke(main, ["finetune", "--resume", str(run), "--epochs", "99"])
    assert r.exit_code == 0, r.output
    assert "recorded options" in r.output and (run / "metrics.json").exists()
    assert (run / "saliency_donor_1.png").exists()


def test_an_interrupted_then_resumed_fold_trains_as_an_uninterrupted_one(learnable, tiny_reg, tmp_path):
    """A fold interrupted after epoch 1 and resumed from its checkpoint sees the same random views,
    so its losses and best weights equal the uninterrupted fold's (the run does not depend on the stop)."""
    train, val = _split(learnable)
    cfg = TrainConfig(epochs=3, batch_size=8, patience=9)
    run = lambda **kw: train_fold(  # noqa: E731
        _make(tiny_reg), train, val, learnable.config, cfg, torch.device("cpu"), **kw
    )
    whole_model, whole = run(log=lambda r: None)

    class Stop(Exception):
        pass

    def stop_in_epoch_2(row):
        if row.get("epoch") == 2:  # before epoch 2's checkpoint: the resume starts from epoch 1's
            raise Stop

    ck = tmp_path / "fold0.pt"
    with pytest.raises(Stop):
        run(checkpoint=ck, log=stop_in_epoch_2)
    assert torch.load(ck, weights_only=True)["state"]["epoch"] == 1
    model, resumed = run(checkpoint=ck, log=lambda r: None)
    assert resumed["train_loss"].tolist() == whole["train_loss"].tolist()
    a, b = whole_model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_an_fp32_fold_resumes_under_a_gradient_scaler(
    learnable, tiny_reg, tmp_path, monkeypatch
):
    """precision auto is fp32 on a CPU and fp16 (a GradScaler) on a GPU: a fold checkpointed on one resumes
    on the other (an fp32 checkpoint holds the disabled scaler's empty state, which a scaler refuses)."""
    real = torch.amp.GradScaler  # a CUDA scaler disables itself without CUDA: here it scales on the CPU
    monkeypatch.setattr(torch.amp, "GradScaler", lambda enabled=True: real("cpu", enabled=enabled))
    train, val = _split(learnable)
    ck = tmp_path / "fold0.pt"
    for epochs, precision in ((1, "fp32"), (2, "fp16")):
        _, curves = train_fold(
            _make(tiny_reg),
            train,
            val,
            learnable.config,
            TrainConfig(epochs=epochs, batch_size=8, precision=precision),
            torch.device("cpu"),
            checkpoint=ck,
            log=lambda r: None,
        )
    assert curves["epoch"].tolist() == [1, 2]

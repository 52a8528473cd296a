"""Issue 17, feature side: scaled kNN/prototype, identifier columns, unused table rows, --normalize."""

import numpy as np
import pandas as pd
import pytest

from tprobe.features.sources import FeatureSet
from tprobe.probing.heads import load_head_file, make_head, save_head
from tprobe.probing.run import ProbeRun
from tprobe.science.curve import LabelCurve


def area_dominated(n_donors=4, cells=60, seed=0) -> FeatureSet:
    """A CellProfiler-like table: one huge-variance column (cell area, ~80% of the variance) carries no
    label signal; the signal sits in eight small-variance columns."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d in range(n_donors):
        for c in range(cells):
            label = int(c % 2 == 0)
            signal = rng.normal(size=8) * 0.5 + 0.4 * label  # small variance, shifted by the label
            area = 3.5 * rng.normal()  # a size column (centred): variance 12 against 8 x 0.29
            X.append(np.r_[area, signal])
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "path": f"d{d}/c{c}.png",
                    "label": label,
                    "donor": f"donor_{d + 1}",
                    "group": f"d{d}c{c}",
                    "view": "orig",
                }
            )
    X = np.asarray(X, np.float32)
    return FeatureSet(X, pd.DataFrame(rows), {"kind": "table", "name": "area-dominated"})


def test_area_carries_most_of_the_variance():
    v = area_dominated().X.var(0)
    assert v[0] / v.sum() > 0.8


@pytest.mark.parametrize("head", ["knn", "prototype"])
def test_knn_and_prototype_standardise_inside_the_fold(head, tmp_path):
    fs = area_dominated()
    logreg = ProbeRun(head="logreg", n_boot=20, final_head=False).fit(fs).summary_["roc_auc"]["mean"]
    run = ProbeRun(head=head, n_boot=20).fit(fs)
    auc = run.summary_["roc_auc"]["mean"]
    assert logreg > 0.85
    assert auc > logreg - 0.05, (
        head,
        auc,
        logreg,
    )  # unscaled, the cosine is a size vote: 0.84 vs 0.94 (scaled: 0.90)
    # the scaler is a step of the head: fitted on the training rows only, saved with it, loads as data
    model = make_head(head)
    assert [name for name, _ in model.steps] == ["scale", "clf"]
    saved = load_head_file(save_head(run.final_["head"], tmp_path / "h.skops"))
    assert np.allclose(saved.predict_proba(fs.X), run.final_["head"].predict_proba(fs.X))
    # the reference engine agrees (it builds heads through make_head too)
    ref = ProbeRun(head=head, n_boot=20, final_head=False, engine="reference").fit(fs)
    assert ref.summary_["roc_auc"]["mean"] == pytest.approx(auc, abs=1e-9)
    # and so does the label-efficiency curve
    curve = LabelCurve(head=head, shots=("all",), repeats=1).fit(fs).results_
    assert curve["roc_auc"].mean() > logreg - 0.05


# ---- identifier and position columns; unused table rows ---------------------------------------
@pytest.fixture(scope="module")
def sample_manifest():
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess

    return preprocess(discover(), progress=False).manifest


def leak_table(manifest, leak: str, rows="all") -> pd.DataFrame:
    """One row per original image of the data (filtered or not): three noise features and ``leak``,
    the label encoded (as CellProfiler's bookkeeping columns would be if objects were numbered by class)."""
    orig = manifest[manifest["view"] == "orig"]
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "FileName": orig["path"].map(lambda p: "/".join(p.split("/")[-3:])).to_numpy(),
            "Intensity_A": rng.normal(size=len(orig)),
            "Intensity_B": rng.normal(size=len(orig)),
            "Texture_C": rng.normal(size=len(orig)),
        }
    )
    if leak:
        table[leak] = orig["label"].to_numpy() * 7 + rng.integers(0, 3, len(orig))
    return table


LEAKS = [
    "ImageNumber",
    "ObjectNumber",
    "Number_Object_Number",
    "Cells_Number_Object_Number",
    "Metadata_Well",
    "FileName_Code",
    "PathName_Code",
    "URL_Code",
    "Location_Center_X",
    "Parent_Nuclei",
    "Children_Nuclei_Count",
    "Nuclei_Center_Y",
    "Cells_Location_CenterMassIntensity_X_DNA",
    "Group_Number",  # CellProfiler's Groups module: the group of the image (grouped by plate/batch)
    "Group_Index",
    "Group_Length",
    "ExecutionTime_03IdentifyPrimaryObjects",
    "ModuleError_03IdentifyPrimaryObjects",
]


@pytest.mark.refuses(
    "identifier and position columns of a feature table as features (dropped, recorded, unless --keep-columns)"
)
@pytest.mark.parametrize("leak", LEAKS)
def test_a_label_leak_in_an_identifier_column_is_dropped_and_recorded(sample_manifest, tmp_path, leak):
    from tprobe.features.sources import from_table

    leak_table(sample_manifest, leak).to_csv(tmp_path / "cp.csv", index=False)
    fs = from_table(tmp_path / "cp.csv", sample_manifest)
    assert fs.source.columns == ["Intensity_A", "Intensity_B", "Texture_C"]
    assert leak in fs.source.dropped_columns and "FileName" in fs.source.dropped_columns
    if leak in ("ImageNumber", "Number_Object_Number", "Location_Center_X", "Group_Number"):  # chance
        auc = ProbeRun(n_boot=20, final_head=False).fit(fs).summary_["roc_auc"]["mean"]
        assert 0.35 < auc < 0.65, auc
        # --keep-columns takes the column back: the leak then scores (what the rule protects against)
        kept = from_table(tmp_path / "cp.csv", sample_manifest, keep=[leak])
        assert leak in kept.source.columns and leak not in kept.source.dropped_columns
        assert ProbeRun(n_boot=20, final_head=False).fit(kept).summary_["roc_auc"]["mean"] > 0.95


def test_column_rule_reasons_and_options(sample_manifest, tmp_path):
    from tprobe.errors import TprobeError
    from tprobe.features.sources import column_rule, from_table

    table = leak_table(sample_manifest, "Number_Object_Number").assign(
        Metadata_Plate="p1", Treatment=lambda t: np.where(t["Intensity_A"] > 0, "x", "y"), Flag=True
    )
    cols, dropped = column_rule(table, "FileName", exclude=["Texture_C"])
    assert cols == ["Intensity_A", "Intensity_B"]
    assert dropped["FileName"] == "id column" and dropped["Texture_C"] == "--drop-columns"
    assert dropped["Treatment"] == "non-numeric" and dropped["Flag"] == "boolean"
    assert dropped["Number_Object_Number"].startswith("identifier")
    assert dropped["Metadata_Plate"] == "non-numeric"
    with pytest.raises(TprobeError, match="--keep-columns Treatment"):
        column_rule(table, "FileName", keep=["Treatment"])
    with pytest.raises(TprobeError, match="--drop-columns names unknown"):
        column_rule(table, "FileName", exclude=["nope"])
    table.to_csv(tmp_path / "cp.csv", index=False)
    with pytest.raises(TprobeError, match="cp.csv: --keep-columns names unknown"):
        from_table(tmp_path / "cp.csv", sample_manifest, keep=["nope"])


def test_unused_table_rows_are_counted_by_class_and_all_rows_scores_them(sample_manifest, tmp_path):
    from tprobe.features.sources import from_table, table_note

    orig = sample_manifest[sample_manifest["view"] == "orig"]
    removed = orig[~orig["kept"]]
    table = leak_table(sample_manifest, "")
    extra = pd.DataFrame(
        {
            "FileName": ["donor_9/activated/nowhere.png"],
            "Intensity_A": [0.0],
            "Intensity_B": [0.0],
            "Texture_C": [0.0],
        }
    )
    pd.concat([table, extra]).to_csv(tmp_path / "cp.csv", index=False)
    fs = from_table(tmp_path / "cp.csv", sample_manifest)
    assert len(fs.meta) == int(orig["kept"].sum()) and len(fs.X) == len(fs.meta)
    want = {"activated": int((removed["label"] == 1).sum()), "quiescent": int((removed["label"] == 0).sum())}
    assert fs.source.unused_rows == {"filtered": want, "no_image": 1}
    assert sum(want.values()) == len(removed) > 0 and fs.source.unmatched_images == 0
    note = " ".join(table_note(fs.source))
    assert f"{len(removed) + 1} table rows unused" in note and f"{want['activated']} activated" in note
    everything = from_table(tmp_path / "cp.csv", sample_manifest, all_rows=True)
    assert len(everything.meta) == len(orig) and everything.source.all_rows
    assert everything.source.unused_rows == {"filtered": {}, "no_image": 1}
    assert everything.name != fs.name  # the two cell counts are two distinguishable runs
    # each row keeps its own features whichever rows are scored
    a = pd.DataFrame(fs.X, index=fs.meta["image_id"])
    b = pd.DataFrame(everything.X, index=everything.meta["image_id"]).loc[a.index]
    assert np.array_equal(a.to_numpy(), b.to_numpy())
    assert set(everything.meta["image_id"]) - set(fs.meta["image_id"]) == set(removed["image_id"])


def test_cli_prints_dropped_columns_and_unused_rows_and_records_them(sample_manifest, tmp_path):
    import json

    from click.testing import CliRunner

    from tprobe.cli import main

    leak_table(sample_manifest, "Number_Object_Number").to_csv(tmp_path / "cp.csv", index=False)
    args = [
        "probe",
        "--features",
        str(tmp_path / "cp.csv"),
        "--bootstrap",
        "20",
        "--no-final-head",
        "--drop-columns",
        "Texture_C",
        "--out",
        str(tmp_path / "runs"),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    removed = sample_manifest[(sample_manifest["view"] == "orig") & ~sample_manifest["kept"]]
    assert "3 column(s) dropped" in res.output and f"{len(removed)} table rows unused" in res.output
    record = json.loads(
        (tmp_path / "runs" / res.output.strip().splitlines()[-1].split("/")[-1] / "config.json").read_text()
    )
    assert record["features"]["dropped_columns"]["Number_Object_Number"].startswith("identifier")
    assert record["features"]["unused_rows"]["filtered"] == {  # on the bundled sample: 34 and 159
        "activated": int((removed["label"] == 1).sum()),
        "quiescent": int((removed["label"] == 0).sum()),
    }
    res = CliRunner().invoke(main, [*args, "--all-table-rows", "--keep-columns", "Nope"])
    assert res.exit_code == 2 and "--keep-columns names unknown column(s) ['Nope']" in res.output
    res = CliRunner().invoke(main, [*args, "--all-table-rows", "--normalize", "donor-center"])
    assert res.exit_code == 0 and "table rows unused" not in res.output
    run = tmp_path / "runs" / res.output.strip().splitlines()[-1].split("/")[-1]
    record = json.loads((run / "config.json").read_text())
    assert record["options"]["normalize"] == "donor-center" and record["features"]["all_rows"]
    assert record["features"]["name"] == "table:cp+all-rows"


# ---- small ones: means over the same donors, the fold-count refusal -----------------------------
def test_accuracy_and_f1_means_cover_the_same_donors_as_auc():
    from tprobe.probing.evaluate import Fold, evaluate

    # donor a: one class, every call right (accuracy 1); donors b, c: both classes, half right
    meta = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(12)],
            "donor": ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
            "group": [f"g{i}" for i in range(12)],
            "view": "orig",
            "label": [1, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        }
    )
    p = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.4, 0.2, 0.8, 0.6, 0.4, 0.2, 0.8])
    pred = meta[["image_id", "donor", "group", "label"]].assign(
        p_activated=p, fold=meta["donor"].map({"a": 0, "b": 1, "c": 2})
    )
    donors = meta["donor"].to_numpy()
    plan = [
        Fold(i, [d], np.flatnonzero(donors != d), np.flatnonzero(donors == d)) for i, d in enumerate("abc")
    ]
    ev = evaluate(pred, meta, plan, n_boot=20)
    a = ev.per_donor.set_index("donor").loc["a"]
    assert a["accuracy"] == 1.0 and "left out of every mean" in a["note"]  # still shown per donor
    s = ev.summary
    assert {s[m]["n_donors"] for m in ("accuracy", "f1", "roc_auc", "average_precision")} == {2}
    assert s["accuracy"]["mean"] == pytest.approx(0.5)  # donors b and c only, not (1 + .5 + .5) / 3
    assert ev.reference["frequency"]["accuracy"]["n_donors"] == 2


@pytest.mark.refuses("more --folds than donors (the numbers are named)")
def test_too_few_donors_for_the_folds_names_the_numbers():
    from tprobe.errors import TprobeError
    from tprobe.probing.evaluate import split_plan

    meta = area_dominated(n_donors=3, cells=4).meta
    with pytest.raises(TprobeError, match=r"5 folds needs at least 5 donors; the data has 3 .*--folds 3"):
        split_plan(meta, "group-kfold", n_splits=5)
    assert len(split_plan(meta, "group-kfold", n_splits=3)) == 3
    one = meta[meta["donor"] == "donor_1"]
    with pytest.raises(TprobeError, match=r"one donor \(donor_1\), so no split holds a donor out"):
        split_plan(one, "group-kfold", n_splits=5)  # no split of one donor's cells is donor-held-out


# ---- --normalize ------------------------------------------------------------------------------
def donor_shifted(n_donors=5, cells=40, seed=0) -> FeatureSet:
    """Each donor's cells carry a large donor-specific offset (a batch effect); the label a small shift."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d in range(n_donors):
        offset = rng.normal(size=6) * 3.0
        for c in range(cells):
            label = int(c % 2 == 0)
            X.append(offset + rng.normal(size=6) + 0.8 * label)
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "path": f"d{d}/c{c}.png",
                    "label": label,
                    "donor": f"donor_{d + 1}",
                    "group": f"d{d}c{c}",
                    "view": "orig",
                }
            )
    return FeatureSet(
        np.asarray(X, np.float32), pd.DataFrame(rows), {"kind": "table", "name": "donor-shifted"}
    )


def test_donor_centring_uses_the_donors_own_rows_only():
    from tprobe.features.sources import donor_center

    fs = donor_shifted()
    donors, orig = fs.meta["donor"].to_numpy(), np.ones(len(fs.meta), bool)
    Z = donor_center(fs.X, donors, orig)
    for d in np.unique(donors):
        assert np.allclose(Z[donors == d].mean(0), 0, atol=1e-5)
    # change every other donor's rows (and their number): donor_1's centred rows are unchanged
    other = donors != "donor_1"
    X2 = fs.X.copy()
    X2[other] = np.random.default_rng(1).normal(size=(other.sum(), fs.X.shape[1])) * 50
    keep = np.flatnonzero(~other | (np.arange(len(donors)) % 3 == 0))
    Z2 = donor_center(X2[keep], donors[keep], orig[keep])
    assert np.array_equal(Z2[donors[keep] == "donor_1"], Z[donors == "donor_1"])
    # only the rows in the mask define a donor's mean (augmented views are centred, never counted)
    mask = np.arange(len(donors)) % 2 == 0
    Z3 = donor_center(fs.X, donors, mask)
    first = donors == "donor_1"
    assert np.allclose(Z3[first], fs.X[first] - fs.X[first & mask].mean(0), atol=1e-5)


def test_normalize_options_in_probe_curve_and_record(tmp_path):
    fs = donor_shifted()
    auc = {}
    for norm in ("none", "standard", "donor-center"):
        run = ProbeRun(head="prototype", n_boot=20, normalize=norm).fit(fs)
        auc[norm] = run.summary_["roc_auc"]["mean"]
    assert auc["donor-center"] > auc["standard"] + 0.05, auc  # the donor offsets removed
    assert [n for n, _ in make_head("logreg", scale=False).steps] == ["clf"]
    ref = ProbeRun(
        head="prototype", n_boot=20, normalize="donor-center", engine="reference", final_head=False
    )
    assert ref.fit(fs).summary_["roc_auc"]["mean"] == pytest.approx(auc["donor-center"], abs=1e-9)
    from tprobe.runs.record import RunRecord

    record = RunRecord.load(run.save(tmp_path))
    assert record.options["normalize"] == "donor-center" and "normalize donor-center" in record.title
    a = LabelCurve(head="prototype", shots=("all",), repeats=1).fit(fs).results_["roc_auc"].mean()
    b = LabelCurve(head="prototype", shots=("all",), repeats=1, normalize="donor-center").fit(fs).results_
    assert b["roc_auc"].mean() > a + 0.05
    from tprobe.errors import TprobeError

    with pytest.raises(TprobeError, match="--normalize 'z'"):
        ProbeRun(normalize="z").fit(fs)


def test_predict_centres_new_images_per_donor_for_a_donor_centred_run(tmp_path, tiny_reg):
    from conftest import copy_subset

    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover, discover_unlabelled
    from tprobe.data.preprocess import preprocess
    from tprobe.features.sources import donor_center, from_store
    from tprobe.models.backbones import resolve_model
    from tprobe.probing.predict import predict

    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2", "donor_3"), per_class=5)
    ref, cache = resolve_model(str(tiny_reg)), tmp_path / "cache"
    store = extract(preprocess(discover(data)), ref, cache=cache, progress=False).path
    run = ProbeRun(head="logreg", n_boot=20, normalize="donor-center").fit(from_store(store, "cls"))
    run_dir = run.save(tmp_path / "runs")
    new = copy_subset(tmp_path / "new", donors=("donor_4",), per_class=4)
    table = predict(run_dir, new, cache=cache)
    fs = from_store(
        extract(preprocess(discover_unlabelled(new)), ref, cache=cache, progress=False).path, "cls"
    )
    orig = (fs.meta["view"] == "orig").to_numpy()
    want = run.final_["model"].predict_proba(donor_center(fs.X, fs.meta["donor"], orig))[:, 1][orig]
    got = table.set_index(table["path"].map(lambda p: p.split("/")[-1]))["p_activated"]
    names = fs.meta.loc[orig, "path"].map(lambda p: p.split("/")[-1])
    assert np.allclose(got.loc[names].to_numpy(), want, atol=1e-6)


@pytest.mark.parametrize(
    "leak", ["Unnamed: 0", "index", "level_0", "Group_Index", "Group_Number", "Image_Group_Index"]
)
def test_a_row_counter_is_an_identifier_not_a_feature(tmp_path, leak):
    """pandas writes its row index as 'Unnamed: 0' (to_csv's default) or 'index'/'level_0'
    (reset_index); CellProfiler counts images in 'Group_Index'/'Group_Number'. In a table sorted by
    class, each counter is the label: a feature it must never be."""
    from tprobe.features.sources import column_rule, from_table

    n = 40
    manifest = pd.DataFrame(
        {
            "image_id": [f"c{i}_orig" for i in range(n)],
            "path": [f"donor_{i % 4 + 1}/x{i}.png" for i in range(n)],
            "label": [int(i < n // 2) for i in range(n)],
            "donor": [f"donor_{i % 4 + 1}" for i in range(n)],
            "group": [f"c{i}" for i in range(n)],
            "view": "orig",
            "kept": True,
        }
    )
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"file": [f"x{i}.png" for i in range(n)], "Intensity_A": rng.normal(size=n)})
    if leak == "Unnamed: 0":
        table.to_csv(tmp_path / "cp.csv")  # pandas' default: the index written as a first, unnamed column
    else:
        table.insert(1, leak, np.arange(n))
        table.to_csv(tmp_path / "cp.csv", index=False)
    fs = from_table(tmp_path / "cp.csv", manifest)
    assert fs.source.columns == ["Intensity_A"], fs.source.columns
    assert fs.source.dropped_columns[leak].startswith("identifier")
    assert leak in column_rule(pd.read_csv(tmp_path / "cp.csv"), "file", keep=[leak])[0]  # --keep-columns


@pytest.mark.parametrize(
    "name",
    [
        "Cells_Neighbors_FirstClosestObjectNumber_Adjacent",  # a neighbour's ObjectNumber
        "Cells_Neighbors_SecondClosestObjectNumber_5",
        "TrackObjects_ParentImageNumber_50",  # a parent's ImageNumber / ObjectNumber
        "TrackObjects_ParentObjectNumber_50",
        "TrackObjects_Label_50",  # a track's id
        "Image_Group_Length",
        "Image_Series_DNA",  # the image's index in its file
        "Image_Frame_DNA",
        "Image_ExecutionTime_01Images",  # the pipeline's timing and error flags, not the cell's
        "Image_ModuleError_01Images",
    ],
)
def test_cellprofiler_bookkeeping_with_a_suffix_is_not_a_feature(name):
    """CellProfiler's object and image numbers also sit inside longer names (a neighbour's, a track
    parent's), and its image tables carry the pipeline's own bookkeeping: none is a cell's feature."""
    from tprobe.features.sources import column_rule

    table = pd.DataFrame({"file": ["a.png", "b.png"], name: [1.0, 2.0], "Cells_AreaShape_Area": [3.0, 4.0]})
    cols, dropped = column_rule(table, "file")
    assert cols == ["Cells_AreaShape_Area"] and dropped[name].startswith("identifier"), (cols, dropped)


@pytest.mark.refuses("a feature-table column that is the label itself (one value per class)")
@pytest.mark.parametrize(
    ("name", "code"),
    [("activated", lambda y: y), ("class", lambda y: 1 - y), ("y", lambda y: y + 1.0)],
)
def test_a_column_that_is_the_label_is_one_line_not_a_feature(sample_manifest, tmp_path, name, code):
    """A table's own class column (activated 0/1, class 1-label, y 1/2) was a feature: the probe read
    the answer and scored AUC 1.0 without a word."""
    from tprobe.errors import TprobeError
    from tprobe.features.sources import from_table

    table = leak_table(sample_manifest, "")
    orig = sample_manifest[sample_manifest["view"] == "orig"]
    table[name] = code(orig["label"].to_numpy())
    table.to_csv(tmp_path / "cp.csv", index=False)
    with pytest.raises(TprobeError, match=rf"cp.csv: column '{name}' is the label .*--drop-columns {name}"):
        from_table(tmp_path / "cp.csv", sample_manifest)
    fs = from_table(tmp_path / "cp.csv", sample_manifest, exclude=[name])
    assert fs.source.columns == ["Intensity_A", "Intensity_B", "Texture_C"]
    # a two-valued column that is not the label (one row off) stays a feature
    table.loc[0, name] = code(1 - orig["label"].to_numpy()[:1])[0]
    table.to_csv(tmp_path / "cp.csv", index=False)
    assert name in from_table(tmp_path / "cp.csv", sample_manifest).source.columns

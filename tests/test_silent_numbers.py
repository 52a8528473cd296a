"""Silent wrong numbers in probing and reporting (second review): each case is refused or counted, never scored."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
from conftest import copy_subset


# ---- 1. --all-table-rows: unreadable and duplicate images are never scored ------------------------------
def test_all_table_rows_never_scores_unreadable_or_duplicate_images(tmp_path):
    """An unreadable image (no image id, no group) and a duplicate file (another image's cell) were scored
    with --all-table-rows: a row with an empty id and group, and one cell counted twice."""
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.features.sources import from_table, table_note

    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2"), per_class=3)
    first = sorted((data / "donor_1" / "activated").glob("*.png"))[0]
    shutil.copy(first, data / "donor_2" / "activated" / "copy_of_first.png")  # the same cell, another donor
    (data / "donor_2" / "quiescent" / "broken.png").write_bytes(b"not a png")
    manifest = preprocess(discover(data), progress=False).manifest
    orig = manifest[manifest["view"] == "orig"]
    assert set(orig["drop_reason"]) >= {"unreadable", "duplicate"}
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "FileName": orig["path"].map(lambda p: "/".join(p.split("/")[-3:])).to_numpy(),
            "Intensity_A": rng.normal(size=len(orig)),
            "Texture_B": rng.normal(size=len(orig)),
        }
    )
    table.to_csv(tmp_path / "cp.csv", index=False)
    fs = from_table(tmp_path / "cp.csv", manifest, all_rows=True)
    assert (fs.meta["image_id"] != "").all() and (fs.meta["group"] != "").all()
    assert not fs.meta["group"].duplicated().any()  # each cell scored once
    assert len(fs.meta) == len(orig) - 2
    unused = fs.source.unused_rows
    assert unused["filtered"] == {"activated": 1, "quiescent": 1}
    assert unused["not_scorable"] == {"duplicate": 1, "unreadable": 1}
    note = " ".join(table_note(fs.source))
    assert "2 name unreadable or duplicate images" in note and "never scored" in note
    # the same rows without --all-table-rows: filtered, as before
    plain = from_table(tmp_path / "cp.csv", manifest)
    assert len(plain.meta) == int(orig["kept"].sum()) and "not_scorable" not in plain.source.unused_rows
    # a manifest saved without drop_reason: the ids tell
    fs2 = from_table(tmp_path / "cp.csv", manifest.drop(columns="drop_reason"), all_rows=True)
    assert fs2.meta["image_id"].tolist() == fs.meta["image_id"].tolist()
    assert fs2.source.unused_rows == unused

"""Finding images and their labels, donors and cells.

Three layouts are accepted:

(a) ``DIR/donor_<N>/{activated,quiescent}/*.png`` (the bundled sample's layout), or
    ``DIR/{activated,quiescent}/*.png`` (each image's donor from its Wang et al. name, else
    ``donor_unknown``);
(b) a flat folder of Wang et al. names ``CD{3|8}_{donor}_{act|noact}_{batch}_{plate}_{cell}.png``;
(c) a CSV or Parquet table with at least ``path,label`` (paths relative to the table's folder),
    optional ``donor`` and any other columns (kept as they are).

With one file per channel (``channel_files="{cell}_{channel}"`` and the ``channels`` names), the
files of each cell are grouped into one row whose ``path`` is a template holding ``{channel}``
(:func:`tprobe.data.images.channel_files`); a table may list such templates itself.

Files that cannot be used are returned as :class:`Skipped` rows with a reason naming the fix (among
them a Wang-named file whose name gives another label, or another donor number, than its folders). A
class folder holding a folder of the other class (a donor folder named ``1``, which reads as
activated, holding ``quiescent/``) is one line: the path gives two labels.
Symlinked donor, class and image folders are followed; a link back to a folder above it (a loop)
is not, and is listed as skipped, so no folder is lost without a line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tprobe.data import images
from tprobe.errors import TprobeError

if TYPE_CHECKING:  # pandas (~0.2 s) on use: `tprobe --help` builds its options without it
    import pandas as pd

__all__ = [
    "Dataset",
    "Skipped",
    "discover",
    "discover_unlabelled",
    "parse_wang_name",
    "DEFAULT_DATA",
    "table_rows",
    "check_donors",
]

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "tcell-sample"

WANG_NAME = re.compile(
    r"^(?P<cell_type>CD\d+)_(?P<donor>\d+)_(?P<cond>act|noact)_(?P<batch>\d+)_(?P<plate>\d+)_(?P<cell>\d+)$",
    re.IGNORECASE,
)
LABEL_NAMES = {
    "activated": 1,
    "act": 1,
    "active": 1,
    "1": 1,
    "quiescent": 0,
    "noact": 0,
    "nonactivated": 0,
    "non-activated": 0,
    "inactive": 0,
    "0": 0,
}
COLUMNS = ["path", "label", "donor", "cell_type", "batch", "plate", "cell"]
# images in formats tprobe does not read: each has a line where it sits beside readable ones
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jp2", ".czi", ".nd2", ".lif")


@dataclass(frozen=True)
class Skipped:
    """A file left out, with the reason and the fix in one line."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.reason.find(self.path) < 0 else self.reason


@dataclass
class Dataset:
    """The images found: one row per file (``COLUMNS``), plus the files left out."""

    root: Path
    table: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    layout: str = ""


def parse_wang_name(name: str) -> dict | None:
    """Parse ``CD3_1_act_9_1_12.png`` (or a template ``CD3_1_act_9_1_12_{channel}.tif``) into its fields."""
    stem = re.sub(r"[_\-. ]*\{channel\}[_\-. ]*", "", Path(name).stem)
    m = WANG_NAME.match(stem)
    if not m:
        return None
    return {
        "cell_type": m["cell_type"].upper(),
        "donor": f"donor_{int(m['donor'])}",
        "label": 1 if m["cond"].lower() == "act" else 0,
        "batch": int(m["batch"]),
        "plate": int(m["plate"]),
        "cell": int(m["cell"]),
    }


def discover(data: str | Path | None = None, *, channel_files: str | None = None, channels=()) -> Dataset:
    """Find the images under ``data`` (folder or table; default: the bundled sample).

    ``channel_files`` (a stem pattern such as ``{cell}_{channel}``) with the ``channels`` names groups
    one-file-per-channel images into one row per cell.
    """
    root = Path(data) if data is not None else DEFAULT_DATA
    if not root.exists():
        raise TprobeError(f"{root}: no such file or folder; pass --data with your image folder")
    group = (channel_files, tuple(channels)) if channel_files else None
    if root.is_file():
        ds = _from_table(root)
    elif any(
        p.is_dir() and _label_of(p.name) is not None and not p.parent.name.startswith(".")
        for p in root.glob("*/*")
    ) or any(p.is_dir() and _label_of(p.name) is not None for p in root.iterdir()):
        ds = _from_folders(root, group)
    else:
        ds = _from_flat(root, group)
    ds.skipped = list(dict.fromkeys(ds.skipped))  # a loop seen from two walks is listed once
    if ds.table.empty:
        raise TprobeError(
            f"{root}: no usable images found ({len(ds.skipped)} skipped); expected "
            "donor_N/{activated,quiescent}/*.png, Wang-style file names, or a CSV with path,label"
        )
    ds.table = ds.table.sort_values("path", kind="stable").reset_index(drop=True)
    return ds


def discover_unlabelled(data: str | Path, *, channel_files: str | None = None, channels=()) -> Dataset:
    """Every image under ``data`` (file or folder) for prediction; label -1 where unknown.

    A donor is its Wang name's, else the folder above its class folder (``donor_7/activated/x.png``,
    below ``data``), as :func:`discover` reads it, else ``unknown``.
    """
    root = Path(data)
    if not root.exists():
        raise TprobeError(f"{root}: no such file or folder; pass the images to label")
    group = (channel_files, tuple(channels)) if channel_files else None
    skipped: list[Skipped] = []
    if root.is_file() and group:  # one channel file names its cell: group it with its sibling files
        files = [
            Path(t)
            for t in images.channel_files(_images(root.parent), *group)[0]
            if any(Path(t.replace(images.CHANNEL, c)) == root for c in channels)
        ]
        if not files:
            raise TprobeError(
                f"{root}: does not fit --channel-files {channel_files!r} with channels "
                f"{','.join(channels)}; pass the folder or a file named like the run's images"
            )
    else:
        files = [root] if root.is_file() else _cells(root, group, skipped)
    rows = []
    for path in files:
        parsed = parse_wang_name(path.name) or {}
        folder = _label_of(path.parent.name)
        label = parsed.get("label", folder if folder is not None else -1)
        above = path.parent.parent  # a class folder's donor folder, as discover reads it
        donor = above.name if folder is not None and above != root and not parsed else None
        rows.append(
            {**parsed, "path": str(path), "label": label, "donor": donor or parsed.get("donor", "unknown")}
        )
    if not rows:
        raise TprobeError(f"{root}: no .png/.tif images found")
    return Dataset(root, _frame(rows), list(dict.fromkeys(skipped)), "unlabelled")


def _label_of(name: str) -> int | None:
    return LABEL_NAMES.get(name.lower())


def table_rows(table_path: Path, *rows: int) -> str:
    """Rows of a CSV/Parquet table (0-based data rows) as a person finds them: CSV line numbers
    counting the header as line 1, Parquet rows counted from 1."""
    csv = Path(table_path).suffix.lower() == ".csv"
    nums = " and ".join(str(r + (2 if csv else 1)) for r in rows)
    word = ("line" if csv else "row") + ("s" if len(rows) > 1 else "")
    return f"{word} {nums} ({'line 1 is the header' if csv else 'counted from 1'})"


def listed_once(table_path: Path, seen: dict, i: int, path: Path, shown, what: str) -> None:
    """Refuse a table's ``i``-th row when an earlier one (``seen``: resolved path -> row) lists the same file."""
    same = os.path.normpath(os.path.abspath(path))
    if same in seen:
        raise TprobeError(
            f"{table_path}: {table_rows(table_path, seen[same], i)} both list {shown}; keep one row per {what}"
        )
    seen[same] = i


def _walk(top: Path, skipped: list | None = None) -> tuple[list[Path], list[Path]]:
    """Every folder and every other entry under ``top``, in name order, following symlinked folders.

    A folder that is one of its own ancestors (a symlink loop) is not entered and is listed in
    ``skipped``; ancestors above ``top`` count too, so a walk started inside a tree still sees them.
    Hidden entries (names starting with '.': macOS's ``._NAME.png`` and ``.DS_Store``, ``.git``,
    a viewer's ``.thumbnails``) are left out, as most tools do; ``top`` itself is walked whatever its name.
    """
    skipped = [] if skipped is None else skipped
    folders: list[Path] = []
    files: list[Path] = []

    def key(path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def visit(folder: Path, above: set) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(
                Skipped(str(folder), f"folder cannot be listed ({exc.strerror}); fix its permissions")
            )
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows a symlink
                k = key(path) if is_dir else None
            except OSError:
                is_dir = False
            if not is_dir and entry.is_symlink() and not path.exists():
                skipped.append(
                    Skipped(
                        str(path),
                        f"symlink to {os.readlink(path)}, which does not exist; fix or remove the link",
                    )
                )
            elif not is_dir:
                files.append(path)
            elif k in above:
                skipped.append(
                    Skipped(
                        str(path),
                        f"symlink loops back to {os.path.realpath(path)}, a folder "
                        "above it; not followed: remove the link or point it elsewhere",
                    )
                )
            else:
                folders.append(path)
                visit(path, above | {k})

    real = Path(os.path.realpath(top))
    visit(top, {key(a) for a in (real, *real.parents)})
    return folders, files


def _images(folder: Path, skipped: list | None = None) -> list[Path]:
    return sorted(p for p in _walk(folder, skipped)[1] if p.suffix.lower() in images.IMAGE_SUFFIXES)


def _cells(folder: Path, group, skipped: list) -> list[Path]:
    """The images under ``folder``: files, or per-channel files grouped into ``{channel}`` templates."""
    files = _images(folder, skipped)
    if not group:
        return files
    pattern, channels = group
    templates, other = images.channel_files(files, pattern, channels)
    skipped += [
        Skipped(
            f,
            f"file name does not fit --channel-files {pattern!r} with channels "
            f"{','.join(channels)}; rename it or move it out",
        )
        for f in other
    ]
    return [Path(t) for t in templates]


def _from_folders(root: Path, group=None) -> Dataset:
    rows, skipped = [], []
    for sub in sorted(_walk(root, skipped)[0]):
        if any(_label_of(part) is not None for part in sub.relative_to(root).parts[:-1]):
            continue  # nested inside a label folder: read with it
        direct = [
            p
            for p in sub.iterdir()
            if p.suffix.lower() in images.IMAGE_SUFFIXES and not p.name.startswith(".")
        ]
        label = _label_of(sub.name)
        if label is None:
            if direct and not any(_label_of(c.name) is not None for c in sub.iterdir()):
                skipped += [
                    Skipped(
                        str(p),
                        f"folder '{sub.name}' is not a label name; rename it to 'activated' or 'quiescent'",
                    )
                    for p in direct
                ]
            continue
        sub_folders, sub_files = _walk(sub)  # once: the checks below read both
        inner = next(  # a numbered folder inside a named class (quiescent/1/: a plate) is no class
            (
                f
                for f in sub_folders
                if _label_of(f.name) not in (None, label) and (sub.name.isdigit() or not f.name.isdigit())
            ),
            None,
        )
        if inner is not None:  # a donor folder '1' holding quiescent/: which label, the path cannot say
            raise TprobeError(
                f"{sub}: the folder name '{sub.name}' reads as label {label} "
                f"({'activated' if label else 'quiescent'}) but '{inner.relative_to(sub)}' inside it "
                f"reads as label {_label_of(inner.name)}; rename the outer folder if it is a donor "
                f"(e.g. 'donor_{sub.name}'), or the inner one if it is not a class"
            )
        donor = sub.parent.name if sub.parent != root else None  # no donor folder: the name's donor
        cells = _cells(sub, group, skipped)
        if donor is None:  # DIR/activated/donor_1/x.png: donors inside the class would all be one donor
            _refuse_inner_donor(root, sub, cells)
        other = [
            f
            for f in sub_files
            if not f.name.startswith(".") and f.suffix.lower() not in images.IMAGE_SUFFIXES
        ]
        if not cells and other:  # never lose a class without a line
            skipped.append(
                Skipped(
                    str(sub),
                    f"class folder holds no .png/.tif image ({len(other)} other file(s), "
                    f"e.g. {other[0].name}); convert them to PNG or TIFF",
                )
            )
        elif cells:  # nor an image beside the class's readable ones
            skipped += _unread(other)
        for path in cells:
            parsed = parse_wang_name(path.name) or {}
            if parsed and parsed["label"] != label:
                skipped.append(
                    Skipped(
                        str(path),
                        f"name says label {parsed['label']} but folder "
                        f"'{sub.name}' says {label}; move or rename the file",
                    )
                )
                continue
            number = re.fullmatch(r"(?:donor[_\- ]?)?(\d+)", donor or "", re.IGNORECASE)
            if parsed and number and f"donor_{int(number[1])}" != parsed["donor"]:
                skipped.append(
                    Skipped(
                        str(path),
                        f"name says {parsed['donor']} but folder '{donor}' says donor_{int(number[1])}; "
                        "move or rename the file",
                    )
                )
                continue
            rows.append(
                {
                    **parsed,
                    "path": str(path),
                    "label": label,
                    "donor": donor or parsed.get("donor", "donor_unknown"),
                }
            )
    listed = {s.path for s in skipped}
    for path in _images(root):  # beside the donor folders, or beside a donor's class folders
        inside = any(_label_of(part) is not None for part in path.relative_to(root).parts[:-1])
        if not inside and str(path) not in listed:
            skipped.append(
                Skipped(
                    str(path),
                    "not inside an activated or quiescent folder, so its class is unknown; move it "
                    "into one (DIR/donor_N/activated/) or list it in a CSV manifest",
                )
            )
    return Dataset(root, _frame(rows), skipped, "folders")


def _refuse_inner_donor(root: Path, sub: Path, cells: list[Path]) -> None:
    """A donor folder inside a class folder (``DIR/activated/donor_1/``) holding images whose names give
    no donor is one line: read as the documented layouts read it, every such image is ``donor_unknown``."""
    for path in cells:
        inner = next((p for p in path.relative_to(sub).parents if p.name.lower().startswith("donor")), None)
        if inner is not None and parse_wang_name(path.name) is None:
            raise TprobeError(
                f"{sub / inner}: a donor folder inside the class folder '{sub.name}', whose images "
                f"would all be read as one donor (donor_unknown); put the donor folders first "
                f"({root}/donor_N/activated/, {root}/donor_N/quiescent/) or list the images in a CSV "
                "with path,label,donor"
            )


def _unread(files) -> list[Skipped]:
    """A line for each image in a format tprobe does not read."""
    return [
        Skipped(str(f), f"a {f.suffix} image; tprobe reads PNG and TIFF: convert it (losslessly)")
        for f in files
        if f.suffix.lower() in OTHER_IMAGE_SUFFIXES
    ]


def _from_flat(root: Path, group=None) -> Dataset:
    rows, skipped = [], []
    skipped += _unread(f for f in _walk(root)[1] if not f.name.startswith("."))
    for path in _cells(root, group, skipped):
        parsed = parse_wang_name(path.name)
        if parsed is None:
            skipped.append(
                Skipped(
                    str(path),
                    "file name does not parse; rename it "
                    "CD3_<donor>_<act|noact>_<batch>_<plate>_<cell>.png, put it in "
                    "an activated/quiescent folder, or list it in a CSV manifest",
                )
            )
            continue
        rows.append({**parsed, "path": str(path)})
    return Dataset(root, _frame(rows), skipped, "flat")


def _from_table(table_path: Path) -> Dataset:
    import pandas as pd

    suffix = table_path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise TprobeError(f"{table_path}: expected a folder, .csv or .parquet manifest")
    try:
        df = pd.read_csv(table_path) if suffix == ".csv" else pd.read_parquet(table_path)
    except pd.errors.EmptyDataError:
        raise TprobeError(
            f"{table_path}: the manifest is empty; it needs a header row path,label[,donor]"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise TprobeError(
            f"{table_path}: cannot be read as a manifest ({type(exc).__name__}); "
            "save it as CSV or Parquet with columns path,label[,donor]"
        ) from None
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise TprobeError(f"{table_path}: manifest lacks column(s) {sorted(missing)}; it needs path,label")
    if "crop_id" in df.columns:  # read back as a field crop's own hash when a saved folder is opened
        raise TprobeError(
            f"{table_path}: column crop_id is tprobe's own (a field crop's file hash); rename it"
        )
    check_donors(table_path, df)
    rows, skipped, seen = [], [], {}
    for i, rec in enumerate(df.to_dict("records")):
        path = Path(str(rec["path"]))
        path = path if path.is_absolute() else table_path.parent / path
        listed_once(table_path, seen, i, path, rec["path"], "image")
        label = _label_of(str(rec["label"]).strip().removesuffix(".0"))
        if label is None:
            skipped.append(
                Skipped(
                    str(path),
                    f"label '{rec['label']}' is not one of activated/quiescent/1/0; fix the manifest row",
                )
            )
            continue
        rows.append(
            {
                **rec,
                "path": str(path),
                "label": label,
                "donor": str(rec.get("donor", "donor_unknown")).strip(),
            }
        )
    return Dataset(table_path, _frame(rows), skipped, "table")


def check_donors(table_path: Path, df: pd.DataFrame) -> None:
    """A table's donor column, where it has one, must name a donor on every row (an empty one reads as NaN)."""
    if "donor" in df.columns:
        empty = df["donor"].isna() | (df["donor"].astype(str).str.strip() == "")
        if empty.any():
            rows = (np.flatnonzero(empty.to_numpy()) + 2).tolist()  # +2: header line, 1-based
            raise TprobeError(
                f"{table_path}: {int(empty.sum())} row(s) have an empty donor (line {rows[0]}"
                f"{', ...' if len(rows) > 1 else ''}); fill the donor column (probes hold out donors: "
                "each cell's donor is needed)"
            )


def _frame(rows: list[dict]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    rest = [c for c in df.columns if c not in COLUMNS]
    df = df[COLUMNS + rest]
    df["label"] = df["label"].astype("int64") if len(df) else df["label"]
    df["donor"] = df["donor"].astype(str)
    for col in ("batch", "plate", "cell"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["cell_type"] = df["cell_type"].astype("string")
    return df

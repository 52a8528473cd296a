"""Rerun the commands behind the numbers in the docs and compare them with the docs (issue #19).

Every table and output block with numbers in README.md, docs/**/*.md and cache/README.md carries a
marker on the line right above it (blank lines between are allowed):

    <!-- check: NAME -->                      rerun check NAME of CHECKS below and compare
    <!-- check: skip (why, e.g. timing) -->   listed as skipped, with the reason

A marker applies to the block that follows it: a fenced block, a table, or a paragraph (the lines up
to the next blank line). A check names the commands it reruns (``about``), the numbers of the block
it compares (``select``: a regex; with groups, every group of every match, else every match; by
default every decimal number) and how it recomputes them (``produce``: the documented commands, run
with the bundled sample and a random model, then their printed output or the files they write).
Numbers are compared at the precision the doc prints them (``0.934`` matches 0.9336): exactly for
deterministic outputs, or within the check's stated ``tol`` on top of that.

Unmarked blocks: a table or an output block (a fence without a language, or ``text``/``console``)
that holds a decimal number and has no marker is an error, so a new number cannot slip in unchecked.
Prose numbers are only checked where a paragraph is marked.

    python scripts/check_docs.py            # every check (the full set reruns minutes of work)
    python scripts/check_docs.py --fast     # only the checks that fit in CI (~1-2 min on 2 cores)
    python scripts/check_docs.py --list     # every checked / skipped / unmarked block, nothing run
    python scripts/check_docs.py --only report-paired --workdir /tmp/cd   # one check, reusing a folder

Exit status: 0 all compared numbers match; 1 a mismatch (file:line, the doc's number and the
recomputed one), a failed command, an unmarked number block, an unknown check name or a skip
without its reason (``--list`` exits 1 on the last three too); 2 a bad option.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*<!--\s*check:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
# a decimal number, not part of a version (0.2.0), a name (ViT-S/14) or a word (99.5th)
DECIMAL = r"(?<![\w.])[-−]?\d+\.\d+(?![\w.]|\.\d)"
OUTPUT_FENCES = {"", "text", "console", "output"}


class CheckFailed(Exception):
    """A check's command failed or its output could not be read."""


# ---------------------------------------------------------------------------------------------------
# the work folder: the documented commands, each run once and shared by the checks that need it


class Work:
    def __init__(self, folder: Path, verbose: bool = True):
        self.dir = folder
        self.verbose = verbose
        self._memo: dict[str, object] = {}
        self.env = dict(os.environ)
        # the checkout's own tprobe, whatever the environment's editable install points at
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.setdefault("HF_HUB_OFFLINE", "1")

    def once(self, key: str, fn: Callable[[], object]):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def sh(self, *args: str) -> str:
        if self.verbose:
            print(f"  $ {' '.join(args)}", file=sys.stderr, flush=True)
        res = subprocess.run(args, cwd=self.dir, env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise CheckFailed(f"`{' '.join(args)}` exited {res.returncode}: {tail}")
        return res.stdout

    def tprobe(self, *args: str) -> str:
        return self.sh(sys.executable, "-m", "tprobe.cli", *args)

    def python(self, *args: str) -> str:
        return self.sh(sys.executable, *args)


def last_line(out: str) -> str:
    return out.strip().splitlines()[-1].strip()


def preprocess(w: Work) -> str:
    return w.once("preprocess", lambda: w.tprobe("preprocess"))


def table(w: Work) -> str:
    """The CellProfiler-style table of the bundled sample (scripts/cellprofiler_like.py)."""

    def make():
        w.python(str(ROOT / "scripts" / "cellprofiler_like.py"), "--out", "cellprofiler_sample.csv")
        return "cellprofiler_sample.csv"

    return w.once("table", make)


TABLE = ("--features", "cellprofiler_sample.csv", "--id-column", "FileName")


def run(w: Work, *args: str) -> str:
    """Run one ``tprobe probe`` / ``tprobe baseline`` command; its run folder (last line of stdout)."""
    return w.once("run " + " ".join(args), lambda: last_line(w.tprobe(*args)))


def report(w: Work, runs: str, out: str, *args: str) -> tuple[str, Path]:
    text = w.once(f"report {runs} {out} {args}", lambda: w.tprobe("report", runs, "--out", out, *args))
    return text, w.dir / out


def read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path)


def random_store(w: Work) -> str:
    """The random ViT-S/14-reg model of the README and its store of the bundled sample."""

    def make():
        # seeded, so a model left in a reused --workdir is the same model (and its store is up to date)
        if not (w.dir / "models" / "random-vits14-reg" / "config.json").is_file():
            w.python(
                "-c",
                "from tprobe.testing import save_random_dinov2; "
                "save_random_dinov2('models/random-vits14-reg', shape='small')",
            )
        return last_line(w.tprobe("extract", "--model", "models/random-vits14-reg"))

    preprocess(w)
    return w.once("random_store", make)


# ---------------------------------------------------------------------------------------------------
# the producers: each reruns the documented commands and returns the numbers in the block's order


def tour_counts(w: Work) -> list[float]:
    """README tour: `tprobe preprocess` -> images found, cells kept, views per cell."""
    total = next(line for line in preprocess(w).splitlines() if line.startswith("total"))
    n = [int(v) for v in total.split()[1:]]
    found, kept, views = n[0], n[-2], n[-1]
    return [found, kept, views / kept]


def sample_counts(w: Work) -> list[float]:
    """README tour: images and donors of the bundled sample."""
    lines = preprocess(w).splitlines()
    total = next(line for line in lines if line.startswith("total"))
    donors = {line.split()[0] for line in lines if line.startswith("donor_")}
    return [int(total.split()[1]), len(donors)]


REPORT_RUNS = "runs-table"  # a fresh folder: `tprobe report runs/` over older runs compares them all


def fresh(w: Work, folder: str) -> None:
    """Empty a runs folder of an earlier call in a reused --workdir (a report compares every run in it)."""
    w.once("fresh " + folder, lambda: shutil.rmtree(w.dir / folder, ignore_errors=True))


def report_runs(w: Work) -> dict[str, str]:
    preprocess(w)
    table(w)
    fresh(w, REPORT_RUNS)
    out = ("--out", REPORT_RUNS)
    return {
        "logreg": run(w, "probe", *TABLE, "--head", "logreg", *out),
        "knn": run(w, "probe", *TABLE, "--head", "knn", *out),
        "frequency": run(w, "baseline", "--name", "frequency", *out),
        "pixel-logreg": run(w, "baseline", "--name", "pixel-logreg", *out),
    }


def report_default(w: Work) -> list[float]:
    """science.md: the table logreg run's AUC, CI, Brier and ECE in `tprobe report runs-table/`."""
    runs = report_runs(w)
    _, out = report(w, REPORT_RUNS, "report-table")
    s = read_csv(out / "summary.csv")
    row = s[s["run"].str.endswith(Path(runs["logreg"]).name)].iloc[0]
    return [
        row[c]
        for c in ("roc_auc_mean", "roc_auc_sd", "roc_auc_ci_low", "roc_auc_ci_high", "brier_mean", "ece_mean")
    ]


def report_paired(w: Work) -> list[float]:
    """science.md: `tprobe report runs-table/ --reference <table logreg run>`, AUC rows of paired.csv."""
    runs = report_runs(w)
    _, out = report(w, REPORT_RUNS, "report-table-ref", "--reference", Path(runs["logreg"]).name)
    p = read_csv(out / "paired.csv")
    p = p[p["metric"] == "roc_auc"]
    nums: list[float] = []
    for key in ("pixel-logreg", "frequency", "knn"):
        row = p[p["run"].str.endswith(Path(runs[key]).name)].iloc[0]
        nums += [row["mean_diff"], row["p"], row["p_holm"]]
    return nums


def baselines(w: Work) -> tuple[str, Path]:
    preprocess(w)
    fresh(w, "runs-baselines")
    run(w, "baseline", "--name", "all", "--out", "runs-baselines")
    return report(w, "runs-baselines", "report-baselines")


def baselines_block(w: Work) -> list[float]:
    """training.md: `tprobe baseline --name all --out runs-baselines && tprobe report runs-baselines`."""
    text, out = baselines(w)
    s = read_csv(out / "summary.csv")
    nums: list[float] = []
    for _, row in s.iterrows():
        for m in ("accuracy", "average_precision", "roc_auc"):
            nums += [row[f"{m}_mean"], row[f"{m}_sd"]]
    published = text.split("== published", 1)[1].split("\n", 1)[1]
    for line in published.splitlines():
        if not line.startswith(" ") and not line.startswith("Wang") and not line.startswith("DINOv2"):
            break
        nums += [
            float(x)
            for x in re.findall(DECIMAL, line.split("Wang et al. 2019", 1)[-1].split("Table 3", 1)[-1])
        ]
    return nums


def baselines_prose(w: Work) -> list[float]:
    """training.md: the pixel-logreg and LeNet mean AUCs quoted after the block."""
    _, out = baselines(w)
    s = read_csv(out / "summary.csv").set_index("model")
    return [s.loc["pixel-logreg", "roc_auc_mean"], s.loc["lenet", "roc_auc_mean"]]


def curve_sources(w: Work) -> list[float]:
    """science.md: `tprobe curve --model models/random-vits14-reg --features ... --pixels`."""
    random_store(w)
    table(w)
    out = w.once(
        "curve_sources",
        lambda: last_line(
            w.tprobe(
                "curve", "--model", "models/random-vits14-reg", *TABLE, "--pixels", "--out", "curve-sources"
            )
        ),
    )
    return curve_rows(w.dir / out, ["table", "pixel", "random"])


def curve_rows(folder: Path, order: list[str]) -> list[float]:
    band = read_csv(folder / "curve_band.csv")
    nums: list[float] = []
    for key in order:
        rows = band[band["source"].astype(str).str.contains(key) & (band["head"] == "logreg")]
        for shots in ("1", "2", "8", "64", "all"):
            r = rows[rows["shots"].astype(str) == shots].iloc[0]
            nums.append(r["mean"])
            if shots in ("1", "all"):
                nums += [r["low"], r["high"]]
    return nums


def map_table(w: Work) -> list[float]:
    """science.md: `tprobe map --model models/random-vits14-reg --features ... --pixels`."""
    random_store(w)
    table(w)
    out = w.once(
        "map",
        lambda: last_line(
            w.tprobe("map", "--model", "models/random-vits14-reg", *TABLE, "--pixels", "--out", "map")
        ),
    )
    diag = json.loads((w.dir / out / "diagnostics.json").read_text())
    return map_rows(diag)


def map_rows(diags) -> list[float]:
    """The map table: the chances of its header, then per source (random store, table, pixels) accuracy
    and skill of activation, donor, batch, donor and batch within class, and the three silhouettes."""
    diags = list(diags.values()) if isinstance(diags, dict) else list(diags)

    def find(key: str) -> dict:
        return next(d for d in diags if key in str(d["source"]))

    first = find("random")
    p, wc = first["predictability"], first["within_class"]
    nums = [
        p["activation"]["chance"],
        p["donor"]["chance"],
        p["batch"]["chance"],
        wc["donor"]["chance"],
        wc["batch"]["chance"],
    ]
    for key in ("random", "table", "pixel"):
        d = find(key)
        p, wc, sil = d["predictability"], d["within_class"], d["silhouette"]
        for t in ("activation", "donor", "batch"):
            nums += [p[t]["accuracy"], p[t]["skill"]]
        for t in ("donor", "batch"):
            nums += [wc[t]["accuracy"], wc[t]["skill"]]
        nums += [sil["label"], sil["donor"], sil["batch"]]
    return nums


def removed_counts(w: Work) -> list[float]:
    """evaluation.md: cells kept against images, and the images the filters removed, by class."""
    lines = preprocess(w).splitlines()
    total = [int(v) for v in next(x for x in lines if x.startswith("total")).split()[1:]]
    removed = {"activated": 0, "quiescent": 0}
    for line in lines:
        parts = line.split()
        if parts and parts[0].startswith("donor_"):
            parts = parts[1:]
        if parts and parts[0] in removed:
            n = [int(v) for v in parts[1:]]
            removed[parts[0]] += n[0] - n[-2]
    return [total[-2], total[0], total[0] - total[-2], removed["activated"], removed["quiescent"]]


NORMALIZE_COLUMNS = (
    ("none",),
    ("standard",),
    ("donor-center",),
    ("standard", "--all-table-rows"),
    ("donor-center", "--all-table-rows"),
)


def normalize_table(w: Work) -> list[float]:
    """science.md: `tprobe probe --features ... --head H --normalize N [--all-table-rows] --no-final-head`."""
    preprocess(w)
    table(w)
    nums: list[float] = []
    for head in ("logreg", "knn", "prototype"):
        for norm, *extra in NORMALIZE_COLUMNS:
            args = (
                "probe",
                *TABLE,
                "--head",
                head,
                "--normalize",
                norm,
                *extra,
                "--no-final-head",
                "--out",
                "runs-normalize",
            )
            summary = json.loads((w.dir / run(w, *args) / "metrics.json").read_text())["summary"]
            nums += [summary["roc_auc"]["mean"], summary["accuracy"]["mean"]]
    return nums


def curve_heads(w: Work) -> list[float]:
    """science.md: `tprobe curve --model models/random-vits14-reg --head logreg,knn,prototype`."""
    random_store(w)
    out = w.once(
        "curve_heads",
        lambda: last_line(
            w.tprobe(
                "curve",
                "--model",
                "models/random-vits14-reg",
                "--head",
                "logreg,knn,prototype",
                "--out",
                "curve-heads",
            )
        ),
    )
    band = read_csv(w.dir / out / "curve_band.csv")

    def at(head: str, shots: str, col: str = "mean") -> float:
        return band[(band["head"] == head) & (band["shots"].astype(str) == shots)].iloc[0][col]

    return [
        *(at(h, k) for h in ("prototype", "knn", "logreg") for k in ("1", "8")),
        at("knn", "all"),
        at("knn", "all", "low"),
        at("knn", "all", "high"),
        at("logreg", "all"),
        at("prototype", "all"),
    ]


# ---------------------------------------------------------------------------------------------------
# the registry


@dataclass
class Check:
    about: str  # the commands it reruns, for --list
    produce: Callable[[Work], list[float]]
    fast: bool  # fits in CI (--fast)
    select: str = DECIMAL
    tol: float = 0.0  # beyond the doc's printed precision; 0 = exact
    why_tol: str = ""


CHECKS: dict[str, Check] = {
    "tour-preprocess": Check(
        "tprobe preprocess (counts: images found, cells kept, views per cell)",
        tour_counts,
        fast=True,
        select=r"(\d+) images -> (\d+) cells x (\d+) views",
    ),
    "sample-counts": Check(
        "tprobe preprocess (images and donors of the bundled sample)",
        sample_counts,
        fast=True,
        select=r"\((\d+) NAD\(P\)H images of T cells from (\d+) donors",
    ),
    "report-default": Check(
        "cellprofiler_like.py; probe --features (logreg, knn), baseline frequency, pixel-logreg --out runs-table; "
        "tprobe report runs-table",
        report_default,
        fast=True,
        select=r"AUC (\d\.\d+) ± (\d\.\d+),\s+95% CI\s+\[(\d\.\d+), (\d\.\d+)\];\s+Brier (\d\.\d+),\s+ECE (\d\.\d+)",
    ),
    "report-paired": Check(
        "the same four runs; tprobe report runs-table --reference <table logreg run> (paired.csv, AUC)",
        report_paired,
        fast=True,
    ),
    "table-rows": Check(
        "tprobe preprocess (cells kept, images, removed by class)",
        removed_counts,
        fast=True,
        select=r"(\d+) cells against (\d+) \((\d+) removed: (\d+) activated, (\d+) quiescent\)",
    ),
    "normalize-table": Check(
        "cellprofiler_like.py; 15 x tprobe probe --features ... --head H --normalize N [--all-table-rows] "
        "--no-final-head (metrics.json)",
        normalize_table,
        fast=False,
    ),
    "curve-heads": Check(
        "the random store; tprobe curve --model models/random-vits14-reg --head logreg,knn,prototype",
        curve_heads,
        fast=False,
        select=r"(?<![\w.])\d\.\d{3}(?!\d)",
    ),
    "baselines": Check(
        "tprobe baseline --name all --out runs-baselines; tprobe report runs-baselines (summary.csv, stdout)",
        baselines_block,
        fast=False,
        tol=0.002,
        why_tol="LeNet and the pixel MLP train with torch on the CPU: the thread count changes float sums",
    ),
    "baselines-prose": Check(
        "the same baseline runs (pixel-logreg and LeNet mean AUC)",
        baselines_prose,
        fast=False,
        tol=0.002,
        why_tol="LeNet trains with torch on the CPU (see baselines)",
        select=r"Pixel LR \((\d\.\d+)\).*?LeNet\s+\((\d\.\d+)\)",
    ),
    "curve-sources": Check(
        "save_random_dinov2(small); tprobe extract --model models/random-vits14-reg; "
        "tprobe curve --model models/random-vits14-reg --features ... --pixels (curve_band.csv)",
        curve_sources,
        fast=False,
    ),
    "map-sources": Check(
        "the random store; tprobe map --model models/random-vits14-reg --features ... --pixels (diagnostics.json)",
        map_table,
        fast=False,
    ),
}


# ---------------------------------------------------------------------------------------------------
# reading the docs


@dataclass
class Block:
    path: Path
    root: Path
    line: int  # 1-based line of the block's first line
    lines: list[str]
    kind: str  # fence | table | paragraph
    marker: str | None = None
    marker_line: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def where(self, offset: int = 0) -> str:
        return f"{rel(self.path, self.root)}:{self.line + offset}"


@dataclass
class Result:
    block: Block
    status: str  # ok | mismatch | failed | skipped | unmarked | unknown
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0


def rel(p: Path, root: Path = ROOT) -> str:
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def doc_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", root / "cache" / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Tables, fenced blocks and marked paragraphs of a Markdown file, with their markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    marker, marker_line = None, 0
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line)
        if m:
            marker, marker_line = m.group(1), i + 1
            i += 1
            continue
        if not line.strip():
            i += 1
            continue
        f = FENCE.match(line)
        if f:
            fence, lang = f.group(1), f.group(2)
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            out.append(Block(path, root, i + 2, lines[i + 1 : j], "fence:" + lang, marker, marker_line))
            i = j + 1
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(Block(path, root, i + 1, lines[i:j], "table", marker, marker_line))
            i = j
        else:
            j = i
            while (
                j < len(lines)
                and lines[j].strip()
                and not FENCE.match(lines[j])
                and not MARKER.match(lines[j])
            ):
                j += 1
            if marker:
                out.append(Block(path, root, i + 1, lines[i:j], "paragraph", marker, marker_line))
            i = j
        marker = None
    return out


def needs_marker(b: Block) -> bool:
    if b.kind == "table" or (b.kind.startswith("fence:") and b.kind[6:] in OUTPUT_FENCES):
        return re.search(DECIMAL, b.text) is not None
    return False


def doc_numbers(b: Block, select: str) -> list[tuple[str, int]]:
    """(number as printed, line offset within the block) for every number the check compares."""
    text = b.text
    found: list[tuple[str, int]] = []
    for m in re.finditer(select, text, flags=re.DOTALL):
        spans = (
            [(m.group(g), m.start(g)) for g in range(1, (m.lastindex or 0) + 1)]
            if m.groups()
            else [(m.group(0), m.start())]
        )
        found += [(s, text[:start].count("\n")) for s, start in spans if s is not None]
    return found


def matches(doc: str, value: float, tol: float) -> bool:
    d = float(doc.replace("−", "-"))
    decimals = len(doc.split(".")[1]) if "." in doc else 0
    return abs(float(value) - d) <= 0.5 * 10**-decimals + tol + 1e-9


def compare(b: Block, check: Check, values: list[float]) -> list[str]:
    nums = doc_numbers(b, check.select)
    if len(nums) != len(values):
        return [f"{b.where()}: the block has {len(nums)} numbers, `{b.marker}` recomputed {len(values)}"]
    return [
        f"{b.where(off)}: doc says {doc}, `{b.marker}` recomputed {float(v):.6g}"
        + (f" (tolerance {check.tol})" if check.tol else "")
        for (doc, off), v in zip(nums, values, strict=True)
        if not matches(doc, v, check.tol)
    ]


def classify(b: Block) -> tuple[str, str]:
    """(status, detail) of a block without running anything."""
    if b.marker is None:
        return (
            ("unmarked", "a number block without a <!-- check: ... --> marker")
            if needs_marker(b)
            else ("", "")
        )
    if b.marker.startswith("skip"):
        why = b.marker[4:].strip()
        return ("skipped", why) if why else ("unknown", "a skip marker needs its reason: skip (why)")
    if b.marker not in CHECKS:
        return "unknown", f"no check named {b.marker!r} in scripts/check_docs.py"
    return "checked", CHECKS[b.marker].about


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fast", action="store_true", help="only the checks that fit in CI")
    ap.add_argument(
        "--list", action="store_true", help="list every checked / skipped / unmarked block; run nothing"
    )
    ap.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only this check (repeatable)"
    )
    ap.add_argument(
        "--workdir", type=Path, help="folder for the commands' outputs (default: a fresh temp folder)"
    )
    ap.add_argument(
        "--root", type=Path, default=ROOT, help="the checkout whose docs are read (default: this one)"
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="do not echo the commands")
    args = ap.parse_args(argv)

    found = [b for f in doc_files(args.root) for b in blocks(f, args.root)]
    results: list[Result] = []
    for b in found:
        status, detail = classify(b)
        if status:
            results.append(Result(b, status, [detail]))
    for name in args.only:
        if name not in CHECKS:
            print(f"check_docs: --only {name}: no such check ({', '.join(CHECKS)})", file=sys.stderr)
            return 2

    if args.list:
        for r in results:
            extra = ""
            if r.status == "checked":
                c = CHECKS[r.block.marker]
                extra = f" [{r.block.marker}{'' if c.fast else ', full only'}]"
                extra += f" (tolerance {c.tol}: {c.why_tol})" if c.tol else ""
            print(f"{r.block.where():36} {r.status:9}{extra} {r.messages[0]}")
        return 1 if any(r.status in ("unmarked", "unknown") for r in results) else 0

    bad = [r for r in results if r.status in ("unmarked", "unknown")]
    todo = [r for r in results if r.status == "checked"]
    todo = [
        r
        for r in todo
        if (not args.only or r.block.marker in args.only) and (CHECKS[r.block.marker].fast or not args.fast)
    ]
    left = [r for r in results if r.status == "checked" and r not in todo]

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="check_docs-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        w = Work(folder.resolve(), verbose=not args.quiet)
        cache: dict[str, list[float] | CheckFailed] = {}
        for r in todo:
            name = r.block.marker
            check = CHECKS[name]
            if not args.quiet:
                print(f"check {name} ({r.block.where()})", file=sys.stderr, flush=True)
            t = time.perf_counter()
            if name not in cache:
                try:
                    cache[name] = [float(v) for v in check.produce(w)]
                except Exception as e:  # reported as this check's failure; the other checks still run
                    cache[name] = e if isinstance(e, CheckFailed) else CheckFailed(f"{type(e).__name__}: {e}")
            r.seconds = time.perf_counter() - t
            got = cache[name]
            if isinstance(got, CheckFailed):
                r.status, r.messages = "failed", [f"{r.block.where()}: check {name} failed: {got}"]
            else:
                msgs = compare(r.block, check, got)
                r.status, r.messages = ("mismatch", msgs) if msgs else ("ok", [f"{len(got)} numbers match"])

    for r in results:
        if r.status == "ok":
            print(f"ok        {r.block.where():36} {r.block.marker}: {r.messages[0]} ({r.seconds:.0f} s)")
        elif r.status == "skipped":
            print(f"skipped   {r.block.where():36} {r.messages[0]}")
    for r in left:
        print(f"not run   {r.block.where():36} {r.block.marker} (full check; run without --fast)")
    failures = [r for r in results if r.status in ("mismatch", "failed", "unmarked", "unknown")]
    for r in failures:
        for m in r.messages:
            print(
                f"{r.status.upper():9} {m if r.status in ('mismatch', 'failed') else r.block.where() + ': ' + m}"
            )
    n_ok = sum(r.status == "ok" for r in results)
    print(
        f"check_docs: {n_ok} blocks match, {len(failures)} failing, {len(left)} not run, "
        f"{sum(r.status == 'skipped' for r in results)} skipped ({time.perf_counter() - t0:.0f} s)"
    )
    return 1 if failures or bad else 0


if __name__ == "__main__":
    sys.exit(main())

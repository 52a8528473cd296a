#!/usr/bin/env python
"""Start-up of the commands: seconds from the interpreter's start to ``tprobe extract``'s first batch,
and the whole process of the light commands (``--help``, ``status``, ``report --help``, ``export``).

The extract runs once per ``--forward`` value (``TPROBE_FORWARD``), alternately, run after run:
``auto`` (tprobe's torch-only DINOv2, no transformers import; the default) against ``transformers``
(transformers' config and model class, what 0.4 always loaded), so one run prints old and new.

``tprobe extract --model <blockless model> --data data/tcell-sample`` into an empty cache, as a fresh
process each time: the extract reports the process's age when its first batch was read (``first batch
... s after the process started``, from /proc, Linux). The model is a random DINOv2 of ViT-S/14-reg shape
without blocks saved to a temporary folder (``tprobe.testing.save_random_dinov2``): loading a real
checkpoint adds reading its weights. ``--breakdown`` runs the same steps in this process once, timing
each phase (imports, model resolution, preprocessing, model load, store creation up to the first batch).
Light commands: whole-process wall and CPU seconds, and whether torch or transformers were imported.
Nothing here is a test.

    python scripts/bench_startup.py --runs 5 --breakdown                 # auto and transformers, alternately
    python scripts/bench_startup.py --runs 5 --forward auto
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "tcell-sample"
LIGHT = """
import sys
from tprobe.cli import main
try:
    main(sys.argv[1:], prog_name="tprobe")
except SystemExit:
    pass
print("HEAVY", ",".join(m for m in ("torch", "transformers") if m in sys.modules) or "neither")
"""


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall and CPU seconds (this child and its children) and the output of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode not in (0, 2):
        sys.exit(f"{' '.join(cmd[:4])}... failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return wall, cpu, out.stdout + out.stderr


def _process_age() -> float:
    """Seconds since this process started (/proc, Linux; as tprobe.cache.extract reports it)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    stat = Path("/proc/self/stat").read_text()
    return uptime - int(stat[stat.rindex(")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")


def breakdown(model: Path, cache: Path) -> None:
    """One extract's start-up, phase by phase, in this process (the order api.extract runs them)."""
    marks = [("interpreter + this script's imports", _process_age())]
    import torch  # noqa: F401

    marks.append(("import torch", _process_age()))
    import tprobe.api as api
    from tprobe.cache.extract import extract  # noqa: F401 - its imports count here

    marks.append(("import tprobe.api, tprobe.cache.extract", _process_age()))
    from tprobe.models.backbones import Backbone, resolve_model

    marks.append(("import tprobe.models.backbones", _process_age()))
    from tprobe.cache.extract import forward_engine

    engine = forward_engine()
    ref = resolve_model(str(model))
    marks.append(
        (f"resolve_model (config.json; {type(ref.config).__module__.split('.')[0]})", _process_age())
    )
    pre = api.preprocess(str(DATA))
    marks.append(("discover + preprocess the sample", _process_age()))
    backbone = Backbone.from_pretrained(ref, device="cpu", engine=engine)
    marks.append((f"Backbone.from_pretrained (forward: {backbone.engine})", _process_age()))
    res = api.extract(pre, backbone, cache=cache, progress=False)
    marks.append(("store creation ... first batch read", res.times.startup))
    print(
        f"start-up phases of one extract, TPROBE_FORWARD={engine}, in-process (seconds since the process started):"
    )
    last = 0.0
    for name, at in marks:
        print(f"  {at:6.2f}  +{at - last:5.2f}  {name}")
        last = at


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument(
        "--forward", default="auto,transformers", help="TPROBE_FORWARD values to time, comma-separated"
    )
    ap.add_argument("--phases", nargs=2, metavar=("MODEL", "CACHE"), help=argparse.SUPPRESS)  # the child
    args = ap.parse_args()
    if args.phases:
        return breakdown(Path(args.phases[0]), Path(args.phases[1]))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(
        f"# bench_startup.py --runs {args.runs}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        from tprobe.testing import save_random_dinov2

        model = save_random_dinov2(Path(tmp) / "blockless", shape="blockless-small")
        engines = [e.strip() for e in args.forward.split(",") if e.strip()]
        firsts, walls, cpus = ({e: [] for e in engines} for _ in range(3))
        for r in range(args.runs):
            for e in engines:  # alternately, so both see the same machine
                cmd = [sys.executable, "-c", LIGHT, "extract", "--model", str(model), "--data", str(DATA)]
                cache = Path(tmp) / f"cache-{e}-{r}"
                wall, cpu, out = timed([*cmd, "--cache", str(cache)], {**env, "TPROBE_FORWARD": e})
                found = re.search(r"first batch ([\d.]+) s after the process started", out)
                if not found:
                    sys.exit(f"no first-batch time in the output:\n{out[-2000:]}")
                firsts[e].append(float(found[1]))
                walls[e].append(wall)
                cpus[e].append(cpu)
                imported = "transformers" in re.search(r"^HEAVY (.*)$", out, re.M)[1]
        for e in engines:
            f = firsts[e]
            print(
                f"tprobe extract (blockless ViT-S/14-reg, sample, empty cache), TPROBE_FORWARD={e}, {args.runs} runs: "
                f"first batch after {statistics.median(f):.2f} s median ({min(f):.2f}-{max(f):.2f}); whole process "
                f"{statistics.median(walls[e]):.2f} s wall, {statistics.median(cpus[e]):.2f} CPU-s median"
            )
        print(f"  (transformers imported by the last TPROBE_FORWARD={engines[-1]} run: {imported})")
        store = next((Path(tmp) / f"cache-{engines[0]}-0").rglob("*.zarr"))
        print(f"{'light command':40s} {'wall s':>7s} {'CPU s':>6s}  torch/transformers imported")
        for cmd in (
            ["--help"],
            ["status", str(store)],
            ["report", "--help"],
            ["export", "--help"],
            ["export", str(store), "--to", "parquet", str(Path(tmp) / "out.parquet"), "--overwrite"],
        ):
            runs = [timed([sys.executable, "-c", LIGHT, *cmd], env) for _ in range(args.runs)]
            heavy = runs[-1][2].strip().splitlines()[-1].removeprefix("HEAVY ")
            name = "tprobe " + " ".join(c if "/" not in c else Path(c).name for c in cmd)
            print(
                f"{name[:40]:40s} {statistics.median(r[0] for r in runs):7.2f} "
                f"{statistics.median(r[1] for r in runs):6.2f}  {heavy}"
            )
        if args.breakdown:  # a fresh process: this one has imported torch and transformers already
            for e in engines:
                child = [
                    sys.executable,
                    __file__,
                    "--phases",
                    str(model),
                    str(Path(tmp) / f"cache-breakdown-{e}"),
                ]
                print(timed(child, {**env, "TPROBE_FORWARD": e})[2].strip())
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

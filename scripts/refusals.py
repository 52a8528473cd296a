"""Write docs/refusals.md, "What tprobe refuses", from the tests marked ``@pytest.mark.refuses(...)``.

Every entry of the list is a test that feeds tprobe the bad input and checks the one-line refusal, so
the list cannot claim a refusal no test proves. ``--check`` (run by CI) fails when the committed page
differs from what the tests say:

    python scripts/refusals.py            # rewrite docs/refusals.md
    python scripts/refusals.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "refusals.md"
INTRO = """# What tprobe refuses

Each line is bad input that tprobe refuses in one line on stderr (exit status 2; a bad *file* among
many is skipped, listed, and the command exits 3), and the test that proves it. This page is generated
from the tests marked `@pytest.mark.refuses(...)` by `python scripts/refusals.py`; CI fails when it is
stale.

| refused | proven by |
|---|---|
"""


class _Collect:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for mark in item.iter_markers("refuses"):
                module = item.nodeid.split("::")[0]
                self.rows.append((module, mark.args[0], item.nodeid.split("::", 1)[1].split("[")[0]))


def page() -> str:
    plugin = _Collect()
    with contextlib.redirect_stdout(io.StringIO()):  # the collection listing is not the page
        rc = pytest.main(
            ["--collect-only", "-qq", "-p", "no:cacheprovider", str(ROOT / "tests")],
            plugins=[plugin],
        )
    if rc != 0:
        sys.exit(f"collecting the tests failed (pytest exit {rc})")
    rows, lines = sorted(set(plugin.rows)), []
    for module, what, test in rows:
        lines.append(f"| {what} | `{module}::{test}` |")
    return INTRO + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/refusals.md is stale")
    args = ap.parse_args()
    text = page()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python scripts/refusals.py", file=sys.stderr)
            return 1
        print(f"{PAGE.relative_to(ROOT)}: {text.count(chr(10)) - INTRO.count(chr(10))} refusals, up to date")
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

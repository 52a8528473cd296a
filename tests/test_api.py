"""The public API: every name resolves, is documented, and `import tprobe` stays light."""

from __future__ import annotations

import inspect
import subprocess
import sys

import tprobe


def test_every_public_name_resolves_and_is_documented():
    from tprobe import api

    assert set(tprobe.API) - {"map"} <= set(tprobe.__all__) and list(api.__all__) == list(tprobe.API)
    assert "map" not in tprobe.__all__  # a star import must not shadow the built-in map
    for name in tprobe.API:
        fn = getattr(tprobe, name)
        assert fn is getattr(api, name) and callable(fn), name
        doc = inspect.getdoc(fn) or ""
        assert len(doc.splitlines()) >= 3, f"tprobe.{name} needs a docstring that says what it returns"
    assert set(tprobe.__all__) <= set(dir(tprobe))


def test_an_unknown_name_is_an_attribute_error():
    try:
        tprobe.no_such_call  # noqa: B018
    except AttributeError as exc:
        assert "no_such_call" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("tprobe.no_such_call resolved")


def test_import_tprobe_and_its_api_load_neither_torch_nor_transformers():
    code = (
        "import sys, tprobe, tprobe.api; "
        "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_stage_packages_do_not_import_upwards():
    """A stage imports only stages on lower floors (the house in the README's architecture block)."""
    import ast
    from pathlib import Path

    floors = ["_version", "errors", "stats", "models", "data", "cache", "features", "plot", "runs", "probing"]
    floors += ["science", "train", "cluster", "api", "cli"]
    rank = {name: i for i, name in enumerate(floors)}
    rank["testing"] = rank["cache"]  # random models and sample copies for tests and the notebook
    root = Path(tprobe.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).with_suffix("").parts
        if rel[0] == "__init__":
            continue
        me = rank[rel[0]]
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tprobe."):
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names if a.name.startswith("tprobe.")]
            for m in mods:
                stage = m.split(".")[1]
                if stage in rank and rank[stage] > me and stage != rel[0]:
                    bad.append(f"{path.relative_to(root)} imports {m}")
    assert not bad, bad

"""The results layout: one function per output path, and the documented contract."""

from __future__ import annotations

import inspect
import re

from facelora.registry.layout import BASE, Layout

from helpers import ROOT


def layout_paths() -> dict[str, str]:
    """Every path function of the layout with its placeholders ({phase}, {shard}, ...)."""
    L = Layout("results")
    out = {}
    for name, _fn in inspect.getmembers(Layout, inspect.isfunction):
        if name.startswith("_") or name == "metric_backends":
            continue
        out[name] = getattr(L, name)()  # the defaults are the placeholders
    return out


def documented_paths(doc: str) -> set[str]:
    """The paths of the doc's table rows: a `results/...` path, and the names after it in the
    same cell (`results/summary/summary.json`, `funnel.png` lists both files)."""
    found = set()
    for line in doc.splitlines():
        cell = line.split("|")[1] if line.startswith("|") else line
        tokens = re.findall(r"`([^`]+)`", cell)
        base = next((t for t in tokens if t.startswith("results/")), None)
        if base is None:
            continue
        folder = base.rstrip("/").rsplit("/", 1)[0]
        found |= {t if t.startswith("results/") else f"{folder}/{t}" for t in tokens}
    return found


def test_documented_paths_are_read_from_the_tables():
    doc = "| `results/summary/summary.json`, `funnel.png` | counts |\n| `other` | x |"
    assert documented_paths(doc) == {"results/summary/summary.json", "results/summary/funnel.png"}


def test_every_layout_path_is_documented():
    """docs/outputs.md lists every output path the layout defines (placeholders as there)."""
    listed = documented_paths((ROOT / "docs" / "outputs.md").read_text())
    missing = sorted(
        f"{name}: {path}"
        for name, path in layout_paths().items()
        if not any(entry.rstrip("/").startswith(path) for entry in listed)
    )
    assert not missing, "\n".join(missing)


def test_paths_are_distinct_and_under_the_root():
    paths = layout_paths()
    assert all(p.startswith("results/") for p in paths.values())
    files = [p for name, p in paths.items() if not name.endswith(("_dir", "_root"))]
    assert len(set(files)) == len(files)
    assert Layout("/data/run/").best(BASE) == "/data/run/eval/phases/base/best.json"
    assert Layout().eval_group_metrics("broad", 3).endswith("phases/broad/group-3/metrics.csv")

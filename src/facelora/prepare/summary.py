"""The data half at a glance: counts at every step, rejection reasons, score histograms.

Reads the data half's tables where the results layout puts them and writes summary.json,
funnel.png (how many files survive each step) and scores.png (each score's histogram, one
colour per phase).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from facelora.config import Params
from facelora.io.atomic import atomic_path, write_json
from facelora.io.datasets import read_manifest
from facelora.prepare.synthesis.made import made_counts
from facelora.registry.layout import Layout
from facelora.registry.scores import SCORE_COLUMNS


def _reason_kind(reason: str) -> str:
    """Group similar reasons: keep the wording, drop detail, names and numbers."""
    text = str(reason).split(" (")[0].split("; ")[0]
    text = re.sub(r"\bp[0-9a-f]{12}\b", "PAIR", text)
    text = re.sub(r"[^\s:]*\.(jpg|jpeg|png|webp|txt|csv|jsonl)\b", "FILE", text, flags=re.I)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return " ".join(text.split())


def _reasons(frame: pd.DataFrame) -> dict[str, int]:
    if frame.empty:
        return {}
    return dict(Counter(_reason_kind(r) for r in frame["reason"]).most_common())


def _made_counts(layout: Layout, kind: str) -> dict:
    """A synthesis kind's pairs made, failed (with reasons) and sources left out."""
    counts = made_counts(layout.synthesis_manifest(kind))
    return {**counts, "reasons": _reasons(pd.DataFrame({"reason": counts["reasons"]}))}


def collect(layout: Layout, params: Params) -> dict:
    images = pd.read_parquet(layout.images())
    crops = pd.read_parquet(layout.crops())
    pairs = pd.read_parquet(layout.pairs())
    captions = pd.read_parquet(layout.captions())
    split = pd.read_parquet(layout.split())
    pair_rejects = pd.read_csv(layout.pairs_rejected(), keep_default_na=False)
    synthesized = {kind: _made_counts(layout, kind) for kind in params.synthesis.kinds}
    phases = {}
    for name in params.phase_names:
        folder = Path(layout.phase_dir(name))
        if (folder / "phase.json").is_file():
            phases[name] = json.loads((folder / "phase.json").read_text())
    return {
        "funnel": {
            "files": len(images),
            "images_with_faces": int((images["status"] == "ok").sum()),
            "faces": int(images["n_faces"].sum()),
            "face_crops": int((crops["status"] == "ok").sum()),
            **{f"synthesized:{k}": c["ok"] for k, c in synthesized.items()},
            "pairs_scored": len(pairs),
            "pairs_usable": int((pairs["status"] == "ok").sum()),
            "pairs_captioned": int((captions["status"] == "ok").sum()),
            "train": int((split["split"] == "train").sum()),
            "validation": int((split["split"] == "validation").sum()),
            **{f"phase:{n}": p["selected"] for n, p in phases.items()},
        },
        "rejected": {
            "images": _reasons(images[images["status"] == "rejected"]),
            "crops": _reasons(crops[crops["status"] == "rejected"]),
            "pairs": _reasons(pair_rejects),
            "captions": _reasons(captions[captions["status"] == "rejected"]),
            **{f"synthesis:{k}": c["reasons"] for k, c in synthesized.items()},
        },
        "synthesis": {
            k: {s: c[s] for s in ("ok", "failed", "skipped", "unscored")}
            for k, c in synthesized.items()
        },
        "duplicates": int(images["duplicate_of"].notna().sum()),
        "phases": phases,
    }


def plot_funnel(funnel: dict[str, int], out: Path) -> None:
    names, values = list(funnel), list(funnel.values())
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    bars = ax.barh(names[::-1], values[::-1], color="#4c78a8")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("count")
    ax.set_title("facelora data funnel")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_scores(layout: Layout, params: Params, out: Path) -> None:
    pairs = pd.read_parquet(layout.pairs())
    pairs = pairs[pairs["status"] == "ok"]
    groups = {"all usable pairs": pairs}
    for name in params.phase_names:
        folder = Path(layout.phase_dir(name))
        if (folder / "manifest.jsonl").is_file():
            ids = {m["pair_id"] for m in read_manifest(folder)}
            groups[name] = pairs[pairs["pair_id"].isin(ids)]
    scores = [c for c in SCORE_COLUMNS if pairs[c].notna().any()] or ["quality"]
    cols = 3
    rows = int(np.ceil(len(scores) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, score in zip(axes.flat, scores, strict=False):
        values = pairs[score].dropna().astype(float)
        bins = np.histogram_bin_edges(values, bins=20) if len(values) else 10
        for i, (label, frame) in enumerate(groups.items()):
            v = frame[score].dropna().astype(float)
            if not len(v):
                continue
            if i == 0:  # all pairs: a light filled background, phases as outlines on top
                ax.hist(v, bins=bins, color="#d9d9d9", label=f"{label} ({len(v)})")
            else:
                ax.hist(
                    v,
                    bins=bins,
                    histtype="step",
                    linewidth=1.8,
                    color=f"C{i - 1}",
                    label=f"{label} ({len(v)})",
                )
        better = "higher" if SCORE_COLUMNS[score] else "lower"
        ax.set_title(f"{score} ({better} is better)", fontsize=10)
    for ax in list(axes.flat)[len(scores) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("pair scores by phase")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_summary(
    results: str | Path,
    params: Params,
    summary_out: str | Path,
    funnel_out: str | Path,
    scores_out: str | Path,
) -> dict:
    """The summary of the data half under `results` (paths.results)."""
    layout = Layout(str(results))
    summary = collect(layout, params)
    write_json(Path(summary_out), summary, sort_keys=False)
    plot_funnel(summary["funnel"], Path(funnel_out))
    plot_scores(layout, params, Path(scores_out))
    return summary


def hints(summary: dict) -> list[str]:
    """What to change, in words, where most of the data was lost at one step."""
    out = []
    funnel = summary["funnel"]
    small = sum(n for r, n in summary["rejected"].get("crops", {}).items() if "crop.min_side" in r)
    if funnel.get("faces") and small > funnel["faces"] / 2:
        out.append(
            f"{small} of {funnel['faces']} faces were too small for crop.min_side: web-sized "
            "photos need it lower (e.g. 256; smaller crops make blurrier targets), or use "
            "larger photos"
        )
    if funnel.get("face_crops") == 0:
        out.append("no usable face crop: nothing can be paired or synthesized (see above)")
    for kind, counts in summary.get("synthesis", {}).items():
        if counts["ok"] == 0:
            out.append(
                f"synthesis kind {kind} made no pairs (its reasons above; "
                f"results/synthesis/{kind}/failed.csv)"
            )
    if funnel.get("pairs_scored", 0) == 0:
        out.append(
            "no pairs: put before/after pairs in data/raw (docs/data.md, input layouts), set "
            "pairs.auto_identity.enabled for several photos per person, or make pairs with "
            "synthesis.kinds (docs/synthesis.md)"
        )
    return out


def format_summary(summary: dict) -> str:
    lines = ["facelora data summary", ""]
    width = max(len(k) for k in summary["funnel"])
    lines += [f"  {k:<{width}}  {v}" for k, v in summary["funnel"].items()]
    for name, phase in summary.get("phases", {}).items():
        if phase.get("empty"):
            lines += ["", f"phase {name} is EMPTY (training it stops here): {phase['empty']}"]
    for step, reasons in summary["rejected"].items():
        if reasons:
            lines += ["", f"rejected {step}:"]
            lines += [f"  {n:>5}  {reason}" for reason, n in reasons.items()]
    found = hints(summary)
    if found:
        lines += ["", "what to change:", *(f"  - {h}" for h in found)]
    return "\n".join(lines)

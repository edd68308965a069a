"""On-disk training datasets: the Kontext layout plus a JSONL manifest.

    DIR/<pair_id>_start.png    the image before the edit (control)
    DIR/<pair_id>_start2.png   face reference(s), when the pair has them (.._start4)
    DIR/<pair_id>_end.png      the image after the edit (target)
    DIR/<pair_id>_mask.png     the pair's loss mask in the end image's pixels (grey; white:
                               the region to learn), when the user gave one
    DIR/<pair_id>.txt          the caption
    DIR/manifest.jsonl         one JSON object per pair: files, caption, scores, and the end
                               image's 5 landmarks (`end_landmarks`, its pixels; null when
                               unknown) and the mask file (`mask`, null when none) for the
                               loss regions of training

Files are hard links to the pair crops (no extra disk) where the filesystem allows; pairs held
in memory (synthetic data, tests, benchmarks) are saved as PNG instead (`write_kontext_images`).
The folder is built beside the target and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from facelora.io.atomic import link_or_copy, write_text
from facelora.registry.scores import is_score_column

MANIFEST = "manifest.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def _points(value) -> list[list[float]] | None:
    """Landmarks as plain [[x, y], ...] (a Parquet list cell arrives as arrays of arrays)."""
    if value is None:
        return None
    return [[round(float(c), 2) for c in point] for point in value]


def write_kontext_dataset(
    dest: str | Path,
    pairs: list[dict],
    pairs_dir: str | Path,
    extra_files: dict[str, str] | None = None,
) -> int:
    """Write pairs (rows of pairs.parquet joined with their caption) as a Kontext folder."""
    pairs_dir = Path(pairs_dir)

    def link(crop: str, path: Path) -> None:
        link_or_copy(pairs_dir / crop, path)

    return _write_folder(dest, pairs, link, extra_files)


def write_kontext_images(
    dest: str | Path,
    pairs: list[dict],
    extra_files: dict[str, str] | None = None,
) -> int:
    """Write pairs held in memory as the same Kontext folder and manifest.

    Each pair: pair_id, caption, start_crop and end_crop (PIL images or uint8 RGB arrays),
    optionally reference_crops (a list of them), mask_crop (a grey image) and end_landmarks,
    the provenance fields of pairs.parquet (layout, source, start, end: where the crops came
    from; None by default) and its score columns."""
    from PIL import Image

    def save(image, path: Path) -> None:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)

    unknown = {"layout": None, "source": None, "start": None, "end": None}
    return _write_folder(dest, [{**unknown, **pair} for pair in pairs], save, extra_files)


def _write_folder(dest: str | Path, pairs: list[dict], put, extra_files) -> int:
    """The layout and manifest both writers share; `put(crop, path)` writes one image file."""
    dest = Path(dest)
    building = dest.with_name(f".{dest.name}.building")
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    lines = []
    for pair in sorted(pairs, key=lambda p: p["pair_id"]):
        stem = pair["pair_id"]
        files = {"start": f"{stem}_start.png", "end": f"{stem}_end.png"}
        put(pair["start_crop"], building / files["start"])
        put(pair["end_crop"], building / files["end"])
        refs = []
        for k, ref in enumerate(pair.get("reference_crops") or [], start=2):
            refs.append(f"{stem}_start{k}.png")
            put(ref, building / refs[-1])
        mask = None
        if pair.get("mask_crop") is not None:
            mask = f"{stem}_mask.png"
            put(pair["mask_crop"], building / mask)
        write_text(building / f"{stem}.txt", pair["caption"] + "\n")
        lines.append(
            json.dumps(
                {
                    "pair_id": stem,
                    "start": files["start"],
                    "end": files["end"],
                    "references": refs,
                    "caption": pair["caption"],
                    "layout": pair["layout"],
                    "source": pair["source"],
                    "start_image": pair["start"],
                    "end_image": pair["end"],
                    "scores": {k: _clean(v) for k, v in pair.items() if is_score_column(k)},
                    "end_landmarks": _points(pair.get("end_landmarks")),
                    "mask": mask,
                },
                sort_keys=True,
            )
        )
    write_text(building / MANIFEST, "".join(line + "\n" for line in lines))
    for name, text in (extra_files or {}).items():
        write_text(building / name, text)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(building, dest)
    return len(lines)


def read_manifest(folder: str | Path) -> list[dict]:
    path = Path(folder) / MANIFEST
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

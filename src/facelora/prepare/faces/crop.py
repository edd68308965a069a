"""The crop step: one aligned square PNG per usable face, and a table of every decision.

Each photo is decoded once, at the lowest JPEG scale that still gives every crop its output
resolution. Faces whose crop would be smaller than crop.min_side are rejected with the reason;
exact duplicate files are not cropped again (they point at the first copy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from facelora.config import Params
from facelora.io.atomic import write_csv, write_parquet, write_png
from facelora.io.naming import crop_name
from facelora.io.parallel import ordered_map
from facelora.io.progress import progress
from facelora.io.sharding import in_shard
from facelora.io.tables import CROPS, FACES, IMAGES, ParquetRowWriter, read_rows_of
from facelora.prepare.faces.align import CropRejected, output_side, plan_crop, warp_crop
from facelora.prepare.images import ImageRejected, read_image

log = logging.getLogger(__name__)
IMAGES_SUBDIR = "images"


def _row(image: str, face_index: int, **values) -> dict:
    row = dict.fromkeys(CROPS.names)
    row.update(image=image, face_index=face_index, **values)
    return row


def _ok_row(rel: str, idx: int, box, out: int, png_of: str, notes: list[str]) -> dict:
    """A cropped face; its PNG is named after `png_of` (the file itself, or its first copy)."""
    return _row(
        rel,
        idx,
        status="ok",
        crop=f"{IMAGES_SUBDIR}/{crop_name(png_of, idx)}",
        cx=box.cx,
        cy=box.cy,
        side=box.side,
        angle=box.angle,
        out_side=out,
        notes="; ".join(notes) or None,
    )


def crop_image(
    rel: str,
    faces: list[dict],
    raw_dir: Path,
    crops_dir: Path,
    params: Params,
    duplicate_of: str | None = None,
) -> list[dict]:
    """Crop every face of one photo; returns one CROPS row per face.

    An exact duplicate file gets the same decisions, pointing at the first copy's PNGs
    (identical bytes give identical faces), so nothing is decoded or written twice.
    """
    rows, planned = [], []
    for face in faces:
        idx = int(face["face_index"])
        try:
            box, notes = plan_crop(
                np.stack(face["landmarks"]),
                int(face["image_width"]),
                int(face["image_height"]),
                params.crop,
            )
        except CropRejected as exc:
            rows.append(_row(rel, idx, status="rejected", reason=exc.reason))
            continue
        planned.append((idx, box, output_side(box.side, params.crop), notes))
    if not planned:
        return rows
    if duplicate_of is not None:
        same = f"same file contents as {duplicate_of}"
        rows += [_ok_row(rel, i, box, out, duplicate_of, [same, *n]) for i, box, out, n in planned]
        return sorted(rows, key=lambda r: r["face_index"])
    need = max(out / box.side for _, box, out, _ in planned)
    try:
        loaded = read_image(raw_dir / rel, params.images, min_scale=need)
    except ImageRejected as exc:  # the file changed since detection
        return rows + [_row(rel, i, status="rejected", reason=exc.reason) for i, *_ in planned]
    for idx, box, out, notes in planned:
        pixels = warp_crop(loaded.rgb, box, out, loaded.scale)
        png = crops_dir / IMAGES_SUBDIR / crop_name(rel, idx)
        write_png(png, pixels, params.crop.png_compression)
        rows.append(_ok_row(rel, idx, box, out, rel, notes))
    return sorted(rows, key=lambda r: r["face_index"])


_worker: dict = {}


def _init(raw_dir: Path, crops_dir: Path, params: Params) -> None:
    _worker.update(raw_dir=raw_dir, crops_dir=crops_dir, params=params)


def _work(item: tuple[str, list[dict], str | None]) -> list[dict]:
    rel, faces, duplicate_of = item
    w = _worker
    return crop_image(rel, faces, w["raw_dir"], w["crops_dir"], w["params"], duplicate_of)


def crop_shard(
    raw_dir: str | Path,
    faces_path: str | Path,
    images_path: str | Path,
    crops_dir: str | Path,
    shard_out: str | Path,
    params: Params,
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
) -> int:
    raw_dir, crops_dir = Path(raw_dir), Path(crops_dir)
    listed = pq.read_table(images_path, schema=IMAGES, columns=["image", "duplicate_of"])
    # this shard's rows only, before any become Python objects (the table is the dataset's)
    names = listed.column("image").to_pylist()
    mine = listed.filter(pa.array([in_shard(n, shard) for n in names], pa.bool_())).to_pylist()
    del names
    duplicates = {r["image"]: r["duplicate_of"] for r in mine if r["duplicate_of"]}
    by_image: dict[str, list[dict]] = {}
    columns = ["image", "face_index", "landmarks", "image_width", "image_height"]
    wanted = pa.array([r["image"] for r in mine], pa.string())
    for face in read_rows_of(faces_path, FACES, wanted, columns):
        by_image.setdefault(face["image"], []).append(face)
    items = [(rel, fs, duplicates.get(rel)) for rel, fs in sorted(by_image.items())]
    count = 0
    with ParquetRowWriter(shard_out, CROPS) as writer:
        results = ordered_map(_work, items, workers, _init, (raw_dir, crops_dir, params))
        for rows in progress(results, total=len(items), desc="crop", unit="img"):
            for row in rows:
                writer.add(row)
                count += row["status"] == "ok"
    log.info("shard %d/%d: %d photos, %d crops", shard[0], shard[1], len(items), count)
    return count


def gather_crops(
    shards: list[Path], crops_dir: str | Path, table_out: str | Path, rejected_out: str | Path
) -> dict:
    """Merge shard tables into the crops table + the rejects; delete the PNGs in `crops_dir`
    that no row refers to."""
    crops_dir = Path(crops_dir)
    table = pa.concat_tables([pq.read_table(s, schema=CROPS) for s in shards])
    table = table.sort_by([("image", "ascending"), ("face_index", "ascending")])
    write_parquet(table_out, table)
    frame = table.to_pandas()
    rejected = frame.loc[frame["status"] == "rejected"]
    write_csv(
        rejected_out,
        pd.DataFrame(
            {
                "image": rejected["image"],
                "face_index": rejected["face_index"],
                "reason": rejected["reason"],
            }
        ),
    )
    referenced = set(frame["crop"].dropna())
    stale = 0
    image_dir = crops_dir / IMAGES_SUBDIR
    if image_dir.is_dir():
        for png in image_dir.iterdir():
            if f"{IMAGES_SUBDIR}/{png.name}" not in referenced:
                png.unlink()
                stale += 1
    stats = {"faces": len(frame), "crops": len(referenced), "rejected": len(rejected)}
    log.info("gathered %s (removed %d stale crops)", stats, stale)
    return stats

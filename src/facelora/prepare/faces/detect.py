"""The detect step: every photo under the raw folder -> one row per face, one row per file.

Photos are decoded upright (EXIF) and, when large, directly at a reduced size (JPEG draft
decoding) to a copy of at most faces.max_side pixels; faces are found, landmarked and embedded
on that copy and their coordinates mapped back to full resolution. A shard (`--shard i/n`)
handles the files whose name hashes to it; `gather_detections` merges shards into the same
tables an unsharded run writes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from facelora.config import Params
from facelora.io.atomic import write_csv, write_parquet
from facelora.io.parallel import ordered_map
from facelora.io.progress import progress
from facelora.io.sharding import in_shard
from facelora.io.tables import FACES, IMAGES, ParquetRowWriter
from facelora.prepare.faces.align import face_frame
from facelora.prepare.faces.backends import FaceBackend, make_backend
from facelora.prepare.faces.pose import head_pose
from facelora.prepare.faces.types import Face
from facelora.prepare.images import (
    ImageRejected,
    RawFile,
    decode_image,
    read_file,
    require_folder,
    scan_images,
)
from facelora.prepare.listing import read_listing

log = logging.getLogger(__name__)

# The HOG detector's window is 80 px: smaller faces are missed on the detection copy.
DETECTOR_MIN_FACE_PX = 80


@dataclass
class DetectOutputs:
    faces: Path
    images: Path
    rejected: Path

    @classmethod
    def beside(cls, faces: str | Path) -> DetectOutputs:
        faces = Path(faces)
        return cls(faces, faces.with_name("images.parquet"), faces.with_name("rejected.csv"))


def _image_row(rel: str, **values) -> dict:
    row = dict.fromkeys(IMAGES.names)
    row.update(image=rel, n_faces=0, n_small_faces=0)
    row.update(values)
    return row


def face_row(
    rel: str, index: int, face: Face, to_full: float, width: int, height: int, backend: str
) -> dict:
    """The faces table's row of one described face (found on a copy `to_full` times smaller
    than the width x height image the row's coordinates are in)."""
    box = face.box * to_full
    landmarks = face.landmarks.astype(np.float64) * to_full
    yaw, pitch, roll = head_pose(landmarks, width, height)
    return {
        "image": rel,
        "face_index": index,
        "x0": box[0],
        "y0": box[1],
        "x1": box[2],
        "y1": box[3],
        "score": face.score,
        "landmarks": landmarks.tolist(),
        "embedding": np.asarray(face.embedding, np.float32).tolist(),
        "face_size": face_frame(landmarks).size,
        "yaw": yaw,
        "pitch": pitch,
        "roll": roll,
        "image_width": width,
        "image_height": height,
        "backend": backend,
    }


def largest_first(detections: list) -> list:
    """Face 0 is the largest; ties broken left to right, so the order is reproducible."""
    return sorted(detections, key=lambda d: (-round(d.area, 3), float(d.box[0]), float(d.box[1])))


def analyse_image(
    rel: str, raw: RawFile, params: Params, backend: FaceBackend
) -> tuple[dict, list]:
    """Detect, landmark and embed the faces of one file. Never raises for bad input."""
    try:
        loaded = decode_image(raw, params.images, max_side=params.faces.max_side)
    except ImageRejected as exc:
        return _image_row(
            rel, status="rejected", reason=exc.reason, sha256=raw.sha256, bytes=len(raw.data)
        ), []
    info = loaded.info
    row = _image_row(
        rel,
        status="ok",
        sha256=info.sha256,
        bytes=info.bytes,
        width=info.width,
        height=info.height,
        orientation=info.orientation,
        format=info.format,
        mode=info.mode,
        notes="; ".join(info.notes) or None,
    )
    to_full = 1.0 / loaded.scale
    found = backend.detect(loaded.rgb)
    detections = [d for d in found if d.score >= backend.min_score]
    min_px = params.faces.min_face_px * loaded.scale
    kept = [d for d in detections if d.side >= min_px]
    row["n_small_faces"] = len(detections) - len(kept)
    if not found:
        smallest = DETECTOR_MIN_FACE_PX * to_full
        row.update(
            status="rejected",
            reason=(
                f"no face found (faces under about {smallest:.0f} px are missed at faces.max_side "
                f"{params.faces.max_side}; raise it to find smaller faces)"
            ),
        )
        return row, []
    if not detections:
        best = max(d.score for d in found)
        row.update(
            status="rejected",
            reason=(
                f"only low-confidence faces: {len(found)} found, best score {best:.2f} < "
                f"{backend.min_score_setting} {backend.min_score}"
            ),
        )
        return row, []
    if not kept:
        row.update(
            status="rejected",
            reason=(
                f"only tiny faces: {len(detections)} face(s) smaller than faces.min_face_px "
                f"{params.faces.min_face_px}"
            ),
        )
        return row, []
    if len(kept) > params.faces.max_faces:
        row.update(
            n_faces=len(kept),
            status="rejected",
            reason=(f"too many faces: {len(kept)} > faces.max_faces {params.faces.max_faces}"),
        )
        return row, []
    faces = backend.describe(loaded.rgb, largest_first(kept))
    face_rows = []
    for index, face in enumerate(faces):
        face_rows.append(face_row(rel, index, face, to_full, info.width, info.height, backend.name))
    row["n_faces"] = len(face_rows)
    return row, face_rows


# --- worker processes ---------------------------------------------------------------------

_worker: dict = {}
# Edit datasets often repeat one photo under several names (the same start for many edits):
# results are kept per content hash and reused, within one job, for this many recent files.
DUPLICATE_CACHE_SIZE = 4096


def _init_worker(params: Params, backend: FaceBackend | None = None) -> None:
    import torch

    # one thread per worker: jobs use the cores they were given, and results do not depend
    # on the thread count (summation order), so sharded runs match unsharded ones exactly
    torch.set_num_threads(1)
    _worker.clear()
    _worker["params"] = params
    _worker["backend"] = backend or make_backend(params.faces)
    _worker["seen"] = OrderedDict()


def _work(item: tuple[str, str, str | None]) -> tuple[dict, list]:
    rel, path, reason = item
    if reason is not None:
        return _image_row(rel, status="rejected", reason=reason), []
    params = _worker["params"]
    try:
        raw = read_file(path, params.images)
    except ImageRejected as exc:
        return _image_row(rel, status="rejected", reason=exc.reason), []
    seen: OrderedDict = _worker["seen"]
    if raw.sha256 in seen:
        seen.move_to_end(raw.sha256)
        row, faces = seen[raw.sha256]
        return {**row, "image": rel}, [{**f, "image": rel} for f in faces]
    result = analyse_image(rel, raw, params, _worker["backend"])
    seen[raw.sha256] = result
    if len(seen) > DUPLICATE_CACHE_SIZE:
        seen.popitem(last=False)
    return result


def detect_shard(
    images_dir: str | Path,
    faces_out: str | Path,
    images_out: str | Path,
    params: Params,
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
    listing: str | Path | None = None,
) -> tuple[int, int]:
    """Write this shard's faces and images tables. Returns (files, faces). With `listing`
    (the shard's file from facelora.prepare.listing) its files are read instead of walking
    the whole folder."""
    require_folder(images_dir)
    # load the models here: a missing file fails once, with its message, before any work
    backend = make_backend(params.faces)
    if listing is not None:
        items = read_listing(listing, images_dir)
    else:
        items = [
            (rel, str(path), reason)
            for rel, path, reason in scan_images(images_dir, params.images)
            if in_shard(rel, shard)
        ]
    n_faces = 0
    with (
        ParquetRowWriter(faces_out, FACES) as faces_w,
        ParquetRowWriter(images_out, IMAGES) as images_w,
    ):
        init_args = (params, backend) if workers <= 1 else (params,)
        if workers > 1:
            del backend  # each worker process loads its own
        results = ordered_map(_work, items, workers, _init_worker, init_args)
        bar = progress(results, total=len(items), desc="detect", unit="img")
        for image_row, face_rows in bar:
            images_w.add(image_row)
            for face_row in face_rows:
                faces_w.add(face_row)
            n_faces += len(face_rows)
    _worker.clear()  # release the models
    log.info("shard %d/%d: %d files, %d faces", shard[0], shard[1], len(items), n_faces)
    return len(items), n_faces


def gather_detections(shards: list[tuple[Path, Path]], out: DetectOutputs) -> dict:
    """Merge shard tables (faces, images) into the final tables and the rejects list."""
    images = pa.concat_tables([pq.read_table(i, schema=IMAGES) for _, i in shards])
    faces = pa.concat_tables([pq.read_table(f, schema=FACES) for f, _ in shards])
    images = images.sort_by([("image", "ascending")])
    faces = faces.sort_by([("image", "ascending"), ("face_index", "ascending")])
    frame = images.to_pandas()
    # exact duplicates (same bytes): later files point at the first, in name order
    first = frame.groupby("sha256", dropna=True)["image"].transform("first")
    dup = first.notna() & (first != frame["image"])
    frame["duplicate_of"] = first.where(dup, None)
    images = pa.Table.from_pandas(frame, schema=IMAGES, preserve_index=False)
    write_parquet(out.faces, faces)
    write_parquet(out.images, images)
    rejected = frame.loc[frame["status"] == "rejected", ["image", "reason"]]
    write_csv(out.rejected, rejected)
    stats = {
        "files": len(frame),
        "images_ok": int((frame["status"] == "ok").sum()),
        "rejected": len(rejected),
        "faces": faces.num_rows,
        "duplicates": int(dup.sum()),
    }
    log.info("gathered %s", stats)
    return stats


def read_faces(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path, schema=FACES).to_pandas()

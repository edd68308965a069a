"""`facelora synthesize KIND PHOTOS --out DIR` alone: detect and crop the photos first.

The same detect and crop steps as the workflow, with the same settings, so pairs made
alone are aligned face crops like every other pair; the tables go to a scratch folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from facelora.config import Params
from facelora.errors import MissingInput
from facelora.prepare.faces.crop import crop_shard, gather_crops
from facelora.prepare.faces.detect import DetectOutputs, detect_shard, gather_detections

log = logging.getLogger(__name__)


def crop_photos(
    photos: str | Path, work: str | Path, params: Params, workers: int = 1
) -> tuple[Path, Path, Path, Path]:
    """(crops table, faces table, images table, crops folder) of the photos' usable faces."""
    photos, work = Path(photos), Path(work)
    if not photos.is_dir():
        raise MissingInput(f"{photos}: no such folder of photos")
    shard_faces, shard_images = work / "0.faces.parquet", work / "0.images.parquet"
    detect_shard(photos, shard_faces, shard_images, params, (0, 1), workers)
    detected = DetectOutputs(work / "faces.parquet", work / "images.parquet", work / "rej.csv")
    found = gather_detections([(shard_faces, shard_images)], detected)
    crops_dir, shard_crops = work / "crops", work / "0.crops.parquet"
    crop_shard(photos, detected.faces, detected.images, crops_dir, shard_crops, params)
    crops = work / "crops.parquet"
    cropped = gather_crops([shard_crops], crops_dir, crops, work / "crops_rejected.csv")
    log.info("%d files, %d faces, %d crops", found["files"], found["faces"], cropped["crops"])
    if cropped["crops"] == 0:
        raise MissingInput(
            f"{photos}: no usable face crop in {found['files']} file(s) ({found['rejected']} "
            f"without a usable face, {cropped['rejected']} faces too small for crop.min_side "
            f"{params.crop.min_side}): lower crop.min_side or faces.min_face_px, or use "
            f"larger photos"
        )
    return crops, detected.faces, detected.images, crops_dir

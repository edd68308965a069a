"""Crop geometry and the crop step: padding, alignment, staying inside the photo, minimum size."""

import math

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facelora.config import CropParams, Params, validate_params
from facelora.prepare.faces.align import (
    CropRejected,
    face_frame,
    output_side,
    plan_crop,
    transform_points,
    warp_crop,
)
from facelora.prepare.faces.backends import make_backend
from facelora.prepare.faces.crop import crop_shard, gather_crops
from facelora.prepare.faces.detect import DetectOutputs, detect_shard, gather_detections

# a frontal face: eyes 100 px apart at y=400, mouth 90 px lower
LANDMARKS = np.array([[450, 400], [550, 400], [500, 450], [460, 490], [540, 490]], float)


def test_face_size_and_crop_side_follow_the_padding():
    frame = face_frame(LANDMARKS)
    assert frame.size == pytest.approx(200)  # max(2 x 100, 1.8 x 90)
    for padding in (0.45, 0.9):
        box, notes = plan_crop(LANDMARKS, 2000, 2000, CropParams(padding=padding, min_side=64))
        assert box.side == pytest.approx(200 * (1 + 2 * padding))
        assert notes == []


def test_vertical_shift_moves_the_square_up_for_hair():
    up, _ = plan_crop(LANDMARKS, 2000, 2000, CropParams(vertical_shift=-0.2, min_side=64))
    level, _ = plan_crop(LANDMARKS, 2000, 2000, CropParams(vertical_shift=0.0, min_side=64))
    assert up.cy == pytest.approx(level.cy - 40)
    assert up.cx == pytest.approx(level.cx)


def test_small_faces_are_rejected_with_the_reason():
    with pytest.raises(CropRejected, match=r"face too small: crop side 380 px < crop.min_side 512"):
        plan_crop(LANDMARKS, 2000, 2000, CropParams())


def test_square_is_shifted_inside_not_padded_with_invented_pixels():
    lm = LANDMARKS - [400, 0]  # face near the left border
    box, notes = plan_crop(lm, 2000, 2000, CropParams(min_side=64))
    assert box.cx - box.side / 2 >= 0
    assert any(n.startswith("shifted") for n in notes)


def test_square_shrinks_when_the_photo_is_too_small():
    lm = LANDMARKS - [0, 150]  # keep the face inside a 500 px high photo
    box, notes = plan_crop(lm, 1000, 500, CropParams(padding=1.0, min_side=64))
    assert box.side == pytest.approx(500)  # 600 wanted
    assert any(n.startswith("shrunk from 600 to 500") for n in notes)
    assert box.cy - box.side / 2 >= 0 and box.cy + box.side / 2 <= 500
    with pytest.raises(CropRejected, match="crop side 500 px < crop.min_side 512"):
        plan_crop(lm, 1000, 500, CropParams(padding=1.0, min_side=512))


def test_output_side_never_upscales_by_default():
    p = CropParams()
    assert output_side(3000, p) == 1024
    assert output_side(700, p) == 640
    assert output_side(700, CropParams(allow_upscale=True)) == 1024


@pytest.mark.parametrize("tilt", [-20.0, 0.0, 12.0])
def test_alignment_levels_the_eyes(tilt):
    theta = math.radians(tilt)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lm = (LANDMARKS - 500) @ rot.T + 1000
    box, _ = plan_crop(lm, 2000, 2000, CropParams(min_side=64))
    assert box.angle == pytest.approx(tilt, abs=1e-6)
    inside = transform_points(lm, box, 512)
    assert inside[0, 1] == pytest.approx(inside[1, 1], abs=1e-6)  # level eyes
    assert inside[0, 0] < inside[1, 0] and inside[3, 1] > inside[0, 1]  # not flipped
    unaligned, _ = plan_crop(lm, 2000, 2000, CropParams(min_side=64, align=False))
    assert unaligned.angle == 0.0


def test_warped_pixels_match_the_mapped_landmarks():
    img = np.zeros((2000, 2000, 3), np.uint8)
    for x, y in LANDMARKS.astype(int):
        cv2.circle(img, (x, y), 6, (255, 255, 255), -1)
    box, _ = plan_crop(LANDMARKS, 2000, 2000, CropParams(min_side=64))
    crop = warp_crop(img, box, 256)
    for x, y in transform_points(LANDMARKS, box, 256):
        assert crop[round(y), round(x)].max() > 100


def test_large_reduction_uses_area_averaging():
    """A fine checkerboard reduced 8x becomes grey, not aliased stripes."""
    board = (np.indices((4000, 4000)).sum(axis=0) % 2 * 255).astype(np.uint8)
    img = np.dstack([board] * 3)
    lm = LANDMARKS * 4
    box, _ = plan_crop(lm, 4000, 4000, CropParams(min_side=64))
    crop = warp_crop(img, box, 128)
    assert crop.shape == (128, 128, 3)
    assert abs(float(crop.mean()) - 127.5) < 6 and float(crop.std()) < 12


def test_alignment_on_a_rotated_real_portrait(tmp_path, astronaut_portrait):
    """Rotate a portrait by 15 degrees; the aligned crop has level eyes when re-detected."""
    h, w = astronaut_portrait.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 15, 1.0)
    tilted = cv2.warpAffine(astronaut_portrait, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(tilted).save(raw / "tilted.jpg", quality=95)
    params = validate_params({"crop": {"min_side": 256}})
    out = tmp_path / "out"
    detect_shard(raw, out / "0.f.parquet", out / "0.i.parquet", params)
    gather_detections(
        [(out / "0.f.parquet", out / "0.i.parquet")], DetectOutputs.beside(out / "faces.parquet")
    )
    crop_shard(
        raw, out / "faces.parquet", out / "images.parquet", out / "crops", out / "c.parquet", params
    )
    crops_dir = out / "crops"
    gather_crops([out / "c.parquet"], crops_dir, crops_dir / "crops.parquet", crops_dir / "r.csv")
    crops = pd.read_parquet(out / "crops" / "crops.parquet")
    row = crops[crops["status"] == "ok"].iloc[0]
    assert abs(row["angle"]) == pytest.approx(15, abs=4)
    crop = np.asarray(Image.open(out / "crops" / row["crop"]))
    assert crop.shape == (row["out_side"], row["out_side"], 3)
    backend = make_backend(Params().faces)
    (det,) = [d for d in backend.detect(crop) if d.score > 0.25]
    (face,) = backend.describe(crop, [det])
    eye_angle = math.degrees(math.atan2(*(face.landmarks[1] - face.landmarks[0])[::-1]))
    assert abs(eye_angle) < 3


def test_crop_step_on_the_sample_data(demo_results):
    crops = pd.read_parquet(demo_results / "crops" / "crops.parquet")
    rejected = pd.read_csv(demo_results / "crops" / "rejected.csv")
    ok = crops[crops["status"] == "ok"]
    assert len(ok) >= 30
    for row in ok.itertuples():
        assert (demo_results / "crops" / row.crop).is_file()
        assert row.out_side % 64 == 0 and row.out_side <= 1024 and row.side >= 512
    # the group photo's faces are too small for a 512 px crop: every one is listed
    group = rejected[rejected["image"] == "kontext/group_glasses_start.jpg"]
    assert len(group) == 6 and group["reason"].str.startswith("face too small").all()
    # duplicates reuse the first copy's crop instead of writing their own
    dup = crops.set_index("image").loc["kontext/astronaut_restore_start.jpg"]
    dup = dup.iloc[0] if isinstance(dup, pd.DataFrame) else dup
    assert dup["notes"].startswith("same file contents as kontext/astronaut_restore_copy_start.jpg")
    # no stray PNG: every file in the folder is referenced
    on_disk = {f"images/{p.name}" for p in (demo_results / "crops" / "images").iterdir()}
    assert on_disk == set(ok["crop"])

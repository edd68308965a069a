"""Pair scoring on controlled edits of one portrait: each score moves the way it should,
start and end stay pixel-aligned, and every choice and rejection is written down."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facelora.config import Params, validate_params
from facelora.prepare.faces.align import face_frame
from facelora.prepare.faces.backends import make_backend
from facelora.prepare.sample_data import warmer_skin

from helpers import run_data_half


def _save(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)


@pytest.fixture(scope="module")
def edits(tmp_path_factory, astronaut_portrait):
    """A Kontext folder of controlled edits of one portrait, run through the data half."""
    base = astronaut_portrait
    backend = make_backend(Params().faces)
    (det,) = [d for d in backend.detect(base) if d.score > 0.25]
    (face,) = backend.describe(base, [det])
    lm = face.landmarks
    frame = face_frame(lm)
    raw = tmp_path_factory.mktemp("edits") / "raw"

    def pair(name, start, end):
        _save(raw / f"{name}_start.jpg", start)
        _save(raw / f"{name}_end.jpg", end)
        (raw / f"{name}.txt").write_text(f"EDITFACE make the {name} change\n")

    _, warm = warmer_skin(base, lm)
    pair("warm", base, warm)
    hair = base.copy()  # recolour what lies above the eyebrows: hair
    top = int(lm[:2, 1].mean() - 0.45 * frame.size)
    x0, x1 = int(frame.center[0] - frame.size), int(frame.center[0] + frame.size)
    hair[: max(0, top), max(0, x0) : x1] = hair[: max(0, top), max(0, x0) : x1][..., ::-1]
    pair("hair", base, hair)
    background = cv2.GaussianBlur(base, (0, 0), 12)  # everything changes, face included
    mask = np.zeros(base.shape[:2], np.float32)
    cv2.ellipse(
        mask, tuple(int(v) for v in frame.center), (int(frame.size * 0.5),) * 2, 0, 0, 360, 1, -1
    )
    mask = cv2.GaussianBlur(mask, (0, 0), 10)[..., None]
    background = (base * mask + background * (1 - mask)).astype(np.uint8)
    pair("background", base, background)
    h, w = base.shape[:2]
    rot = cv2.getRotationMatrix2D((float(frame.center[0]), float(frame.center[1])), 20, 1.0)
    pair("rotated", base, cv2.warpAffine(base, rot, (w, h), borderMode=cv2.BORDER_REFLECT))
    pair("bigger", base, cv2.resize(warm, (w * 3 // 2, h * 3 // 2), interpolation=cv2.INTER_CUBIC))
    pair("aspect", base, np.ascontiguousarray(warm[:, : int(w * 0.8)]))
    gone = base.copy()
    cv2.ellipse(
        gone,
        tuple(int(v) for v in frame.center),
        (int(frame.size * 0.8),) * 2,
        0,
        0,
        360,
        (128, 128, 128),
        -1,
    )
    pair("noface", base, gone)
    results = run_data_half(raw, raw.parent / "results", Params())
    pairs = pd.read_parquet(results / "pairs" / "pairs.parquet")
    pairs["name"] = pairs["start"].str.replace("_start.jpg", "", regex=False)
    return pairs.set_index("name"), results


def test_face_local_edit_scores(edits):
    pairs, _ = edits
    warm = pairs.loc["warm"]
    assert warm["status"] == "ok" and warm["geometry"] == "start"
    assert warm["skin_delta_e"] > 3.0
    assert warm["bg_ssim"] > 0.98
    assert warm["hair_sim"] > 0.9
    assert warm["identity_sim"] > 0.93
    assert warm["pose_diff"] < 5
    assert 0 < warm["quality"] <= 1


def test_skin_tone_difference_separates_colour_edits(edits):
    pairs, _ = edits
    assert pairs.loc["warm", "skin_delta_e"] > 3 * pairs.loc["hair", "skin_delta_e"]


def test_hair_similarity_drops_when_the_hair_changes(edits):
    pairs, _ = edits
    assert pairs.loc["hair", "hair_sim"] < pairs.loc["warm", "hair_sim"] - 0.1


def test_background_ssim_measures_edit_containment(edits):
    pairs, _ = edits
    assert pairs.loc["background", "bg_ssim"] < pairs.loc["warm", "bg_ssim"] - 0.1


def test_pose_difference_sees_a_turned_head(edits):
    pairs, _ = edits
    assert pairs.loc["rotated", "pose_diff"] > 12
    assert pairs.loc["warm", "pose_diff"] < pairs.loc["rotated", "pose_diff"] / 3


def test_larger_end_image_stays_pixel_aligned(edits):
    pairs, results = edits
    bigger = pairs.loc["bigger"]
    assert bigger["geometry"] == "start" and bigger["bg_ssim"] > 0.95
    start = np.asarray(Image.open(results / "pairs" / bigger["start_crop"]))
    end = np.asarray(Image.open(results / "pairs" / bigger["end_crop"]))
    assert start.shape == end.shape
    corner = (slice(0, 60), slice(0, 60))  # background: same pixels in both crops
    assert np.abs(start[corner].astype(int) - end[corner]).mean() < 8


def test_different_aspect_ratio_uses_each_photos_own_crop(edits):
    pairs, _ = edits
    aspect = pairs.loc["aspect"]
    assert aspect["status"] == "ok" and aspect["geometry"] == "own"
    assert np.isnan(aspect["bg_ssim"])


def test_end_without_a_face_is_rejected_with_the_reason(edits):
    pairs, results = edits
    noface = pairs.loc["noface"]
    assert noface["status"] == "rejected"
    assert noface["reason"].startswith("no face found in the end image")
    rejected = pd.read_csv(results / "pairs" / "rejected.csv")
    assert noface["pair_id"] in set(rejected["pair_id"])


def test_pair_crops_have_one_size_and_exist(edits):
    pairs, results = edits
    for row in pairs[pairs["status"] == "ok"].itertuples():
        a = Image.open(results / "pairs" / row.start_crop)
        b = Image.open(results / "pairs" / row.end_crop)
        assert a.size == b.size == (row.out_side, row.out_side) or row.geometry == "own"


# --- the sample dataset -------------------------------------------------------------------


def test_group_photo_pair_picks_the_edited_face(demo_results, sample_raw):
    pairs = pd.read_parquet(demo_results / "pairs" / "pairs.parquet")
    faces = pd.read_parquet(demo_results / "faces" / "faces.parquet")
    group = pairs[pairs["start"] == "kontext/group_glasses_start.jpg"].iloc[0]
    assert group["face_choice"].startswith("most changed of 6 faces")
    a = np.asarray(Image.open(sample_raw / "kontext/group_glasses_start.jpg")).astype(int)
    b = np.asarray(Image.open(sample_raw / "kontext/group_glasses_end.jpg")).astype(int)
    diff = np.abs(a - b).sum(axis=2)
    ys, xs = np.nonzero(diff > 60)
    cx, cy = xs.mean(), ys.mean()  # where the sunglasses were drawn
    chosen = faces[
        (faces["image"] == group["start"]) & (faces["face_index"] == group["start_face"])
    ].iloc[0]
    assert chosen["x0"] < cx < chosen["x1"] and chosen["y0"] < cy < chosen["y1"]
    # its faces are too small for crop.min_side 512: rejected, with the crop's reason
    assert group["status"] == "rejected" and "face too small" in group["reason"]


def test_degraded_start_uses_the_end_face_for_geometry(demo_results):
    pairs = pd.read_parquet(demo_results / "pairs" / "pairs.parquet").set_index("start")
    restore = pairs.loc["folders/control/t1_person2_restore.jpg"]
    assert restore["status"] == "ok" and restore["geometry"] == "end"
    assert np.isnan(restore["identity_sim"]) and restore["bg_ssim"] > 0.95


def test_sample_rejections_are_all_listed(demo_results):
    rejected = pd.read_csv(demo_results / "pairs" / "rejected.csv")
    reasons = " | ".join(rejected["reason"])
    assert "unpaired: no lonely_end image beside it" in reasons
    assert "unpaired: no image named orphan_control in target/" in reasons
    assert "duplicate of pair" in reasons
    assert "start file not found" in reasons  # the manifest row pointing at missing files


def test_reference_images_are_cropped_and_scored(demo_results):
    pairs = pd.read_parquet(demo_results / "pairs" / "pairs.parquet").set_index("start")
    warm = pairs.loc["kontext/astronaut_warm_start.jpg"]
    assert list(warm["references"]) == ["kontext/astronaut_warm_start2.jpg"]
    assert len(warm["reference_crops"]) == 1
    assert (demo_results / "pairs" / warm["reference_crops"][0]).is_file()
    assert warm["identity_sim_ref"] > 0.93  # the mirrored photo of the same person


def test_multi_face_all_and_largest(tmp_path, sample_raw):
    raw = tmp_path / "raw"
    raw.mkdir()
    for role in ("start", "end"):
        src = sample_raw / f"kontext/group_glasses_{role}.jpg"
        (raw / f"g_{role}.jpg").write_bytes(src.read_bytes())
    (raw / "g.txt").write_text("EDITFACE add dark round sunglasses\n")
    small = {
        "crop": {"min_side": 64, "padding": 0.3},
        "split": {"min_validation": 0, "validation_fraction": 0.0},
    }
    for policy, expected in (("all", 6), ("largest", 1)):
        params = validate_params({**small, "pairs": {"multi_face": policy}})
        results = run_data_half(raw, tmp_path / policy, params)
        pairs = pd.read_parquet(results / "pairs" / "pairs.parquet")
        assert len(pairs) == expected and (pairs["status"] == "ok").all()
        if policy == "all":
            assert pairs["pair_id"].str.match(r"^p[0-9a-f]{12}_f\d$").all()
            assert sorted(pairs["start_face"]) == list(range(6))
        else:
            assert pairs.iloc[0]["start_face"] == 0
            assert pairs.iloc[0]["face_choice"] == "largest of 6 faces"


def test_require_gate_names_the_setting(tmp_path, sample_raw):
    raw = tmp_path / "raw"
    raw.mkdir()
    for role in ("start", "end"):
        src = sample_raw / f"kontext/astronaut_lips_{role}.jpg"
        (raw / f"a_{role}.jpg").write_bytes(src.read_bytes())
    params = validate_params(
        {
            "pairs": {"require": {"identity_sim": {"min": 0.9999}}},
            "captions": {"default_change": "paint the lips red"},
            "split": {"min_validation": 0, "validation_fraction": 0.0},
            "phases": [{"name": "all", "steps": 1, "min_pairs": 1}],
        }
    )
    run_data_half(raw, tmp_path / "out", params)
    # the one phase is written empty, saying why (the data half goes on to its summary)
    phase = json.loads((tmp_path / "out" / "phases" / "all" / "phase.json").read_text())
    assert phase["selected"] == 0 and "no training pairs to select from" in phase["empty"]
    pairs = pd.read_parquet(tmp_path / "out" / "pairs" / "pairs.parquet")
    assert pairs.iloc[0]["status"] == "rejected"
    assert "< pairs.require.identity_sim.min 0.9999" in pairs.iloc[0]["reason"]

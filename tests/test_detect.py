"""The detect step on real photos: faces found upright, coordinates at full resolution,
sharded runs identical to unsharded ones, every file accounted for."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facelora.config import Params, validate_params
from facelora.prepare.faces import detect as detect_module
from facelora.prepare.faces.backends import FaceBackend, make_backend
from facelora.prepare.faces.detect import (
    DetectOutputs,
    analyse_image,
    detect_shard,
    gather_detections,
)
from facelora.prepare.images import read_file


def detect_folder(folder, out_dir, params=None, shards=1):
    params = params or Params()
    tables = []
    for i in range(shards):
        f, im = out_dir / f"{i}.faces.parquet", out_dir / f"{i}.images.parquet"
        detect_shard(folder, f, im, params, (i, shards))
        tables.append((f, im))
    gather_detections(tables, DetectOutputs.beside(out_dir / "faces.parquet"))
    return (
        pd.read_parquet(out_dir / "faces.parquet"),
        pd.read_parquet(out_dir / "images.parquet"),
        pd.read_csv(out_dir / "rejected.csv"),
    )


def analyse(rel, path, params, backend):
    return analyse_image(rel, read_file(path, params.images), params, backend)


@pytest.fixture(scope="module")
def backend():
    return make_backend(Params().faces)


def test_portrait_face_found_with_landmarks_inside_the_box(tmp_path, astronaut_portrait, backend):
    Image.fromarray(astronaut_portrait).save(tmp_path / "p.jpg", quality=95)
    row, faces = analyse("p.jpg", tmp_path / "p.jpg", Params(), backend)
    assert row["status"] == "ok" and row["n_faces"] == 1 and len(faces) == 1
    face = faces[0]
    lm = np.array(face["landmarks"])
    assert lm.shape == (5, 2)
    assert (lm[:, 0] > face["x0"]).all() and (lm[:, 0] < face["x1"]).all()
    assert (lm[:, 1] > face["y0"]).all() and (lm[:, 1] < face["y1"]).all()
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # left/right by image side
    assert lm[2, 1] > lm[0, 1] and lm[3, 1] > lm[2, 1]  # eyes above nose above mouth
    assert np.linalg.norm(face["embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert len(face["embedding"]) == 128
    assert abs(face["roll"]) < 10 and abs(face["yaw"]) < 25


def test_boxes_from_the_downscaled_copy_map_back_to_full_resolution(
    tmp_path, astronaut_portrait, backend
):
    Image.fromarray(astronaut_portrait).save(tmp_path / "p.jpg", quality=95)
    small = validate_params({"faces": {"max_side": 640}})
    full = validate_params({"faces": {"max_side": 4096}})
    _, (a,) = analyse("p.jpg", tmp_path / "p.jpg", small, backend)
    _, (b,) = analyse("p.jpg", tmp_path / "p.jpg", full, backend)
    side = b["x1"] - b["x0"]
    assert side > 300  # a full-resolution box, not one of the 640 px copy
    for k in ("x0", "y0", "x1", "y1"):
        assert abs(a[k] - b[k]) < 0.2 * side, k  # HOG boxes snap to its pyramid scales
    assert np.linalg.norm(np.subtract(a["landmarks"], b["landmarks"]), axis=1).max() < 0.05 * side
    assert float(np.dot(a["embedding"], b["embedding"])) > 0.95


def test_exif_rotated_photo_is_detected_upright(tmp_path, astronaut_portrait, backend):
    upright = astronaut_portrait
    Image.fromarray(upright).save(tmp_path / "up.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned the other way; the viewer rotates 90 degrees
    stored = np.ascontiguousarray(np.rot90(upright, k=-1))
    Image.fromarray(stored).save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    _, (a,) = analyse("up.jpg", tmp_path / "up.jpg", Params(), backend)
    row, faces = analyse("rot.jpg", tmp_path / "rot.jpg", Params(), backend)
    assert row["orientation"] == 8 and len(faces) == 1
    assert (row["width"], row["height"]) == (upright.shape[1], upright.shape[0])
    b = faces[0]
    assert abs(a["x0"] - b["x0"]) < 20 and abs(a["y0"] - b["y0"]) < 20
    assert abs(b["roll"]) < 10  # upright, not lying on its side


def test_no_face_many_faces_and_tiny_faces_are_recorded(tmp_path, sample_raw):
    group = sample_raw / "kontext" / "group_glasses_start.jpg"
    for name, settings in [
        ("crowd", {"faces": {"max_faces": 3}}),
        ("tiny", {"faces": {"min_face_px": 200}}),
    ]:
        folder = tmp_path / name / "raw"
        folder.mkdir(parents=True)
        (folder / "group.jpg").write_bytes(group.read_bytes())
        (folder / "coffee.jpg").write_bytes(
            (sample_raw / "bad" / "coffee_no_face.jpg").read_bytes()
        )
        faces, images, rejected = detect_folder(folder, tmp_path / name, validate_params(settings))
        reasons = dict(zip(rejected["image"], rejected["reason"], strict=True))
        assert reasons["coffee.jpg"].startswith("no face found")
        assert faces.empty
        if name == "crowd":
            assert reasons["group.jpg"] == "too many faces: 6 > faces.max_faces 3"
        else:
            assert reasons["group.jpg"].startswith("only tiny faces: 6 face(s) smaller than")
            assert images.set_index("image").loc["group.jpg", "n_small_faces"] == 6


def test_group_photo_faces_ordered_largest_first(tmp_path, sample_raw):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "g.jpg").write_bytes(
        (sample_raw / "kontext" / "group_glasses_start.jpg").read_bytes()
    )
    faces, _, _ = detect_folder(folder, tmp_path)
    assert list(faces["face_index"]) == list(range(6))
    areas = ((faces["x1"] - faces["x0"]) * (faces["y1"] - faces["y0"])).to_numpy()
    assert (np.diff(areas) <= 1e-3).all()


def test_every_file_of_the_sample_data_is_accounted_for(demo_results, sample_raw):
    images = pd.read_parquet(demo_results / "faces" / "images.parquet")
    rejected = pd.read_csv(demo_results / "faces" / "rejected.csv")
    on_disk = {
        p.relative_to(sample_raw).as_posix()
        for p in sample_raw.rglob("*")
        if p.suffix.lower() in (".jpg", ".png", ".webp")
    }
    assert set(images["image"]) == on_disk
    reasons = dict(zip(rejected["image"], rejected["reason"], strict=True))
    assert reasons["bad/empty.jpg"] == "empty file (0 bytes)"
    assert reasons["bad/truncated.jpg"].startswith("truncated or corrupt")
    assert reasons["bad/not_an_image.png"].startswith("not a readable image")
    assert reasons["bad/bomb.png"].startswith("too many pixels: 40000x40000")
    assert reasons["bad/coffee_no_face.jpg"].startswith("no face found")
    ok = images.set_index("image")
    assert ok.loc["kontext/grace_hopper_warm_start.jpg", "orientation"] == 6
    assert "CMYK converted to RGB" in ok.loc["kontext/astronaut_cmyk_start.jpg", "notes"]
    assert ok.loc["kontext/Grace Hopper – lips_start.jpg", "n_faces"] == 1
    # identical bytes point at the first copy, in name order
    assert ok.loc["kontext/astronaut_restore_start.jpg", "duplicate_of"] == (
        "kontext/astronaut_restore_copy_start.jpg"
    )


def test_sharded_detection_equals_unsharded(tmp_path, sample_raw):
    """3 shards gathered give byte-identical tables to 1 shard."""
    subset = tmp_path / "raw"
    for rel in [
        "kontext/astronaut_glasses_start.jpg",
        "kontext/grace_hopper_warm_start.jpg",
        "kontext/group_glasses_start.jpg",
        "bad/empty.jpg",
        "bad/truncated.jpg",
        "folders/target/t1_person1_warm.jpg",
        "manifest/before/t1_person5_lips.jpg",
        "kontext/Grace Hopper – lips_end.jpg",
    ]:
        (subset / rel).parent.mkdir(parents=True, exist_ok=True)
        (subset / rel).write_bytes((sample_raw / rel).read_bytes())
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    detect_folder(subset, tmp_path / "one", shards=1)
    detect_folder(subset, tmp_path / "three", shards=3)
    for name in ("faces.parquet", "images.parquet", "rejected.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


def test_two_worker_processes_give_the_same_tables(tmp_path, sample_raw):
    subset = tmp_path / "raw"
    subset.mkdir()
    for rel in [
        "kontext/astronaut_glasses_start.jpg",
        "kontext/group_glasses_start.jpg",
        "bad/empty.jpg",
    ]:
        (subset / rel.replace("/", "_")).write_bytes((sample_raw / rel).read_bytes())
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        detect_shard(subset, out / "f.parquet", out / "i.parquet", Params(), (0, 1), workers)
        outs.append(out)
    for name in ("f.parquet", "i.parquet"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


@pytest.mark.shared_faces
def test_real_photos(tmp_path, shared_faces):
    _, images, rejected = detect_folder(shared_faces, tmp_path)
    per_image = images.set_index("image")["n_faces"]
    for path in (shared_faces / "same_person").rglob("*"):
        if path.is_file() and path.stat().st_size > 20_000:  # not the 150 px aligned crops
            rel = path.relative_to(shared_faces).as_posix()
            assert per_image[rel] == 1, rel
    for rel in ["no_face/brick.png", "no_face/coffee.png", "no_face/rocket.jpg"]:
        assert per_image[rel] == 0
        assert rel in set(rejected["image"])
    assert per_image["group/two_people.jpg"] == 2
    assert per_image["group/kit_with_rose.jpg"] == 2
    assert per_image["group/insightface_t1.jpg"] == 6
    # the RGBA PNG is composited and still found
    assert per_image["same_person/alex_lacamoire/alex-lacamoire.png"] == 1


def test_low_confidence_faces_get_their_own_reason(tmp_path, astronaut_portrait, backend):
    Image.fromarray(astronaut_portrait).save(tmp_path / "p.jpg", quality=95)
    strict = validate_params({"faces": {"dlib": {"min_score": 5.0}}})
    row, faces = analyse("p.jpg", tmp_path / "p.jpg", strict, make_backend(strict.faces))
    assert faces == [] and row["status"] == "rejected"
    assert row["reason"].startswith("only low-confidence faces: ")
    assert "< faces.dlib.min_score 5.0" in row["reason"]


def test_identical_files_are_analysed_once_per_job(tmp_path, astronaut_portrait, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(astronaut_portrait).save(raw / "a.jpg", quality=90)
    (raw / "b copy.jpg").write_bytes((raw / "a.jpg").read_bytes())
    calls = []
    real = make_backend(Params().faces)

    class CountingDetector:
        name = real.detector.name
        min_score = real.detector.min_score

        def detect(self, rgb):
            calls.append(rgb.shape)
            return real.detector.detect(rgb)

    monkeypatch.setattr(
        detect_module, "make_backend", lambda _: FaceBackend(CountingDetector(), real.embedder)
    )
    faces, images, _ = detect_folder(raw, tmp_path)
    assert len(calls) == 1
    a, b = faces[faces["image"] == "a.jpg"].iloc[0], faces[faces["image"] == "b copy.jpg"].iloc[0]
    assert list(a["embedding"]) == list(b["embedding"]) and a["x0"] == b["x0"]
    assert images.set_index("image").loc["b copy.jpg", "duplicate_of"] == "a.jpg"

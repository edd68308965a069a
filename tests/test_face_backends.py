"""The insightface and ultralytics face backends.

Tiny models built here, in the libraries' real formats, prove that our code wires each library
correctly (file discovery, colour order, coordinates, thresholds, shapes); they say nothing
about accuracy. Only test_real_insightface_pack uses a real model, when one is on disk.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facelora.config import (
    SAME_PERSON_SIMILARITY,
    DlibParams,
    FacesParams,
    InsightfaceParams,
    UltralyticsParams,
)
from facelora.errors import ModelFileMissing
from facelora.prepare.faces.backends import make_backend
from facelora.prepare.faces.types import Detection

from helpers import expected_face, face_image, make_pack

# --- missing models -------------------------------------------------------------------------


def test_insightface_missing_pack_names_settings(tmp_path):
    from facelora.prepare.faces.insightface_backend import ArcFaceEmbedder, ScrfdDetector

    params = InsightfaceParams(root=str(tmp_path / "nowhere"))
    with pytest.raises(ModelFileMissing) as err:
        ScrfdDetector(params)
    message = str(err.value)
    assert "faces.insightface.root" in message and "faces.insightface.pack" in message
    assert str(tmp_path / "nowhere" / "models" / "buffalo_l") in message
    assert "det_10g.onnx" in message
    with pytest.raises(ModelFileMissing, match=r"w600k_r50\.onnx"):
        ArcFaceEmbedder(params, DlibParams())
    with pytest.raises(ModelFileMissing, match=r"faces\.insightface\.pack"):
        make_backend(FacesParams(backend="insightface", insightface=params))


def test_insightface_pack_without_recogniser(tmp_path):
    from facelora.prepare.faces.insightface_backend import ArcFaceEmbedder, ScrfdDetector

    folder = make_pack(tmp_path)
    (folder / "w600k_r50.onnx").unlink()  # the decoys must not stand in for it
    params = InsightfaceParams(root=str(tmp_path))
    ScrfdDetector(params)
    with pytest.raises(ModelFileMissing, match=r"faces\.insightface\.pack.*no recognition model"):
        ArcFaceEmbedder(params, DlibParams())


def test_ultralytics_missing_weights_names_setting(tmp_path):
    from facelora.prepare.faces.ultralytics_backend import YoloDetector

    with pytest.raises(ModelFileMissing, match=r"faces\.ultralytics\.weights: not set"):
        YoloDetector(UltralyticsParams())
    absent = tmp_path / "yolov8n-face.pt"
    with pytest.raises(ModelFileMissing, match=r"faces\.ultralytics\.weights = .*not found"):
        YoloDetector(UltralyticsParams(weights=str(absent)))
    params = FacesParams(backend="ultralytics", ultralytics=UltralyticsParams(weights=str(absent)))
    with pytest.raises(ModelFileMissing, match=r"faces\.ultralytics\.weights"):
        make_backend(params)


# --- insightface plumbing with tiny models --------------------------------------------------


def test_scrfd_finds_the_face_in_full_image_pixels(tmp_path):
    from facelora.prepare.faces.insightface_backend import ScrfdDetector

    make_pack(tmp_path)
    detector = ScrfdDetector(InsightfaceParams(root=str(tmp_path), det_size=320))
    # A red face at grid cell (3, 2) and a blue square at (6, 5): only red counts as a face,
    # so the blue one is found only if channels were swapped.
    rgb = face_image([(3, 2)])
    rgb[5 * 64 : 6 * 64, 6 * 64 : 7 * 64] = (0, 0, 255)
    found = detector.detect(rgb)
    assert len(found) == 1
    box, landmarks = expected_face(3, 2)
    assert found[0].score > 0.99
    np.testing.assert_allclose(found[0].box, box, atol=1.0)
    assert found[0].landmarks.shape == (5, 2) and found[0].landmarks.dtype == np.float32
    np.testing.assert_allclose(found[0].landmarks, landmarks, atol=1.0)
    assert found[0].landmarks[0, 0] < found[0].landmarks[1, 0]  # eye on the image's left first


def test_scrfd_min_score_and_det_size(tmp_path):
    from facelora.prepare.faces.insightface_backend import ScrfdDetector

    make_pack(tmp_path)
    # A dim red face (score sigmoid(12 * mean red)): kept or dropped by min_score alone.
    rgb = face_image([(1, 1)], colour=(160, 0, 0))
    score = 1 / (1 + np.exp(-12 * (160 - 127.5) / 128))
    low = ScrfdDetector(InsightfaceParams(root=str(tmp_path), det_size=320, min_score=0.5))
    high = ScrfdDetector(InsightfaceParams(root=str(tmp_path), det_size=320, min_score=0.99))
    assert [round(d.score, 2) for d in low.detect(rgb)] == [round(score, 2)]
    assert high.detect(rgb) == []
    # At det_size 640 the image is not shrunk, so the same face spans 2x2 detector cells.
    big = ScrfdDetector(InsightfaceParams(root=str(tmp_path), det_size=640))
    boxes = sorted(tuple(d.box) for d in big.detect(face_image([(1, 1)])))
    assert boxes == [(64, 64, 96, 96), (64, 96, 96, 128), (96, 64, 128, 96), (96, 96, 128, 128)]


@pytest.mark.parametrize("dim", [512, 128])
def test_arcface_embeds_aligned_faces(tmp_path, dim):
    from facelora.prepare.faces.insightface_backend import ArcFaceEmbedder, ScrfdDetector

    make_pack(tmp_path, dim=dim)
    params = InsightfaceParams(root=str(tmp_path), det_size=320)
    embedder = ArcFaceEmbedder(params, DlibParams())
    assert embedder.dim == dim  # read from the model, not assumed
    rgb = face_image([(3, 2)])
    detections = ScrfdDetector(params).detect(rgb)
    faces = embedder.describe(rgb, detections)
    assert len(faces) == 1
    face = faces[0]
    assert face.embedding.shape == (dim,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(face.landmarks, detections[0].landmarks)
    np.testing.assert_array_equal(face.box, detections[0].box)
    # The crop is a red face: mean red above mean blue only when RGB became BGR for insightface.
    assert face.embedding[0] > face.embedding[2] + 0.1
    # Aligned on the landmarks: a blue face crop gives a different embedding.
    blue = face_image([(3, 2)], colour=(0, 0, 255))
    other = embedder.describe(blue, detections)[0].embedding
    assert other[2] > other[0] + 0.1


def test_arcface_takes_landmarks_from_dlib_when_missing(tmp_path):
    from facelora.prepare.faces.insightface_backend import ArcFaceEmbedder

    make_pack(tmp_path, decoys=False)
    embedder = ArcFaceEmbedder(InsightfaceParams(root=str(tmp_path)), DlibParams())
    rgb = face_image([(3, 2)])
    box, _ = expected_face(3, 2)
    faces = embedder.describe(rgb, [Detection(box, 0.9, None)])
    landmarks = faces[0].landmarks
    assert landmarks.shape == (5, 2)
    # dlib's predictor places its points inside (or at the edge of) the box it is given.
    assert np.all(landmarks >= box[:2] - 8) and np.all(landmarks <= box[2:] + 8)
    assert np.linalg.norm(faces[0].embedding) == pytest.approx(1.0, abs=1e-5)


def test_pack_as_a_direct_folder_and_manifest(tmp_path, monkeypatch):
    from facelora.prepare.faces.insightface_backend import ScrfdDetector, model_file

    folder = make_pack(tmp_path / "elsewhere", pack="mine", decoys=False)
    monkeypatch.chdir(tmp_path)  # a relative folder path, not a pack name under ROOT/models
    params = InsightfaceParams(root=str(tmp_path / "unused"), pack="elsewhere/models/mine")
    assert model_file(params, "recognition").resolve() == (folder / "w600k_r50.onnx").resolve()
    # A manifest-V2 pack (insightface 2.1) names its files and their preprocessing: both are
    # used. Here the detector reads raw 0..255 pixels, so a dark red square (100) becomes a face,
    # which it is not with SCRFD's usual (x - 127.5) / 128.
    dark = face_image([(3, 2)], colour=(100, 0, 0))
    params = params.model_copy(update={"det_size": 320, "min_score": 0.6})
    assert ScrfdDetector(params).detect(dark) == []
    (folder / "det_10g.onnx").rename(folder / "a.onnx")
    (folder / "w600k_r50.onnx").rename(folder / "b.onnx")
    (folder / "MODEL.LICENSE").write_text("test\n")
    manifest = {
        "manifest_version": 2,
        "model_id": "mine",
        "license": "MODEL.LICENSE",
        "tasks": {
            "detection": {"file": "a.onnx", "preprocessing": {"mean": 0.0, "std": 1.0}},
            "recognition": {"file": "b.onnx"},
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert model_file(params, "detection").resolve() == (folder / "a.onnx").resolve()
    assert len(ScrfdDetector(params).detect(dark)) == 1


def test_make_backend_insightface(tmp_path):
    make_pack(tmp_path)
    params = FacesParams(
        backend="insightface", insightface=InsightfaceParams(root=str(tmp_path), det_size=320)
    )
    backend = make_backend(params)
    assert backend.name == "insightface-scrfd+insightface-arcface"
    rgb = face_image([(3, 2), (6, 5)])
    faces = backend.describe(rgb, backend.detect(rgb))
    assert len(faces) == 2


INSIGHTFACE_HOME = Path("~/.insightface/models").expanduser()
ASTRONAUT_LANDMARKS = [[203, 101.5], [247, 104], [225, 127], [201, 140], [245, 141]]
REAL_PACKS = [p for p in ("buffalo_l", "buffalo_sc") if (INSIGHTFACE_HOME / p).is_dir()]


@pytest.mark.skipif(
    not REAL_PACKS,
    reason=f"no real InsightFace pack (buffalo_l or buffalo_sc) under {INSIGHTFACE_HOME}",
)
def test_real_insightface_pack():
    from skimage.data import astronaut

    from facelora.prepare.faces.insightface_backend import ArcFaceEmbedder, ScrfdDetector

    params = InsightfaceParams(pack=REAL_PACKS[0])
    rgb = astronaut()  # 512x512, one face
    found = ScrfdDetector(params).detect(rgb)
    assert len(found) == 1
    landmarks = found[0].landmarks
    # Within a few pixels of dlib's 5 points on this image (68-point predictor, HOG box
    # 179, 83, 266, 170): eyes, nose, mouth corners, the eye on the image's left first.
    np.testing.assert_allclose(landmarks, ASTRONAUT_LANDMARKS, atol=12)
    x0, y0, x1, y1 = found[0].box
    assert x0 < landmarks[:, 0].min() and landmarks[:, 0].max() < x1
    assert y0 < landmarks[:, 1].min() and landmarks[:, 1].max() < y1
    assert abs((x0 + x1) / 2 - 222.5) < 30 and abs((y0 + y1) / 2 - 126.5) < 30
    embedder = ArcFaceEmbedder(params, DlibParams())
    assert embedder.dim == 512
    face = embedder.describe(rgb, found)[0]
    # The same face, mirrored, is still the same person for ArcFace.
    mirrored = np.ascontiguousarray(rgb[:, ::-1])
    twin = embedder.describe(mirrored, ScrfdDetector(params).detect(mirrored))[0]
    assert float(face.embedding @ twin.embedding) > SAME_PERSON_SIMILARITY["insightface"]


# --- ultralytics plumbing with tiny models --------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fail any name lookup or connection made during the test."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def make_yolo(path: Path, tmp_path: Path, pose: bool, score: float | None = None) -> Path:
    """A YOLOv8n (detect, or pose with 5 keypoints) built from ultralytics' own yaml, random
    weights, saved as a .pt. With `score`, every anchor's class logit is fixed to that score."""
    importlib.import_module(
        "facelora.prepare.faces.ultralytics_backend"
    )  # offline before ultralytics
    import torch
    import ultralytics
    import yaml
    from ultralytics import YOLO

    name = "yolov8-pose.yaml" if pose else "yolov8.yaml"
    cfg = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8" / name).read_text())
    cfg["nc"] = 1
    if pose:
        cfg["kpt_shape"] = [5, 3]
    cfg_file = tmp_path / ("yolov8n-pose.yaml" if pose else "yolov8n.yaml")
    cfg_file.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = YOLO(str(cfg_file))
    head = model.model.model[-1]
    if score is not None:
        with torch.no_grad():
            for branch in head.cv3:  # the class branch of each stride
                branch[-1].weight.zero_()
                branch[-1].bias.fill_(float(np.log(score / (1 - score))))
    model.model.names = {0: "face"}
    model.save(str(path))
    return path


def _check(detections, rgb, min_score: float, with_landmarks: bool) -> None:
    assert isinstance(detections, list)
    h, w = rgb.shape[:2]
    for d in detections:
        assert isinstance(d, Detection)
        assert d.box.shape == (4,) and d.box.dtype == float
        assert 0 <= d.box[0] <= d.box[2] <= w and 0 <= d.box[1] <= d.box[3] <= h
        assert isinstance(d.score, float) and d.score >= min_score
        if with_landmarks:
            assert d.landmarks.shape == (5, 2) and d.landmarks.dtype == np.float32
        else:
            assert d.landmarks is None


def test_yolo_pose_model_gives_landmarks_and_respects_min_score(tmp_path, no_network):
    from facelora.prepare.faces.ultralytics_backend import YoloDetector

    weights = make_yolo(tmp_path / "face-pose.pt", tmp_path, pose=True, score=0.6)
    rgb = face_image([(3, 2)])
    kept = YoloDetector(UltralyticsParams(weights=str(weights), min_score=0.5)).detect(rgb)
    assert kept, "every anchor scores 0.6, so min_score 0.5 must keep some boxes"
    _check(kept, rgb, 0.5, with_landmarks=True)
    assert all(d.score == pytest.approx(0.6, abs=1e-3) for d in kept)
    dropped = YoloDetector(UltralyticsParams(weights=str(weights), min_score=0.7)).detect(rgb)
    assert dropped == []
    assert no_network == []


def test_yolo_detect_model_random_weights(tmp_path, no_network):
    from facelora.prepare.faces.ultralytics_backend import YoloDetector

    weights = make_yolo(tmp_path / "face.pt", tmp_path, pose=False)
    rgb = (np.random.default_rng(1).random((240, 320, 3)) * 255).astype(np.uint8)
    detector = YoloDetector(UltralyticsParams(weights=str(weights), min_score=0.01))
    assert detector.name == "ultralytics-yolo"
    _check(detector.detect(rgb), rgb, 0.01, with_landmarks=False)
    assert no_network == []


def test_yolo_refuses_a_model_without_a_face_class(tmp_path):
    import torch

    from facelora.prepare.faces.ultralytics_backend import YoloDetector

    weights = make_yolo(tmp_path / "coco.pt", tmp_path, pose=False)
    checkpoint = torch.load(weights, weights_only=False)
    checkpoint["model"].names = {0: "person", 1: "car"}
    torch.save(checkpoint, weights)
    with pytest.raises(ValueError, match="no 'face'"):
        YoloDetector(UltralyticsParams(weights=str(weights)))


OFFLINE_PROBE = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network disabled by the test")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
import facelora.prepare.faces.ultralytics_backend
from ultralytics import utils
print(json.dumps({"online": utils.ONLINE, "config": str(utils.USER_CONFIG_DIR),
                  "attempts": attempts}))
"""


def test_ultralytics_import_stays_offline_and_out_of_home(tmp_path):
    """A fresh process (ultralytics reads its environment once, at import): no name lookups,
    no connections, and no settings written under the home folder."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "XDG_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"online": False, "config": report["config"], "attempts": []}
    assert Path(report["config"]).is_relative_to(tmp)
    assert list(home.iterdir()) == []


def test_importing_the_ultralytics_backend_leaves_pil_open_alone():
    """ultralytics patches PIL.Image.open to pip-install pi-heif on unreadable files; after
    the backend's import an unreadable file is PIL's own error again (a recorded rejection)."""
    import io

    from PIL import Image, UnidentifiedImageError

    import facelora.prepare.faces.ultralytics_backend  # noqa: F401

    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(b"hello world"))

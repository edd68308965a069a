"""Evaluation metrics: identity, LPIPS, background SSIM, CLIP score (facelora.evaluate.metrics).

Known cases run on scikit-image's astronaut (ships with the package); the ordering checks use
the real photos in ../shared/faces (skipped when absent). LPIPS and CLIP are exercised with
models built here (a random torchvision AlexNet saved to a file, a tiny random CLIP folder):
they prove the loading and plumbing, not the numbers; real weights are needed for those.
"""

from __future__ import annotations

import io
import math
import os
import socket

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from facelora.config import FacesParams
from facelora.evaluate.metrics import (
    BackgroundSSIM,
    CLIPScore,
    IdentitySimilarity,
    LPIPSDistance,
    MetricSettings,
    MetricSuite,
    ssim_map,
    to_rgb,
)
from facelora.models.perceptual import default_backbone_path, official_backbone_name
from facelora.prepare.pairs.quality import face_mask
from facelora.registry.scores import METRIC_NAMES

from helpers import face_image, make_pack, tiny_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DLIB_SAME_PERSON = 0.92
CHANGE = "make the person smile"


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection or download attempt is recorded and refused."""
    import huggingface_hub.constants

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return attempts


@pytest.fixture
def empty_hub(monkeypatch, tmp_path):
    """A torch hub cache with nothing in it."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


@pytest.fixture(scope="module")
def settings() -> MetricSettings:
    return MetricSettings(identity_backend="dlib", faces=FacesParams())


@pytest.fixture(scope="module")
def identity(settings) -> IdentitySimilarity:
    return IdentitySimilarity(settings)


@pytest.fixture(scope="module")
def background(settings, identity) -> BackgroundSSIM:
    return BackgroundSSIM(settings, identity.finder)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skdata.astronaut())


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return np.ascontiguousarray(skdata.coffee())


@pytest.fixture(scope="module")
def random_alexnet_file(tmp_path_factory):
    """A torchvision AlexNet state dict with RANDOM weights: for the loading path only."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "alexnet_random.pth"
    state = tvm.alexnet(weights=None).state_dict()
    torch.save(state, path)
    return path, state


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _brighter(rgb: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(rgb.astype(np.int16) + amount, 0, 255).astype(np.uint8)


# --- settings -----------------------------------------------------------------------------


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"metrics\.lpips_net"):
        MetricSettings(lpips_net="resnet")
    with pytest.raises(ValueError, match=r"eval\.identity_backend"):
        MetricSettings(identity_backend="yolo", section="eval")
    with pytest.raises(ValueError, match=r"metrics\.analysis_size"):
        MetricSettings(analysis_size=16)


# --- known cases (no shared photos needed) ------------------------------------------------


def test_identical_images(identity, background, astronaut):
    assert identity.available and identity.backend == "dlib-resnet128"
    assert identity.threshold == DLIB_SAME_PERSON
    same = identity(astronaut, astronaut)
    assert same.value == pytest.approx(1.0, abs=1e-5) and not same.failed
    bg = background(astronaut, astronaut)
    assert bg.value == pytest.approx(1.0, abs=1e-9) and bg.note is None


def test_identity_backend_choice(tmp_path, no_network, astronaut):
    from facelora.config import InsightfaceParams

    missing = FacesParams(insightface=InsightfaceParams(root=str(tmp_path / "none")))
    explicit = IdentitySimilarity(MetricSettings(identity_backend="insightface", faces=missing))
    assert not explicit.available
    assert "metrics.identity_backend" in explicit.reason
    assert "faces.insightface.root" in explicit.reason
    assert math.isnan(explicit(astronaut, source=astronaut).value)
    fallback = IdentitySimilarity(MetricSettings(identity_backend="auto", faces=missing))
    assert fallback.backend == "dlib-resnet128"
    assert "insightface not used" in fallback.describe()["notes"]

    make_pack(tmp_path)
    pack = FacesParams(insightface=InsightfaceParams(root=str(tmp_path), det_size=320))
    arcface = IdentitySimilarity(MetricSettings(identity_backend="auto", faces=pack))
    assert arcface.backend == "insightface-arcface"
    assert arcface.threshold == 0.40
    one_face = face_image([(3, 2)])
    assert arcface(one_face, source=one_face).value == pytest.approx(1.0, abs=1e-5)
    blank = arcface(np.zeros_like(one_face), source=one_face)
    assert blank.failed and math.isnan(blank.value)
    assert no_network == []


def test_images_from_files_and_pil(identity, background, astronaut, tmp_path):
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    assert np.array_equal(to_rgb(path), astronaut)
    assert np.array_equal(to_rgb(Image.fromarray(astronaut).convert("RGBA")), astronaut)
    assert identity(path, source=Image.fromarray(astronaut)).value == pytest.approx(1.0, abs=1e-5)
    assert background(str(path), source=astronaut).value == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(TypeError, match="uint8"):
        to_rgb(astronaut.astype(np.float32))


def test_reference_is_compared_when_given(identity, astronaut, coffee):
    # the reference (not the source) is the identity to keep
    assert identity(astronaut, source=coffee, reference=astronaut).value > 0.99
    # a reference without a face is an input problem, not a failure of the output
    result = identity(astronaut, source=astronaut, reference=coffee)
    assert math.isnan(result.value) and not result.failed
    assert result.note == "no face in reference"


def test_no_face_in_output_is_a_failure(settings, identity, astronaut, coffee):
    result = identity(coffee, source=astronaut)
    assert math.isnan(result.value)
    assert result.failed and result.note == "no face in output"
    flat = np.full_like(astronaut, 128)
    assert identity(flat, source=astronaut).failed


def test_suite_reports_the_failure_and_keeps_the_row(settings, astronaut, coffee, no_network):
    suite = MetricSuite(settings)
    row = suite.evaluate(coffee, astronaut, astronaut, None, CHANGE)
    assert set(METRIC_NAMES) <= set(row)
    assert math.isnan(row["identity_sim"])
    assert row["failures"] == "identity_sim: no face in output"
    ok = suite.evaluate(astronaut, astronaut, astronaut, None, CHANGE)
    assert ok["failures"] is None
    assert ok["identity_sim"] == pytest.approx(1.0, abs=1e-5)
    assert ok["bg_ssim"] == pytest.approx(1.0, abs=1e-9)
    if suite.metrics["lpips"].available:  # real weights in the torch hub cache
        assert ok["lpips"] == pytest.approx(0.0, abs=1e-6)
    described = suite.describe()
    assert described["identity_sim"]["backend"] == "dlib-resnet128"
    assert suite.backend_columns()["identity_sim_backend"] == "dlib-resnet128"
    assert no_network == []


def test_background_without_face_in_source_uses_the_whole_image(background, coffee):
    darker = _brighter(coffee, -30)
    result = background(darker, source=coffee)
    assert result.note == "no face in source: SSIM over the whole image"
    size = (512, 341)  # coffee is 600 x 400, analysis side 512
    grey = [
        cv2.cvtColor(cv2.resize(x, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
        for x in (coffee, darker)
    ]
    assert result.value == pytest.approx(float(ssim_map(*grey).mean()), abs=1e-9)
    assert result.value < 0.999


def test_background_ignores_the_face_and_sees_the_rest(identity, background, astronaut):
    face, _ = identity.finder.largest(astronaut)
    inside = face_mask(astronaut.shape[:2], face.landmarks, 0.0)
    local = astronaut.copy()
    local[inside] = cv2.GaussianBlur(_brighter(astronaut, 50), (0, 0), 4)[inside]
    outside_only = astronaut.copy()
    outside_only[~inside] = _brighter(astronaut, 50)[~inside]
    kept = background(local, source=astronaut).value
    assert kept > 0.99
    whole = ssim_map(*(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (astronaut, local))).mean()
    assert whole < kept - 0.01  # the face change is visible without the mask
    assert background(outside_only, source=astronaut).value < 0.9


# --- LPIPS --------------------------------------------------------------------------------


def test_lpips_without_backbone_is_unavailable_and_downloads_nothing(
    empty_hub, no_network, astronaut
):
    metric = LPIPSDistance(MetricSettings(lpips_net="alex"))
    assert not metric.available and metric.backend == "unavailable"
    assert "metrics.lpips_backbone" in metric.reason
    assert official_backbone_name("alex") in metric.reason  # alexnet-owt-7be5be79.pth
    assert str(empty_hub) in metric.reason
    assert math.isnan(metric(astronaut, astronaut, astronaut).value)
    missing = LPIPSDistance(MetricSettings(lpips_backbone=str(empty_hub / "nope.pth")))
    assert not missing.available and "metrics.lpips_backbone" in missing.reason
    assert no_network == []


def test_lpips_from_a_backbone_file(random_alexnet_file, no_network, astronaut):
    path, state = random_alexnet_file
    metric = LPIPSDistance(MetricSettings(lpips_net="alex", lpips_backbone=str(path)))
    assert metric.available, metric.reason
    described = metric.describe()
    assert described["backbone_file"] == str(path)
    assert described["backbone_official"] is False
    assert "NOT the official" in metric.backend
    # the weights really came from the file (not a fresh random init)
    assert torch.equal(metric.model.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(
        metric.model.net.state_dict()["slice5.10.weight"], state["features.10.weight"]
    )
    assert metric(astronaut, target=astronaut).value == pytest.approx(0.0, abs=1e-6)
    blurred = cv2.GaussianBlur(astronaut, (0, 0), 3)
    assert metric(blurred, target=astronaut).value > 1e-4
    assert math.isnan(metric(astronaut, target=None).value)
    assert no_network == []


def test_a_random_file_in_the_hub_cache_is_never_used_by_default(
    empty_hub, random_alexnet_file, no_network
):
    path, _ = random_alexnet_file
    dest = default_backbone_path("alex")
    assert dest.parent.parent == empty_hub
    dest.parent.mkdir(parents=True)
    dest.symlink_to(path)
    metric = LPIPSDistance(MetricSettings(lpips_net="alex"))
    assert not metric.available
    assert "does not match the official checkpoint" in metric.reason
    assert "metrics.lpips_backbone" in metric.reason
    assert no_network == []


def test_lpips_backbone_of_the_wrong_network(tmp_path, no_network):
    import torchvision.models as tvm

    path = tmp_path / "squeeze.pth"
    torch.save(tvm.squeezenet1_1(weights=None).state_dict(), path)
    wrong = LPIPSDistance(MetricSettings(lpips_net="alex", lpips_backbone=str(path)))
    assert not wrong.available
    assert "metrics.lpips_backbone" in wrong.reason and "alexnet" in wrong.reason
    right = LPIPSDistance(MetricSettings(lpips_net="squeeze", lpips_backbone=str(path)))
    assert right.available, right.reason
    grey = np.full((96, 96, 3), 100, np.uint8)
    assert right(grey, target=grey).value == pytest.approx(0.0, abs=1e-6)


def test_real_lpips_weights_when_cached(astronaut):
    metric = LPIPSDistance(MetricSettings())
    if not metric.available:
        pytest.skip(f"no LPIPS backbone: {metric.reason}")
    assert metric.describe()["backbone_official"] is True
    near = metric(_jpeg(astronaut, 60), target=astronaut).value
    far = metric(np.ascontiguousarray(astronaut[::-1]), target=astronaut).value
    assert 0.0 < near < far


# --- CLIP ---------------------------------------------------------------------------------


def test_clip_without_model_is_unavailable(tmp_path, no_network, astronaut):
    unset = CLIPScore(MetricSettings(clip_model=None))
    assert not unset.available and "metrics.clip_model" in unset.reason
    assert math.isnan(unset(astronaut, change_text=CHANGE).value)
    missing = CLIPScore(MetricSettings(clip_model=str(tmp_path / "clip")))
    assert not missing.available
    assert "metrics.clip_model" in missing.reason and "config.json" in missing.reason
    # a hub id is not a local folder: refused without a download attempt
    hub_id = CLIPScore(MetricSettings(clip_model="openai/clip-vit-base-patch32"))
    assert not hub_id.available and "metrics.clip_model" in hub_id.reason
    assert no_network == []


def test_clip_score_with_a_tiny_local_model(tmp_path, no_network, astronaut, coffee):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_clip(tmp_path / "clip")
    metric = CLIPScore(MetricSettings(clip_model=str(folder)))
    assert metric.available, metric.reason
    assert str(folder) in metric.backend
    scores = {}
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    for name, image in (("astronaut", astronaut), ("coffee", coffee)):
        for text in (CHANGE, "smile", "make the hair red and the eyes wider"):
            value = metric(image, change_text=text).value
            assert math.isfinite(value) and 0.0 <= value <= 100.0
            # the definition, computed here from the model's parts
            inputs = processor(text=[text], images=[image], return_tensors="pt", padding=True)
            with torch.no_grad():
                img = model.visual_projection(
                    model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
                )
                txt = model.text_projection(
                    model.text_model(
                        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                    ).pooler_output
                )
            cos = float(torch.nn.functional.cosine_similarity(img, txt).item())
            assert value == pytest.approx(100.0 * max(cos, 0.0), abs=1e-3)
            scores[name, text] = value
    assert len(set(scores.values())) > 1  # the score depends on its inputs
    assert all(v > 0 for v in scores.values())
    assert math.isnan(metric(astronaut, change_text="  ").value)
    # text embeddings turned around: every cosine is negative, and the score is 0, not < 0
    model.text_projection.weight.data.neg_()
    model.save_pretrained(tmp_path / "opposite")
    processor.save_pretrained(tmp_path / "opposite")
    opposite = CLIPScore(MetricSettings(clip_model=str(tmp_path / "opposite")))
    assert [opposite(astronaut, change_text=t).value for t in (CHANGE, "smile")] == [0.0, 0.0]
    assert no_network == []


# --- real photos --------------------------------------------------------------------------


@pytest.mark.shared_faces
def test_identity_orders_same_altered_and_different_people(identity, shared_faces):
    people = shared_faces / "same_person"
    obama = to_rgb(people / "obama" / "obama.jpg")
    same = identity(obama, source=obama).value
    altered = {
        "brightness": identity(_brighter(obama, 40), source=obama).value,
        "blur": identity(cv2.GaussianBlur(obama, (0, 0), 3), source=obama).value,
        "jpeg": identity(_jpeg(obama, 10), source=obama).value,
    }
    other_photos = [
        identity(to_rgb(people / "obama" / name), source=obama).value
        for name in ("obama1.jpg", "obama2.jpg")
    ]
    different = {
        p.parent.name + "/" + p.name: identity(to_rgb(p), source=obama).value
        for p in (
            people / "biden" / "biden2.jpg",
            people / "lennon" / "lennon-1.jpg",
            people / "rose_leslie" / "img1.jpg",
            people / "alex_lacamoire" / "img1.jpg",
            people / "kit_harington" / "john2.jpeg",
        )
    }
    assert same == pytest.approx(1.0, abs=1e-5)
    assert all(same > v > max(different.values()) for v in altered.values()), altered
    assert min(altered.values()) >= DLIB_SAME_PERSON
    assert min(other_photos) >= DLIB_SAME_PERSON, other_photos
    assert max(different.values()) < DLIB_SAME_PERSON, different


@pytest.mark.shared_faces
def test_identity_uses_the_reference_over_the_source(identity, shared_faces):
    people = shared_faces / "same_person"
    obama = to_rgb(people / "obama" / "obama.jpg")
    biden = to_rgb(people / "biden" / "biden2.jpg")
    obama2 = to_rgb(people / "obama" / "obama2.jpg")
    assert identity(obama, source=biden).value < DLIB_SAME_PERSON
    assert identity(obama, source=biden, reference=obama2).value >= DLIB_SAME_PERSON
    both = identity(obama, source=biden, reference=[obama2, biden]).value
    assert identity(obama, source=biden).value < both < identity(obama, reference=obama2).value
    brick = to_rgb(shared_faces / "no_face" / "brick.png")
    failed = identity(brick, source=obama)
    assert failed.failed and math.isnan(failed.value)


@pytest.mark.shared_faces
def test_background_local_edit_vs_global_change(identity, background, shared_faces):
    photo = to_rgb(shared_faces / "same_person" / "obama" / "obama.jpg")
    face, _ = identity.finder.largest(photo)
    inside = face_mask(photo.shape[:2], face.landmarks, 0.0)
    local = photo.copy()
    local[inside] = _brighter(photo, 60)[inside]
    local_value = background(local, source=photo).value
    global_values = [
        background(_brighter(photo, 40), source=photo).value,
        background(cv2.GaussianBlur(photo, (0, 0), 3), source=photo).value,
        background(_jpeg(photo, 10), source=photo).value,
    ]
    assert local_value > 0.99
    assert max(global_values) < 0.95

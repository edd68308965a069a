"""Synthesized starts: restoration degradations (plan, exact replay, damage) and the swap start
(region mask, fill), on real face crops from ../shared/faces cut with the project's own dlib
detector and crop code (skipped when the photos are absent; the plan tests need none)."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from facelora.config import CropParams, DlibParams, ImagesParams, RestorationParams, SwapParams
from facelora.prepare.faces.align import face_frame, plan_crop, transform_points, warp_crop
from facelora.prepare.synthesis.degrade import (
    ORDER,
    apply_degradations,
    damage_words,
    draw_degradations,
)
from facelora.prepare.synthesis.swap_start import region_mask, swap_start

SIDE = 384  # crops for the tests: real faces, fast filters
PHOTOS = ("obama/obama.jpg", "biden/biden2.jpg", "rose_leslie/img2.jpg")


def only(name: str, strength: float = 0.6, **more) -> RestorationParams:
    return RestorationParams(degradations=[name], per_pair=1, strength=strength, **more)


def error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def sharpness(rgb: np.ndarray, where: np.ndarray | None = None) -> float:
    """Variance of the Laplacian (of grey), over the whole image or the pixels `where`."""
    laplacian = cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F)
    return float(laplacian.var() if where is None else laplacian[where].var())


def high_frequency_share(rgb: np.ndarray) -> float:
    """Share of the spectrum's power beyond half the Nyquist frequency (grey, DC removed; a
    Hann window keeps the image's borders out of the high frequencies)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
    h, w = grey.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fftshift(np.fft.fft2((grey - grey.mean()) * window))) ** 2
    yy, xx = np.mgrid[-h // 2 : h - h // 2, -w // 2 : w - w // 2]
    far = np.hypot(yy / (h / 2), xx / (w / 2)) > 0.5
    return float(power[far].sum() / power.sum())


# --- real face crops ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def faces(shared_faces) -> list[tuple[np.ndarray, np.ndarray]]:
    """(SIDE x SIDE crop, its 5 landmarks in crop pixels) for each of PHOTOS."""
    import dlib

    from facelora.prepare.faces.dlib_backend import DlibDetector, five_from_68, model_path
    from facelora.prepare.images import read_image

    detector = DlibDetector(DlibParams())
    predictor = dlib.shape_predictor(str(model_path(DlibParams(), "landmarks_model")))
    out = []
    for rel in PHOTOS:
        rgb = read_image(shared_faces / "same_person" / rel, ImagesParams(), max_side=640).rgb
        found = max(detector.detect(rgb), key=lambda d: d.area)
        rect = dlib.rectangle(*(round(float(v)) for v in found.box))
        landmarks = five_from_68(predictor(rgb, rect))
        params = CropParams(min_side=64, output_side=SIDE, padding=0.6)
        box, _ = plan_crop(landmarks, rgb.shape[1], rgb.shape[0], params)
        out.append((warp_crop(rgb, box, SIDE), transform_points(landmarks, box, SIDE)))
    return out


@pytest.fixture(scope="module")
def crop(faces) -> np.ndarray:
    return faces[0][0]


# --- the plan (no photos needed) ----------------------------------------------------------


def test_plan_is_seeded_json_and_in_order():
    settings = RestorationParams(per_pair=3)
    plan = draw_degradations(7, settings)
    assert plan == draw_degradations(7, settings)
    assert json.loads(json.dumps(plan)) == plan  # written to the manifest as it is
    assert [s["name"] for s in plan] == sorted((s["name"] for s in plan), key=ORDER.index)
    assert len(plan) == 3 and all(s["chain"] == 1 for s in plan)
    assert draw_degradations(8, settings) != plan


def test_every_listed_filter_is_drawn_and_only_those():
    listed = ["blur", "noise", "jpeg", "webp"]
    settings = RestorationParams(degradations=listed, per_pair=2)
    subsets = {tuple(s["name"] for s in draw_degradations(seed, settings)) for seed in range(60)}
    assert {name for subset in subsets for name in subset} == set(listed)
    assert len(subsets) == 6  # all C(4, 2) pairs come up
    assert all(len(subset) == 2 for subset in subsets)


def test_the_random_choices_vary_over_seeds():
    steps = [
        {s["name"]: s for s in draw_degradations(seed, RestorationParams(per_pair=7))}
        for seed in range(40)
    ]
    angles = [s["motion_blur"]["angle"] for s in steps]
    assert max(angles) - min(angles) > 120  # streaks in every direction
    assert {(s["downscale"]["down"], s["downscale"]["up"]) for s in steps} == {
        (down, up) for down in ("area", "linear", "cubic") for up in ("linear", "cubic")
    }
    assert 5 < sum(s["noise"]["gray"] for s in steps) < 30  # luminance and colour noise
    assert len({s["noise"]["seed"] for s in steps}) == 40
    assert len({s["jpeg"]["quality"] for s in steps}) > 10


def test_second_order_adds_a_milder_chain_and_keeps_the_first():
    first = draw_degradations(3, RestorationParams(per_pair=7, strength=1.0))
    both = draw_degradations(3, RestorationParams(per_pair=7, strength=1.0, second_order=True))
    assert both[: len(first)] == first
    second = {s["name"]: s for s in both[len(first) :]}
    assert set(second) == set(ORDER) and all(s["chain"] == 2 for s in second.values())
    heavy = {s["name"]: s for s in first}
    assert second["blur"]["sigma"] < heavy["blur"]["sigma"]
    assert second["motion_blur"]["kernel"] < heavy["motion_blur"]["kernel"]
    assert second["downscale"]["scale"] > heavy["downscale"]["scale"]
    assert second["noise"]["std"] < heavy["noise"]["std"]
    assert second["color_fade"]["saturation"] > heavy["color_fade"]["saturation"]
    assert second["jpeg"]["quality"] > heavy["jpeg"]["quality"]
    assert second["webp"]["quality"] > heavy["webp"]["quality"]


def test_strength_scales_every_parameter_of_the_same_draw():
    plans = [draw_degradations(5, RestorationParams(per_pair=7, strength=s)) for s in (0.3, 1.0)]
    mild, heavy = ({s["name"]: s for s in plan} for plan in plans)
    assert mild["blur"]["sigma"] < heavy["blur"]["sigma"]
    assert mild["downscale"]["scale"] > heavy["downscale"]["scale"]
    assert mild["jpeg"]["quality"] > heavy["jpeg"]["quality"]
    assert mild["motion_blur"]["angle"] == heavy["motion_blur"]["angle"]  # not damage
    assert mild["noise"]["seed"] == heavy["noise"]["seed"]


def test_damage_words_for_the_caption():
    names = ["blur", "noise", "jpeg", "webp"]
    plan = draw_degradations(0, RestorationParams(degradations=names, per_pair=4))
    assert damage_words(plan) == "blurry, noisy, compressed"  # jpeg + webp: said once
    fade = draw_degradations(0, only("color_fade"))
    assert damage_words(fade) == "faded"
    assert damage_words([]) == ""


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="lower per_pair or list more"):
        draw_degradations(0, RestorationParams(degradations=["blur", "noise"], per_pair=3))
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown filter 'sharpen'"):
        apply_degradations(image, [{"name": "sharpen", "chain": 1}])
    with pytest.raises(ValueError, match=r"side=64"):
        apply_degradations(image, draw_degradations(0, only("blur")))  # drawn for 1024 px
    with pytest.raises(ValueError, match="lacks the parameter 'quality'"):
        apply_degradations(image, [{"name": "jpeg", "chain": 1}])
    with pytest.raises(ValueError, match="uint8 RGB"):
        apply_degradations(image.astype(np.float32), [])


# --- applying the plan --------------------------------------------------------------------


@pytest.mark.shared_faces
def test_same_plan_same_bytes_on_any_thread_count(crop):
    plan = draw_degradations(11, RestorationParams(per_pair=7, second_order=True), side=SIDE)
    reference = apply_degradations(crop, plan)
    assert np.array_equal(apply_degradations(crop, plan), reference)
    threads = cv2.getNumThreads()
    try:
        for n in (1, 4):
            cv2.setNumThreads(n)
            assert np.array_equal(apply_degradations(crop, plan), reference), f"{n} cv2 threads"
    finally:
        cv2.setNumThreads(threads)
    with ThreadPoolExecutor(4) as pool:  # concurrent jobs: no shared random state
        results = list(pool.map(lambda _: apply_degradations(crop, plan), range(8)))
    assert all(np.array_equal(r, reference) for r in results)


@pytest.mark.shared_faces
def test_different_seeds_give_different_images(crop):
    settings = RestorationParams()
    images = [apply_degradations(crop, draw_degradations(s, settings, side=SIDE)) for s in range(4)]
    for i in range(len(images)):
        for j in range(i):
            assert not np.array_equal(images[i], images[j]), (i, j)


@pytest.mark.shared_faces
def test_the_recorded_plan_replays_exactly(crop):
    plan = draw_degradations(21, RestorationParams(per_pair=3, second_order=True), side=SIDE)
    degraded = apply_degradations(crop, plan)
    recorded = json.loads(json.dumps(plan))  # as read back from the manifest
    assert np.array_equal(apply_degradations(crop.copy(), recorded), degraded)


MUTATIONS = {  # one change per recorded parameter: every one of them must be used
    "blur": {"sigma": lambda v: v * 1.5, "kernel": lambda v: v + 6},
    "motion_blur": {"kernel": lambda v: v + 6, "angle": lambda v: (v + 45) % 180},
    "downscale": {
        "scale": lambda v: v * 1.5,
        "down": lambda v: "linear" if v != "linear" else "area",
        "up": lambda v: "cubic" if v != "cubic" else "linear",
    },
    "noise": {"std": lambda v: v * 2, "gray": lambda v: not v, "seed": lambda v: v + 1},
    "color_fade": {
        "saturation": lambda v: v - 0.2,
        "contrast": lambda v: v - 0.2,
        "tint": lambda v: v + 0.05,
    },
    "jpeg": {"quality": lambda v: v + 20},
    "webp": {"quality": lambda v: v + 20},
}


@pytest.mark.shared_faces
@pytest.mark.parametrize("name", ORDER)
def test_a_mutated_plan_gives_another_image(crop, name):
    plan = draw_degradations(2, only(name, strength=0.8), side=SIDE)
    degraded = apply_degradations(crop, plan)
    for key, change in MUTATIONS[name].items():
        mutated = [{**plan[0], key: change(plan[0][key])}]
        assert not np.array_equal(apply_degradations(crop, mutated), degraded), key


@pytest.mark.shared_faces
def test_blur_lowers_sharpness(crop):
    for name in ("blur", "motion_blur"):
        out = apply_degradations(crop, draw_degradations(1, only(name), side=SIDE))
        assert sharpness(out) < 0.5 * sharpness(crop), name


@pytest.mark.shared_faces
def test_downscale_loses_high_frequencies(crop):
    out = apply_degradations(crop, draw_degradations(1, only("downscale"), side=SIDE))
    assert high_frequency_share(out) < 0.2 * high_frequency_share(crop)


@pytest.mark.shared_faces
def test_noise_adds_zero_mean_noise_of_the_drawn_spread(crop):
    plan = draw_degradations(1, only("noise"), side=SIDE)
    diff = apply_degradations(crop, plan).astype(np.float64) - crop
    assert abs(diff.mean()) < 1.0
    # clipping at 0 and 255 trims a little of the spread
    assert 0.8 * plan[0]["std"] * 255 < diff.std() < 1.05 * plan[0]["std"] * 255
    assert sharpness(apply_degradations(crop, plan)) > 2 * sharpness(crop)


@pytest.mark.shared_faces
def test_gray_noise_is_the_same_in_every_channel(crop):
    for gray in (True, False):
        plan = [{**draw_degradations(1, only("noise"), side=SIDE)[0], "gray": gray}]
        diff = apply_degradations(crop, plan).astype(np.int16) - crop
        unclipped = ((crop > 40) & (crop < 215)).all(axis=2)
        same = (diff[..., 0] == diff[..., 1])[unclipped].mean()
        assert same > 0.99 if gray else same < 0.2


def blockiness(rgb: np.ndarray) -> float:
    """Mean step across JPEG's 8 px block borders over the mean step elsewhere (about 1 in
    a photo)."""
    steps = np.abs(np.diff(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64), axis=1))
    return float(steps[:, 7::8].mean() / np.delete(steps, np.s_[7::8], axis=1).mean())


@pytest.mark.shared_faces
def test_compression_changes_the_bytes_and_leaves_its_artefacts(crop):
    jpeg = apply_degradations(crop, draw_degradations(1, only("jpeg", 1.0), side=SIDE))
    webp = apply_degradations(crop, draw_degradations(1, only("webp", 1.0), side=SIDE))
    for out in (jpeg, webp):
        assert error(out, crop) > 1.0
    assert blockiness(crop) < 1.15 and blockiness(jpeg) > 1.4  # 8 x 8 blocks
    assert sharpness(webp) < 0.7 * sharpness(crop)  # WebP smooths fine detail away
    same_quality = [{"name": n, "chain": 1, "quality": 20} for n in ("jpeg", "webp")]
    assert not np.array_equal(*(apply_degradations(crop, [step]) for step in same_quality))


@pytest.mark.shared_faces
def test_color_fade_lowers_saturation_and_contrast(crop):
    out = apply_degradations(crop, draw_degradations(1, only("color_fade"), side=SIDE))
    hsv_in, hsv_out = (cv2.cvtColor(im, cv2.COLOR_RGB2HSV) for im in (crop, out))
    assert hsv_out[..., 1].mean() < 0.8 * hsv_in[..., 1].mean()
    grey_in, grey_out = (cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in (crop, out))
    assert grey_out.std() < 0.9 * grey_in.std()


@pytest.mark.shared_faces
def test_color_fade_tint_is_a_warm_cast(crop):
    step = {"name": "color_fade", "chain": 1, "saturation": 0.7, "contrast": 0.8}
    plain = apply_degradations(crop, [{**step, "tint": 0.0}]).astype(np.float64)
    warm = apply_degradations(crop, [{**step, "tint": 0.06}]).astype(np.float64)
    unclipped = ((plain > 20) & (plain < 235)).all(axis=2)
    shift = (warm - plain)[unclipped].mean(axis=0)
    assert shift == pytest.approx([0.06 * 255, 0.02 * 255, -0.06 * 255], abs=1.0)


@pytest.mark.shared_faces
@pytest.mark.parametrize("name", [*ORDER, "all"])
def test_higher_strength_does_more_damage(faces, name):
    for rgb, _ in faces[:2]:
        errors = []
        for strength in (0.2, 0.5, 1.0):
            settings = (
                RestorationParams(per_pair=3, strength=strength)
                if name == "all"
                else only(name, strength=strength)
            )
            plan = draw_degradations(4, settings, side=SIDE)
            errors.append(error(apply_degradations(rgb, plan), rgb))
        assert errors == sorted(errors) and errors[0] < errors[-1], (name, errors)


@pytest.mark.shared_faces
def test_shape_and_dtype_kept_and_input_untouched(crop):
    plan_square = draw_degradations(9, RestorationParams(per_pair=7), side=SIDE)
    wide = np.ascontiguousarray(crop[:200])  # 200 x 384: side is the longer one
    for image, plan in ((crop, plan_square), (wide, plan_square)):
        before = image.copy()
        out = apply_degradations(image, plan)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.array_equal(image, before)
    assert apply_degradations(crop, []) is not crop


# --- the swap start -----------------------------------------------------------------------


def feather_px(landmarks: np.ndarray, settings: SwapParams) -> float:
    return settings.feather * face_frame(landmarks).size


def far_outside(shape, info: dict, margin: float) -> np.ndarray:
    """Pixels more than `margin` px outside the recorded ellipse (the ellipse with each axis
    grown by `margin` holds every point within `margin` of it)."""
    (cx, cy), (a, b), angle = (info["ellipse"][k] for k in ("center", "axes", "angle"))
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / (a + margin)) ** 2 + (v / (b + margin)) ** 2 > 1


@pytest.mark.shared_faces
@pytest.mark.parametrize("region", ["face", "head"])
def test_mask_covers_the_landmarks_not_the_corners(faces, region):
    for rgb, landmarks in faces:
        mask = region_mask(rgb.shape, landmarks, region, feather_px(landmarks, SwapParams()))
        assert mask.dtype == np.float32 and mask.shape == rgb.shape[:2]
        assert mask.min() == 0.0 and mask.max() == 1.0
        for x, y in landmarks:
            assert mask[round(y), round(x)] == 1.0
        corners = mask[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == 0).all(), corners


def extent(mask: np.ndarray, landmarks: np.ndarray) -> tuple[float, float]:
    """How far the mask reaches above and below the eye line, in face sizes, along the
    vertical through the middle of the eyes (the crops are upright)."""
    x = round(landmarks[:2, 0].mean())
    rows = np.flatnonzero(mask[:, x] == 1.0)
    eyes_y, size = landmarks[:2, 1].mean(), face_frame(landmarks).size
    return (eyes_y - rows.min()) / size, (rows.max() - eyes_y) / size


@pytest.mark.shared_faces
def test_regions_reach_forehead_to_chin_and_crown(faces):
    for _, landmarks in faces:
        # on a canvas twice the crop's size, so the head is not cut by the crop's border
        big, centred = (2 * SIDE, 2 * SIDE), landmarks + SIDE / 2
        eyes_to_mouth = (landmarks[3:, 1].mean() - landmarks[:2, 1].mean()) / face_frame(
            landmarks
        ).size
        above, below = extent(region_mask(big, centred, "face", 0), centred)
        assert 0.6 < above < 0.75  # mid-forehead, under the hairline
        assert eyes_to_mouth + 0.3 < below < 1.0  # the chin, not the neck
        head_above, head_below = extent(region_mask(big, centred, "head", 0), centred)
        assert head_above > 1.15 and below < head_below < 1.1  # the crown; just below the chin


@pytest.mark.shared_faces
def test_head_region_holds_the_face_region_and_more(faces):
    for rgb, landmarks in faces:
        face = region_mask(rgb.shape, landmarks, "face", 0)
        head = region_mask(rgb.shape, landmarks, "head", 0)
        assert (head[face == 1] == 1).all()
        assert head.sum() > 1.5 * face.sum()


@pytest.mark.shared_faces
def test_mask_follows_a_tilted_face(crop, faces):
    _, landmarks = faces[0]
    turn = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), -30, 1.0)  # 30 degrees clockwise
    tilted = cv2.warpAffine(crop, turn, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT)
    points = landmarks @ turn[:, :2].T + turn[:, 2]
    mask = region_mask(tilted.shape, points, "face", 0)
    for x, y in points:
        assert mask[round(y), round(x)] == 1.0
    m = cv2.moments(mask)
    long_axis = 0.5 * math.degrees(math.atan2(2 * m["mu11"], m["mu20"] - m["mu02"]))
    chin_to_forehead = face_frame(points).angle + 90  # across the eye line
    assert abs((long_axis - chin_to_forehead + 90) % 180 - 90) < 3, (long_axis, chin_to_forehead)
    assert abs(face_frame(points).angle - face_frame(landmarks).angle - 30) < 1


@pytest.mark.shared_faces
def test_mask_of_an_upside_down_face(crop, faces):
    _, landmarks = faces[0]
    flipped = crop[::-1, ::-1]
    points = (SIDE - 1) - landmarks
    points = points[[1, 0, 2, 4, 3]]  # "eye_left" is the eye on the image's left, as detected
    mask = region_mask(flipped.shape, points, "face", 0)
    upright = region_mask(crop.shape, landmarks, "face", 0)
    assert (mask == upright[::-1, ::-1]).mean() > 0.99  # the forehead is below, the chin above


@pytest.mark.shared_faces
def test_feather_is_a_smooth_edge_outside_the_region(crop, faces):
    _, landmarks = faces[0]
    hard = region_mask(crop.shape, landmarks, "face", 0)
    assert set(np.unique(hard)) == {0.0, 1.0}
    soft = region_mask(crop.shape, landmarks, "face", 20.0)
    assert (soft[hard == 1] == 1).all()  # the whole region is replaced
    edge = (soft > 0) & (soft < 1)
    assert edge.sum() > 0 and (hard[edge] == 0).all()
    wider = cv2.dilate(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (45, 45)))
    assert (wider[soft > 0] == 1).all()  # nothing beyond the feather (20 px + rounding)


@pytest.mark.shared_faces
@pytest.mark.parametrize("fill", ["gray", "noise", "blur"])
@pytest.mark.parametrize("region", ["face", "head"])
def test_region_is_replaced_and_the_rest_kept_exactly(faces, fill, region):
    settings = SwapParams(fill=fill, region=region)
    for rgb, landmarks in faces:
        start, info = swap_start(rgb, landmarks, settings, seed=3)
        assert start.shape == rgb.shape and start.dtype == np.uint8
        assert json.loads(json.dumps(info)) == info
        assert info["region"] == region and info["fill"] == fill
        outside = far_outside(rgb.shape, info, feather_px(landmarks, settings) + 1.5)
        assert outside.any() and np.array_equal(start[outside], rgb[outside])
        inside = region_mask(rgb.shape, landmarks, region, 0) == 1
        changed = (start != rgb).any(axis=2)[inside].mean()
        assert changed > (0.97 if fill != "blur" else 0.7), changed
        if fill == "gray":
            assert (start[inside] == 128).all()
        if fill == "blur":
            assert sharpness(start, inside) < 0.3 * sharpness(rgb, inside)


@pytest.mark.shared_faces
def test_noise_fill_is_seeded(crop, faces):
    _, landmarks = faces[0]
    settings = SwapParams(fill="noise")
    a, info = swap_start(crop, landmarks, settings, seed=5)
    b, _ = swap_start(crop, landmarks, settings, seed=5)
    c, _ = swap_start(crop, landmarks, settings, seed=6)
    assert np.array_equal(a, b) and info["seed"] == 5
    inside = region_mask(crop.shape, landmarks, "face", 0) == 1
    assert (a != c).any(axis=2)[inside].mean() > 0.9
    # the noise carries the region's colour statistics, nothing of its layout
    mean_in = crop[inside].mean(axis=0)
    assert info["mean"] == pytest.approx(mean_in.tolist(), abs=8)  # weighted over the feather
    assert np.abs(a[inside].mean(axis=0) - info["mean"]).max() < 8  # less what clipping cuts
    layout = np.corrcoef(a[inside][:, 0].astype(float), crop[inside][:, 0].astype(float))[0, 1]
    assert abs(layout) < 0.05

"""User-supplied loss masks: found beside a pair in every layout, cut with the end crop's
geometry by the pair step, copied into the phase folders, read by training; a bad mask
rejects its pair with the reason."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from facelora.config import PairSource, RegionWeights, validate_params
from facelora.io.datasets import write_kontext_images
from facelora.prepare.faces.align import face_frame
from facelora.prepare.faces.backends import make_backend
from facelora.prepare.pairs.layouts import discover
from facelora.train.data import read_phase
from facelora.train.loop import Trainer
from facelora.train.regions import weighted_mse

from helpers import CAPTION, FAMILIES, paint_square, run_data_half, settings, smooth_image

EXT = [".jpg", ".jpeg", ".png", ".webp"]
MAGENTA = (255, 0, 255)


def img(path, size=(8, 8), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def reasons(found):
    return {r["image"]: r["reason"] for r in found.rejected}


# --- discovery ------------------------------------------------------------------------------


def test_kontext_mask_beside_the_pair(tmp_path):
    for name in ["01_start.png", "01_end.png", "01_mask.png", "02_start.png", "02_end.png"]:
        img(tmp_path / name)
    img(tmp_path / "03_mask.png")  # a mask without its pair
    img(tmp_path / "04_start.png")
    img(tmp_path / "04_end.png")
    img(tmp_path / "04_mask2.png")  # not a role
    found = discover(tmp_path, [PairSource(layout="kontext")], EXT)
    pairs = {c.start: c for c in found.candidates}
    assert pairs["01_start.png"].mask == "01_mask.png"
    assert pairs["02_start.png"].mask is None  # optional
    why = reasons(found)
    assert why["03_mask.png"] == "unpaired: no 03_start image beside it"
    assert (
        why["04_mask2.png"].startswith("unknown role(s) mask2") and "_mask)" in why["04_mask2.png"]
    )


def test_folders_mask_folder(tmp_path):
    for name in ["target/a.png", "control/a.png", "mask/a.png", "target/b.png", "control/b.png"]:
        img(tmp_path / "ds" / name)
    img(tmp_path / "ds/mask/stray.png")
    found = discover(tmp_path, [PairSource(layout="folders", path="ds")], EXT)
    pairs = {c.end: c for c in found.candidates}
    assert pairs["ds/target/a.png"].mask == "ds/mask/a.png"
    assert pairs["ds/target/a.png"].references == []  # a mask is not a reference
    assert pairs["ds/target/b.png"].mask is None
    assert reasons(found) == {"ds/mask/stray.png": "unpaired: no image named stray in target/"}
    # found the same way by the automatic layout (mask/ is not a control folder)
    auto = discover(tmp_path, [PairSource()], EXT)
    assert {c.end: c.mask for c in auto.candidates} == {
        "ds/target/a.png": "ds/mask/a.png",
        "ds/target/b.png": None,
    }


def test_manifest_mask_column(tmp_path):
    for name in ["a.png", "b.png", "m.png", "c.png", "d.png"]:
        img(tmp_path / name)
    (tmp_path / "pairs.csv").write_text(
        "start,end,mask\na.png,b.png,m.png\nc.png,d.png,\na.png,d.png,missing.png\n"
    )
    found = discover(tmp_path, [PairSource(layout="manifest", path="pairs.csv")], EXT)
    assert [(c.start, c.mask) for c in found.candidates] == [("a.png", "m.png"), ("c.png", None)]
    assert reasons(found)["manifest:pairs.csv:3"].startswith("mask file not found")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"start": "a.png", "end": "b.png", "mask": "m.png"})
    )
    (pair,) = discover(
        tmp_path, [PairSource(layout="manifest", path="pairs.jsonl")], EXT
    ).candidates
    assert pair.mask == "m.png"


# --- through the pair and select steps, on real photos ---------------------------------------


def _face(rgb):
    backend = make_backend(validate_params({}).faces)
    faces = backend.describe(rgb, [d for d in backend.detect(rgb) if d.score > 0.25])
    return face_frame(np.asarray(faces[0].landmarks))


def _square(rgb, frame, scale=1.0):
    """(x0, y0, x1, y1) in `rgb`'s pixels: beside the face (temple/hair), well inside its crop
    and away from the landmarks, so the end face is still found."""
    c, s = frame.center * scale, frame.size * scale
    x0, y0 = int(c[0] - 0.7 * s), int(c[1] - 0.6 * s)
    side = int(0.2 * s)
    return x0, y0, x0 + side, y0 + side


def _end_and_mask(rgb, box):
    end = rgb.copy()
    x0, y0, x1, y1 = box
    end[y0:y1, x0:x1] = MAGENTA
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[y0:y1, x0:x1] = 255
    return end, mask


def _save(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


@pytest.fixture(scope="module")
def masked(tmp_path_factory, shared_faces):
    """A raw folder with a Kontext pair (end 1.5x larger: the end crop is the start's square
    rescaled) and a folders pair (end narrower: each photo's own crop), both with masks, plus
    pairs with a wrong-size and an unreadable mask; the data half run on it."""
    raw = tmp_path_factory.mktemp("masks") / "raw"
    people = shared_faces / "same_person"
    obama = np.asarray(Image.open(people / "obama/obama.jpg").convert("RGB"))
    biden = np.asarray(Image.open(people / "biden/biden2.jpg").convert("RGB"))
    lennon = np.asarray(Image.open(people / "lennon/lennon-2.jpg").convert("RGB"))

    # kontext: the end is the photo 1.5x larger, the square painted in its pixels
    h, w = obama.shape[:2]
    bigger = np.asarray(Image.fromarray(obama).resize((w * 3 // 2, h * 3 // 2), Image.BICUBIC))
    end, mask = _end_and_mask(bigger, _square(bigger, _face(obama), 1.5))
    _save(raw / "k/01_start.png", obama)
    _save(raw / "k/01_end.png", end)
    _save(raw / "k/01_mask.png", mask)
    (raw / "k/01.txt").write_text("EDITFACE paint a magenta square\n")

    # folders: the end keeps the left 80 % of the photo (another aspect ratio)
    narrow = np.ascontiguousarray(biden[:, : int(biden.shape[1] * 0.8)])
    end, mask = _end_and_mask(narrow, _square(narrow, _face(biden)))
    _save(raw / "f/control/a.png", biden)
    _save(raw / "f/target/a.png", end)
    _save(raw / "f/mask/a.png", mask)
    (raw / "f/target/a.txt").write_text("EDITFACE paint a magenta square\n")

    # bad masks: half the end's size, and bytes that are no image
    lennon_face = _face(lennon)
    for key, bad in [("02", "small"), ("03", "corrupt")]:
        end, mask = _end_and_mask(lennon, _square(lennon, lennon_face))
        end[:8, :8] = 10 * int(key)  # another end: not a duplicate pair
        _save(raw / f"k/{key}_start.png", lennon)
        _save(raw / f"k/{key}_end.png", end)
        (raw / f"k/{key}.txt").write_text("EDITFACE paint a magenta square\n")
        if bad == "small":
            _save(raw / f"k/{key}_mask.png", mask[::2, ::2])
        else:
            (raw / f"k/{key}_mask.png").write_bytes(b"not a png at all")

    params = validate_params(
        {
            "crop": {"min_side": 64, "output_side": 256},
            "split": {"validation_fraction": 0.0, "min_validation": 0},
            "phases": [{"name": "broad", "steps": 10}],
        }
    )
    results = run_data_half(raw, raw.parent / "results", params)
    pairs = pd.read_parquet(results / "pairs" / "pairs.parquet")
    return pairs, results


def _magenta(rgb):
    r, g, b = (rgb[..., i].astype(float) for i in range(3))
    return (r + b) / 2 - g > 128


def _centroid(region):
    ys, xs = np.nonzero(region)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.shared_faces
@pytest.mark.parametrize(
    ("end", "geometry"), [("k/01_end.png", "start"), ("f/target/a.png", "own")]
)
def test_mask_is_cut_with_the_end_crops_geometry(masked, end, geometry):
    pairs, results = masked
    row = pairs.set_index("end").loc[end]
    assert row["status"] == "ok", row["reason"]
    assert row["geometry"] == geometry
    assert row["mask"] == end.replace("_end", "_mask").replace("target/", "mask/")
    crop = np.asarray(Image.open(results / "pairs" / row["end_crop"]).convert("RGB"))
    cut = np.asarray(Image.open(results / "pairs" / row["mask_crop"]))
    assert cut.ndim == 2 and cut.shape == crop.shape[:2]  # grey, the end crop's size
    square = _magenta(crop)
    inside = cut > 127
    assert 50 < square.sum() < 0.2 * square.size  # the square is in the crop, not all of it
    # where the end crop shows the square, the mask is white: within a pixel
    assert np.linalg.norm(_centroid(inside) - _centroid(square)) < 1.0
    assert (inside & square).sum() / (inside | square).sum() > 0.85
    far = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    assert cut[far].max() == 0  # black beyond the square's edge: nothing invented


@pytest.mark.shared_faces
def test_select_copies_the_mask_into_the_phase_folder(masked):
    pairs, results = masked
    phase = results / "phases" / "broad"
    manifest = {
        r["end_image"]: r
        for r in map(json.loads, (phase / "manifest.jsonl").read_text().splitlines())
    }
    assert set(manifest) == {"k/01_end.png", "f/target/a.png"}
    for end, entry in manifest.items():
        row = pairs.set_index("end").loc[end]
        assert entry["mask"] == f"{row['pair_id']}_mask.png"
        copied = (phase / entry["mask"]).read_bytes()
        assert copied == (results / "pairs" / row["mask_crop"]).read_bytes()
    samples = {s.pair_id: s for s in read_phase(phase, 64, 3)}
    assert all(s.mask is not None and s.mask.is_file() for s in samples.values())


@pytest.mark.shared_faces
def test_a_bad_mask_rejects_its_pair_with_the_reason(masked):
    pairs, results = masked
    rejected = pd.read_csv(results / "pairs" / "rejected.csv")
    by_end = rejected.set_index("end")["reason"]
    small = by_end["k/02_end.png"]
    assert (
        small.startswith("mask k/02_mask.png is ") and "but its end image k/02_end.png is" in small
    )
    assert "fix or remove it" in small
    corrupt = by_end["k/03_end.png"]
    assert corrupt.startswith("mask k/03_mask.png is not a readable image")
    assert set(pairs["end"]) == {"k/01_end.png", "f/target/a.png"}  # not scored at all
    # the masks are claimed by their pairs: never listed as photos outside any pair
    images = set(rejected["image"].dropna())
    assert not any("_mask" in i or "mask/" in i for i in images)


# --- training reads it -----------------------------------------------------------------------

FACE_ONLY = {"face": 1.0, "hair": 0.0, "background": 0.0}
# landmarks of a face in the lower right: if training used them instead of the mask, the
# gradient would show there
ELSEWHERE = [[40.0, 40.0], [50.0, 40.0], [45.0, 45.0], [41.0, 50.0], [49.0, 50.0]]


def _mask_pairs(folder):
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 8:28] = 255  # "the face": 1 there, 0 everywhere else
    start = smooth_image(rng, 64)
    row = {
        "pair_id": "p000000000000",
        "start_crop": start,
        "end_crop": paint_square(start),
        "mask_crop": mask,
        "caption": CAPTION,
        "end_landmarks": ELSEWHERE,
    }
    write_kontext_images(folder, [row])
    return folder, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_a_face_only_mask_leaves_no_gradient_on_the_background(tmp_path, tiny_models, family):
    data, mask = _mask_pairs(tmp_path / "data")
    assert json.loads((data / "manifest.jsonl").read_text())["mask"] == "p000000000000_mask.png"
    params = settings(family, tiny_models[family], resolution=128, losses={"regions": FACE_ONLY})
    trainer = Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")
    assert trainer.weighted and trainer.regions == RegionWeights(**FACE_ONLY)
    batch = trainer.samples[:1]
    assert batch[0].mask == data / "p000000000000_mask.png"
    latents = trainer.cache.latents(batch[0].target, batch[0].size)[None]
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(latents.shape, generator=g).requires_grad_(True)
    target = torch.randn(latents.shape, generator=g)
    weighted_mse(pred, target, trainer._weights(batch)).backward()
    moved = pred.grad[0] != 0

    # the mask at the training size (128 px: twice its own); each latent element's pixel
    # block, written out per family (Klein packs 2x2 VAE cells into the channels)
    white = np.kron(mask > 0, np.ones((2, 2), bool))
    near = np.zeros_like(white)  # the square grown by 2 px: bilinear resizing blurs its edge
    ys, xs = np.nonzero(white)
    near[max(0, ys.min() - 2) : ys.max() + 3, max(0, xs.min() - 2) : xs.max() + 3] = True
    f = trainer.adapter.pipe.vae_scale_factor
    k = 2 if family == "flux2_klein" else 1
    background = inside = 0
    for c, i, j in np.ndindex(moved.shape):
        dy, dx = ((c % 4) // 2, c % 2) if k == 2 else (0, 0)
        y0, x0 = (k * i + dy) * f, (k * j + dx) * f
        block = (slice(y0, y0 + f), slice(x0, x0 + f))
        if not near[block].any():  # background: no gradient at all
            background += 1
            assert not moved[c, i, j], (c, i, j)
        elif white[block].all():  # inside the mask: the loss reaches it
            inside += 1
            assert moved[c, i, j], (c, i, j)
    assert background > 0.5 * moved.numel() and inside > 0

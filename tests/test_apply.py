"""`facelora apply`: real photos, the tiny models and a random LoRA; the edit is pasted back
into the full-resolution photo and nothing outside the pasted square changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from facelora.apply import paste as paste_module
from facelora.apply.paste import crop_corners, feather_mask, paste
from facelora.apply.run import Applier, ApplyOptions, apply_photos
from facelora.config import validate_params
from facelora.errors import SettingsError
from facelora.models import lora_io
from facelora.models.lora_targets import target_modules_for
from facelora.prepare.faces.align import CropBox, warp_crop
from facelora.registry.families import family as get_family

PROMPT = "EDITFACE add glasses"
PRESETS = {"qwen_image_edit": "full", "flux2_klein": "all_blocks"}


def _params(family: str, model: Path):
    return validate_params(
        {
            "seed": 5,
            "model": {"family": family, "path": str(model)},
            "crop": {"min_side": 64, "output_side": 128, "size_multiple": 64},
            "eval": {"resolution": 64, "steps": 2, "guidance": None},
        }
    )


def random_lora(model: Path, family: str, folder: Path, *, meta: bool = True) -> Path:
    """A random LoRA of the family's preset, saved like a checkpoint (meta.json: family)."""
    import diffusers

    info = get_family(family)
    cls = getattr(diffusers, info.transformer_class)
    transformer = cls.from_pretrained(model, subfolder="transformer")
    modules = dict(transformer.named_modules())
    g = torch.Generator().manual_seed(0)
    state = {}
    names = target_modules_for(transformer, family, PRESETS[family])
    for name in names:
        m = modules[name]
        state[f"{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.2
        state[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.2
    folder.mkdir(parents=True)
    pipeline = getattr(diffusers, info.pipeline_class)
    lora_io.save_diffusers(
        folder, pipeline, state, {"r": 4, "lora_alpha": 4.0, "target_modules": names}
    )
    if meta:
        (folder / "meta.json").write_text(json.dumps({"step": 1, "family": family}))
    return folder


@pytest.fixture(scope="module")
def qwen(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("apply")
    family = "qwen_image_edit"
    params = _params(family, tiny_models[family])
    lora = random_lora(tiny_models[family], family, root / "lora")
    return params, lora, Applier(params, lora)


def _upright(path: Path) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _outside(shape, boxes: list[dict], side: int = 128) -> np.ndarray:
    """True where a pixel lies outside every pasted square (with a 1 px margin)."""
    inside = np.zeros(shape[:2], np.uint8)
    for b in boxes:
        box = CropBox(b["cx"], b["cy"], b["side"], b["angle"])
        corners = crop_corners(box, side)
        cv2.fillPoly(inside, [np.round(corners).astype(np.int32)], 1)
    inside = cv2.dilate(inside, np.ones((3, 3), np.uint8))
    return inside == 0


def _run(qwen, photos, out, **options):
    params, lora, applier = qwen
    opts = ApplyOptions(prompt=PROMPT, **options)
    return apply_photos(params, photos, lora, out, opts, applier=applier)


def _check_edited(out: Path, entry: dict, source: np.ndarray) -> None:
    written = np.asarray(Image.open(out / entry["output"]).convert("RGB"))
    assert written.shape == source.shape
    boxes = [f["box"] for f in entry["faces"] if f["status"] == "edited"]
    assert boxes
    outside = _outside(source.shape, boxes, entry["faces"][0]["crop_side"])
    assert np.array_equal(written[outside], source[outside])
    assert (written[~outside] != source[~outside]).any()
    assert (out / entry["sheet"]).is_file()


def test_one_face_edited_and_nothing_outside_changes(qwen, shared_faces, tmp_path):
    photo = shared_faces / "same_person" / "obama" / "obama.jpg"
    report = _run(qwen, photo, tmp_path)
    (entry,) = report["photos"]
    assert entry["status"] == "edited", entry
    _check_edited(tmp_path, entry, _upright(photo))
    box = entry["faces"][0]["box"]
    # the face itself changed: the centre of the pasted square
    written = np.asarray(Image.open(tmp_path / entry["output"]).convert("RGB")).astype(int)
    cx, cy, r = int(box["cx"]), int(box["cy"]), int(box["side"] / 6)
    source = _upright(photo).astype(int)
    diff = np.abs(written - source)[cy - r : cy + r, cx - r : cx + r].mean()
    assert diff > 2
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["counts"] == {"edited": 1, "unedited": 0, "rejected": 0}


def test_the_outside_check_fails_without_the_mask(qwen, shared_faces, tmp_path, monkeypatch):
    """Mutation: a paste without the feathered mask changes pixels outside the square."""
    real = paste_module.paste
    monkeypatch.setattr(
        "facelora.apply.run.paste", lambda *a, **k: real(*a, **{**k, "use_mask": False})
    )
    photo = shared_faces / "same_person" / "obama" / "obama.jpg"
    report = _run(qwen, photo, tmp_path)
    with pytest.raises(AssertionError):
        _check_edited(tmp_path, report["photos"][0], _upright(photo))
    # and it is the outside check that fails
    (entry,) = report["photos"]
    source = _upright(photo)
    written = np.asarray(Image.open(tmp_path / entry["output"]).convert("RGB"))
    outside = _outside(source.shape, [entry["faces"][0]["box"]], entry["faces"][0]["crop_side"])
    assert not np.array_equal(written[outside], source[outside])


def test_an_exif_rotated_photo_is_edited_upright(qwen, shared_faces, tmp_path):
    source = _upright(shared_faces / "same_person" / "obama" / "obama.jpg")
    stored = np.ascontiguousarray(np.rot90(source, k=1))  # stored turned left: needs tag 6
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photos = tmp_path / "in"
    photos.mkdir()
    Image.fromarray(stored).save(photos / "turned.png", exif=exif)
    assert np.array_equal(_upright(photos / "turned.png"), source)
    report = _run(qwen, photos, tmp_path / "out")
    (entry,) = report["photos"]
    assert entry["status"] == "edited", entry
    _check_edited(tmp_path / "out", entry, source)


def test_every_face_of_a_group_photo(qwen, shared_faces, tmp_path):
    photo = shared_faces / "group" / "two_people.jpg"
    report = _run(qwen, photo, tmp_path)
    (entry,) = report["photos"]
    edited = [f for f in entry["faces"] if f["status"] == "edited"]
    assert len(edited) >= 2, entry
    _check_edited(tmp_path, entry, _upright(photo))
    largest = _run(qwen, photo, tmp_path / "largest", faces="largest")["photos"][0]
    assert [f["face_index"] for f in largest["faces"]] == [0]


def test_no_face_is_reported_and_copied_through(qwen, shared_faces, tmp_path):
    photos = tmp_path / "in"
    photos.mkdir()
    shutil.copy(shared_faces / "no_face" / "brick.png", photos)
    shutil.copy(shared_faces / "same_person" / "obama" / "obama.jpg", photos)
    report = _run(qwen, photos, tmp_path / "out")
    by_name = {p["photo"]: p for p in report["photos"]}
    brick = by_name["brick.png"]
    assert brick["status"] == "unedited" and "no face" in brick["reason"]
    copied = np.asarray(Image.open(tmp_path / "out" / brick["output"]).convert("RGB"))
    assert np.array_equal(copied, _upright(photos / "brick.png"))
    assert by_name["obama.jpg"]["status"] == "edited"
    skipped = _run(qwen, photos, tmp_path / "skip", skip_unedited=True)
    assert not (tmp_path / "skip" / "brick.png").exists()
    assert {p["photo"]: p["output"] for p in skipped["photos"]}["brick.png"] is None


def test_a_face_too_small_is_reported(qwen, shared_faces, tmp_path):
    params, lora, applier = qwen
    strict = params.model_copy(update={"crop": params.crop.model_copy(update={"min_side": 4096})})
    applier.params, saved = strict, applier.params
    try:
        report = apply_photos(
            strict,
            shared_faces / "same_person" / "obama" / "obama.jpg",
            lora,
            tmp_path,
            ApplyOptions(prompt=PROMPT),
            applier=applier,
        )
    finally:
        applier.params = saved
    (entry,) = report["photos"]
    assert entry["status"] == "unedited"
    assert "crop.min_side" in entry["reason"]


def test_a_lora_of_the_other_family_is_refused(tiny_models, tmp_path):
    klein = random_lora(tiny_models["flux2_klein"], "flux2_klein", tmp_path / "klein")
    params = _params("qwen_image_edit", tiny_models["qwen_image_edit"])
    with pytest.raises(SettingsError, match="flux2_klein"):
        Applier(params, klein)
    # without a family recorded, the modules themselves do not fit
    bare = random_lora(tiny_models["flux2_klein"], "flux2_klein", tmp_path / "bare", meta=False)
    with pytest.raises(SettingsError, match="another"):
        Applier(params, bare / lora_io.DIFFUSERS_WEIGHTS)


def test_paste_touches_only_the_inside_of_the_square():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    box = CropBox(200.0, 150.0, 120.0, 17.0)
    crop = warp_crop(photo, box, 64)
    out = paste(photo, np.zeros_like(crop), crop, box, colour_match=False)
    changed = (out != photo).any(-1)
    corners = crop_corners(box, 64)
    inside = np.zeros(photo.shape[:2], np.uint8)
    cv2.fillPoly(inside, [np.round(corners).astype(np.int32)], 1)
    inside = cv2.dilate(inside, np.ones((3, 3), np.uint8)).astype(bool)
    assert changed.any() and not (changed & ~inside).any()
    mask = feather_mask(64)
    assert mask[0].max() == 0 and mask[:, -1].max() == 0 and mask[32, 32] == 1


def test_the_command_reads_the_final_folder(qwen, tiny_models, shared_faces, tmp_path):
    """`facelora apply` end to end, through the declared params: the final folder's
    final.json gives the strength; --format same with apply.jpeg: reencode writes JPEG."""
    import subprocess

    import yaml

    from helpers import BIN

    params, lora, _ = qwen
    final = tmp_path / "final"
    final.mkdir()
    shutil.copy(lora / lora_io.DIFFUSERS_WEIGHTS, final)
    info = {"scale": 0.5, "base_model": {"family": "qwen_image_edit"}}
    (final / "final.json").write_text(json.dumps(info))
    settings = tmp_path / "params.yaml"
    dumped = params.model_dump(mode="json")
    dumped["apply"]["jpeg"] = "reencode"
    settings.write_text(yaml.safe_dump(dumped))
    photo = shared_faces / "same_person" / "obama" / "obama.jpg"
    args = [str(BIN / "facelora"), "--params", str(settings), "apply", str(photo)]
    args += ["--lora", str(final), "--prompt", PROMPT, "--out", str(tmp_path / "out")]
    done = subprocess.run([*args, "--format", "same"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["edited"] == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["scale"] == 0.5
    (entry,) = report["photos"]
    assert entry["output"] == "obama.jpg"
    with Image.open(tmp_path / "out" / "obama.jpg") as im:
        assert im.format == "JPEG" and im.size == Image.open(photo).size
    klein = {**info, "base_model": {"family": "flux2_klein"}}
    (final / "final.json").write_text(json.dumps(klein))
    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode == 2 and "flux2_klein" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_klein_edits_too(tiny_models, shared_faces, tmp_path):
    family = "flux2_klein"
    params = _params(family, tiny_models[family])
    lora = random_lora(tiny_models[family], family, tmp_path / "lora")
    photo = shared_faces / "same_person" / "obama" / "obama.jpg"
    options = ApplyOptions(prompt=PROMPT, faces="0", seed=1)
    report = apply_photos(params, photo, lora, tmp_path / "out", options)
    (entry,) = report["photos"]
    assert entry["status"] == "edited", entry
    _check_edited(tmp_path / "out", entry, _upright(photo))


def test_the_seam_colours_are_matched():
    from facelora.apply.paste import match_colours

    rng = np.random.default_rng(1)
    original = rng.normal(120, 20, (64, 64, 3)).clip(0, 255).astype(np.uint8)
    edited = rng.normal(60, 5, (64, 64, 3)).astype(np.float32)
    band = (feather_mask(64) > 0) & (feather_mask(64) < 1)
    matched = match_colours(edited, original, band)
    for c in range(3):
        assert abs(matched[..., c][band].mean() - original[..., c][band].mean()) < 0.5
    # the std ratio is bounded: a flat edit is not blown up into noise
    assert matched[..., 0][band].std() <= 2 * edited[..., 0][band].std() + 1e-3


def test_photos_of_one_name_do_not_overwrite_each_other():
    from facelora.apply.run import output_stems

    items = [("a.jpg", Path("a.jpg")), ("a.png", Path("a.png")), ("sub/b.jpg", Path("b.jpg"))]
    assert output_stems(items) == {"a.jpg": "a.jpg", "a.png": "a.png", "sub/b.jpg": "sub/b"}


def test_the_prompt_comes_from_the_params_or_is_refused(qwen):
    from facelora.apply.run import options_from

    params, _, _ = qwen
    with pytest.raises(SettingsError, match="apply.prompt"):
        options_from(params)
    given = params.model_copy(
        update={"apply": params.apply.model_copy(update={"prompt": PROMPT, "faces": "largest"})}
    )
    options = options_from(given)
    assert options.prompt == PROMPT and options.faces == "largest"
    flags = options_from(given, prompt="EDITFACE smile", faces="0", seed=3)
    assert (flags.prompt, flags.faces, flags.seed) == ("EDITFACE smile", "0", 3)
    with pytest.raises(ValueError, match="apply.faces"):
        validate_params({"apply": {"faces": "first"}})


def test_a_reference_changes_the_edit(qwen, shared_faces, tmp_path):
    photo = shared_faces / "same_person" / "obama" / "obama.jpg"
    reference = shared_faces / "group" / "two_people.jpg"
    plain = _run(qwen, photo, tmp_path / "plain", seed=7)["photos"][0]
    with_ref = _run(qwen, photo, tmp_path / "ref", seed=7, references=[reference])
    entry = with_ref["photos"][0]
    assert entry["status"] == "edited", entry
    assert with_ref["references"] == [str(reference)]
    a = np.asarray(Image.open(tmp_path / "plain" / plain["output"]))
    b = np.asarray(Image.open(tmp_path / "ref" / entry["output"]))
    assert not np.array_equal(a, b)
    # a reference without a face is used whole, scaled down
    _, _, applier = qwen
    brick = applier.reference(shared_faces / "no_face" / "brick.png")
    assert max(brick.size) <= applier.params.crop.output_side
    face = applier.reference(reference)
    assert face.size[0] == face.size[1]


def test_too_many_references_are_refused(qwen, shared_faces, tmp_path):
    photo = shared_faces / "same_person" / "obama" / "obama.jpg"
    most = get_family("qwen_image_edit").max_references
    with pytest.raises(SettingsError, match=f"at most {most}"):
        _run(qwen, photo, tmp_path, references=[photo] * (most + 1))


def test_jpeg_inputs_lossless_or_reencoded(qwen, shared_faces, tmp_path):
    photo = shared_faces / "same_person" / "obama" / "obama.jpg"
    source = _upright(photo)
    exact = _run(qwen, photo, tmp_path / "exact", format="same")["photos"][0]
    assert exact["output"] == "obama.png"
    _check_edited(tmp_path / "exact", exact, source)
    report = _run(qwen, photo, tmp_path / "jpeg", format="same", jpeg="reencode")
    (entry,) = report["photos"]
    assert entry["output"] == "obama.jpg"
    with Image.open(tmp_path / "jpeg" / "obama.jpg") as im:
        assert im.format == "JPEG" and im.size == (source.shape[1], source.shape[0])
        written = np.asarray(im.convert("RGB")).astype(int)
    outside = _outside(source.shape, [entry["faces"][0]["box"]], entry["faces"][0]["crop_side"])
    assert np.abs(written[outside] - source[outside].astype(int)).mean() < 3


def test_the_command_says_where_photos_go_and_that_a_prompt_is_needed(qwen, tmp_path):
    """As the `apply` rule calls it: no PHOTOS (apply.photos), no --prompt (apply.prompt)."""
    import subprocess

    import yaml

    from helpers import BIN

    params, lora, _ = qwen
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    args = [str(BIN / "facelora"), "apply", "--lora", str(lora), "--out", "out"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "data/apply (apply.photos)" in done.stderr
    (tmp_path / "data" / "apply").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "apply" / "a.png")
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "apply.prompt" in done.stderr, done.stderr

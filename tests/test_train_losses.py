"""The region-weighted flow-matching loss (train.losses.regions) on the tiny models."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from facelora.config import RegionWeights
from facelora.io.datasets import write_kontext_images
from facelora.prepare.faces.align import face_frame
from facelora.prepare.synthesis.swap_start import region_mask
from facelora.train.checkpoint import list_checkpoints
from facelora.train.loop import Trainer
from facelora.train.regions import landmark_weights, weighted_mse

from helpers import CAPTION, FAMILIES, paint_square, settings, smooth_image

# a face in the upper left of a 64 px end image: eyes, nose, mouth corners
LANDMARKS = [[16.0, 16.0], [26.0, 16.0], [21.0, 21.0], [17.0, 26.0], [25.0, 26.0]]
FACE_ONLY = {"face": 1.0, "hair": 0.0, "background": 0.0}


def write_face_pairs(folder, n=2, landmarks=LANDMARKS):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        start = smooth_image(rng, 64)
        rows.append(
            {
                "pair_id": f"p{i:012d}",
                "start_crop": start,
                "end_crop": paint_square(start),
                "caption": CAPTION,
                "end_landmarks": landmarks,
            }
        )
    write_kontext_images(folder, rows)
    return folder


def trainer_for(tmp_path, family, model, steps=6, data=None, **train):
    data = data or write_face_pairs(tmp_path / "data")
    params = settings(family, model, steps=steps, **train)
    return Trainer("one", data, tmp_path / "out", params, cache_dir=tmp_path / "cache")


def loss_of(trainer, batch, state):
    trainer.noise.set_state(state)  # the same noise and sigma for every call
    loss, _, _ = trainer._loss(batch)
    return loss


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_weights_give_the_plain_mse_exactly(tmp_path, tiny_models, family):
    trainer = trainer_for(tmp_path, family, tiny_models[family], resolution=128)
    assert not trainer.weighted  # the defaults: the loss is today's, untouched
    batch, state = trainer.samples[:1], trainer.noise.get_state()
    with torch.no_grad():
        plain = loss_of(trainer, batch, state)
        trainer.weighted = True  # the weighted path with every weight 1
        weighted = loss_of(trainer, batch, state)
    assert trainer._weights(batch).unique().tolist() == [1.0]
    assert abs(float(weighted) - float(plain)) <= 1e-7 * float(plain)
    # and on any tensors: ones weigh nothing
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 128, 8, 8, generator=g), torch.randn(2, 128, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(weighted_mse(pred, target, ones), F.mse_loss(pred, target), rtol=1e-7)
    # normalised by the weights' sum: scaling them all leaves the loss as it was
    assert torch.allclose(weighted_mse(pred, target, 0.3 * ones), F.mse_loss(pred, target))


def pixel_block_of(family, channels, h, w, scale):
    """For each latent element (c, i, j): the pixel block (y0, x0, side) it encodes, written
    out from the families' layouts (not from the adapters' code): Qwen keeps the VAE's grid
    of `scale` px cells; Klein packs each 2x2 group of VAE cells into the channels, channel
    c = vae_channel * 4 + dy * 2 + dx."""
    blocks = np.zeros((channels, h, w, 2), int)
    for c in range(channels):
        dy, dx = ((c % 4) // 2, c % 2) if family == "flux2_klein" else (0, 0)
        k = 2 if family == "flux2_klein" else 1
        for i in range(h):
            for j in range(w):
                blocks[c, i, j] = ((k * i + dy) * scale, (k * j + dx) * scale)
    return blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_face_only_weights_leave_no_gradient_outside_the_face(tmp_path, tiny_models, family):
    trainer = trainer_for(tmp_path, family, tiny_models[family], resolution=128)
    trainer.regions = RegionWeights(**FACE_ONLY)
    trainer.weighted = True
    batch = trainer.samples[:1]
    latents = trainer.cache.latents(batch[0].target, batch[0].size)[None]
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(latents.shape, generator=g).requires_grad_(True)
    target = torch.randn(latents.shape, generator=g)
    weighted_mse(pred, target, trainer._weights(batch)).backward()
    moved = pred.grad[0] != 0

    # where the face is, in training pixels (128 px: twice the landmarks), from the mask alone
    lm = np.array(LANDMARKS) * 2
    feather = RegionWeights().feather * face_frame(lm).size
    face = region_mask((128, 128), lm, "face", feather) > 0
    scale = trainer.adapter.pipe.vae_scale_factor
    blocks = pixel_block_of(family, *moved.shape, scale)
    expected = np.zeros(moved.shape, bool)
    for index in np.ndindex(moved.shape):
        y0, x0 = blocks[index]
        expected[index] = face[y0 : y0 + scale, x0 : x0 + scale].any()
    assert 0 < expected.mean() < 0.5  # the face is part of the image, not all of it
    assert np.array_equal(moved.numpy(), expected)


def test_qwen_weights_are_laid_out_where_the_latents_encode_those_pixels(tiny_models):
    """Change the pixels of one VAE cell: the latent elements that change most are those the
    weight map of that cell alone weighs (the VAE itself says where pixels go). Klein's tiny
    VAE mixes neighbouring cells too much for this (see the packing test below)."""
    from facelora.models.adapters import load_adapter

    adapter = load_adapter("qwen_image_edit", tiny_models["qwen_image_edit"], "float32", "cpu")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    before = adapter.encode_latents(image)
    f = adapter.pipe.vae_scale_factor
    for y0, x0 in [(1, 2), (2, 1), (3, 3), (5, 2)]:
        cell = (slice(None), slice(None), slice(y0 * f, (y0 + 1) * f), slice(x0 * f, (x0 + 1) * f))
        changed = image.clone()
        changed[cell] *= -1
        delta = (adapter.encode_latents(changed) - before).abs()
        pixels = torch.zeros(1, 1, 64, 64)
        pixels[cell] = 1
        weights = adapter.latent_weights(pixels).expand_as(delta)
        inside, outside = delta[weights > 0].mean(), delta[weights == 0].mean()
        assert inside > 2 * outside, (y0, x0, float(inside), float(outside))


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_packed_like_the_familys_latents(tiny_models, family):
    """A latent whose every VAE channel is the pixel map averaged per cell (computed here),
    packed by the pipeline's own function, is the weight tensor, element for element."""
    from facelora.models.adapters import load_adapter

    adapter = load_adapter(family, tiny_models[family], "float32", torch.device("cpu"))
    f = adapter.pipe.vae_scale_factor
    pixels = torch.rand(1, 1, 64, 96, generator=torch.Generator().manual_seed(0))
    cells = pixels.reshape(1, 1, 64 // f, f, 96 // f, f).mean(dim=(3, 5))
    latents = adapter.encode_latents(torch.zeros(1, 3, 64, 96))
    weights = adapter.latent_weights(pixels)
    if family == "flux2_klein":
        vae = cells.expand(1, adapter.pipe.vae.config.latent_channels, -1, -1)
        expected = adapter.pipe._patchify_latents(vae.contiguous())
        # and the pipeline's inverse brings every channel back to the pixel cells
        back = adapter.pipe._unpatchify_latents(weights)
        assert torch.allclose(back, vae, atol=1e-6)
    else:  # predict unpacks the 2x2 tokens back to the VAE grid: one weight per cell
        expected = cells
        packed = adapter._pack(weights.expand_as(latents).contiguous())
        assert torch.allclose(packed, adapter._pack(cells.expand_as(latents).contiguous()))
    assert weights.expand_as(latents).shape == latents.shape
    assert torch.allclose(weights, expected, atol=1e-6)


@pytest.mark.shared_faces
def test_face_weight_lands_on_the_detected_face(shared_faces):
    from facelora.config import FacesParams
    from facelora.prepare.faces.backends import make_backend

    backend = make_backend(FacesParams())
    for photo in ["obama/obama.jpg", "biden"]:
        path = shared_faces / "same_person" / photo
        path = path if path.is_file() else sorted(path.iterdir())[0]
        rgb = np.asarray(Image.open(path).convert("RGB"))
        faces = backend.describe(rgb, backend.detect(rgb))
        assert faces, path
        lm = np.asarray(faces[0].landmarks, dtype=np.float64)
        w = landmark_weights((rgb.shape[1], rgb.shape[0]), lm, RegionWeights(**FACE_ONLY))
        ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
        centre = np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()
        size = face_frame(lm).size
        # the face ellipse runs from mid-forehead to the chin: its centre sits a little below
        # the landmarks' (eyes, nose, mouth)
        assert np.linalg.norm(centre - lm.mean(axis=0)) < 0.15 * size, (photo, centre, lm)
        for x, y in lm:  # every landmark is face, the corners are background
            assert w[round(y), round(x)] == 1.0
        assert w[0, 0] == w[-1, -1] == 0.0
        assert 0.3 * size**2 < w.sum() < 2.0 * size**2  # about a face's area


def test_hair_is_the_band_around_the_face_and_the_weights_blend():
    lm = np.array(LANDMARKS) * 4 + [60.0, 80.0]  # the head well inside the image
    regions = RegionWeights(face=3.0, hair=2.0, background=0.5, feather=0.0)
    w = landmark_weights((256, 256), lm, regions)
    assert set(np.unique(w).tolist()) == {3.0, 2.0, 0.5}  # no feather: three plain regions
    x, y = lm[:2].mean(axis=0)
    size = face_frame(lm).size
    assert w[round(y), round(x)] == 3.0  # between the eyes
    assert w[round(y - 0.95 * size), round(x)] == 2.0  # above the forehead: hair
    assert w[255, 255] == 0.5
    soft = landmark_weights((256, 256), lm, regions.model_copy(update={"feather": 0.2}))
    assert len(np.unique(soft)) > 10 and soft.min() >= 0.5 and soft.max() <= 3.0


def test_all_zero_weights_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least one region"):
        RegionWeights(face=0.0, hair=0.0, background=0.0)


def test_folders_without_landmarks_train_with_weight_one(tmp_path, tiny_models, caplog):
    data = write_face_pairs(tmp_path / "data", landmarks=None)
    with caplog.at_level("INFO"):
        trainer = trainer_for(
            tmp_path,
            "qwen_image_edit",
            tiny_models["qwen_image_edit"],
            data=data,
            losses={"regions": FACE_ONLY},
        )
    assert "2 of 2 pairs" in caplog.text and "rerun the pairs" in caplog.text
    assert trainer._weights(trainer.samples[:1]).unique().tolist() == [1.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_region_weighted_training_resumes_byte_identically(tmp_path, tiny_models, family):
    regions = {"face": 1.0, "hair": 0.5, "background": 0.1}
    # every checkpoint keeps its resume state, so that step 3's can be resumed from
    train = {"losses": {"regions": regions}, "keep_states": None}
    data = write_face_pairs(tmp_path / "data", n=3)
    trainer = trainer_for(tmp_path, family, tiny_models[family], data=data, **train)
    assert trainer.weighted
    straight = trainer.run(show_progress=False)
    out = tmp_path / "out"
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    final = load_file(out / "checkpoints/step-000006/pytorch_lora_weights.safetensors")
    log_straight = (out / "log.csv").read_text().splitlines()
    # as if killed after the step-3 checkpoint: step 6 gone, the run starts again
    shutil.rmtree(out / "checkpoints/step-000006")
    again = trainer_for(tmp_path, family, tiny_models[family], data=data, **train).run(
        show_progress=False
    )
    assert again["resumed"] and again["fingerprint"] == straight["fingerprint"]
    resumed = load_file(out / "checkpoints/step-000006/pytorch_lora_weights.safetensors")
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    log_again = (out / "log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in log_again] == [r.split(",")[:2] for r in log_straight]
    # the weights change the training: the same run with the plain loss ends elsewhere
    plain = trainer_for(tmp_path / "plain", family, tiny_models[family], data=data)
    plain.run(show_progress=False)
    other = load_file(
        tmp_path / "plain/out/checkpoints/step-000006/pytorch_lora_weights.safetensors"
    )
    assert not all(torch.equal(final[k], other[k]) for k in final)

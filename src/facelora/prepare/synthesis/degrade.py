"""Restoration degradations: a seeded plan of filters, recorded, then applied exactly.

`draw_degradations` turns (seed, settings) into a plan: a JSON-ready list of steps, each a
filter with concrete parameters. `apply_degradations` applies exactly those parameters, so
the plan written to the manifest is the pair's full provenance: re-applying it to the crop
gives the same bytes. Steps run in a fixed order (blur, motion blur, downscale, noise,
colour fade, compression last, as a camera and then an encoder would), and with
`second_order` a second, milder chain follows (Real-ESRGAN's idea: real photos were often
degraded, then saved and degraded again). A step is {"name", "chain": 1 or 2, its
parameters}; steps with pixel sizes also record the crop "side" they were drawn for.

Library: albumentations 2.0.8 (MIT), pinned; its successor albumentationsx is AGPL, so do not
upgrade to it. Chosen over kornia (Apache-2.0) because:
- it works on uint8 arrays with OpenCV, 6-14x faster than kornia's torch filters at 1024 px
  on one CPU thread (measured: Gaussian blur 6 vs 76 ms, motion blur 64 vs 415 ms, JPEG 7
  vs 100 ms); both import torch (albumentations for its optional tensor conversion);
- its JPEG and WebP are the real codecs (libjpeg-turbo, libwebp via cv2.imencode), the
  artefacts real photos have; kornia has only a differentiable JPEG approximation, no WebP;
- every transform takes ranges, which collapse to the recorded value ((v, v)); the one
  random field (noise) comes from the step's own recorded seed (albumentations maps it to
  one of 65,536 OpenCV noise fields), so nothing depends on global state or thread count.
Same plan + same input = same bytes holds for the same albumentations/OpenCV/numpy versions
(a different noise generator or codec build may change pixels, not the plan's meaning).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

# Importing albumentations otherwise asks PyPI for a newer version (up to 2 s, every job).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2

from facelora.config import RestorationParams

REFERENCE_SIDE = 1024  # crops are usually this size; pixel-sized parameters are drawn for it
SECOND_ORDER_STRENGTH = 0.5  # the second chain, relative to the first
MIN_LEVEL = 0.5  # a step's damage is drawn in [MIN_LEVEL, 1] x strength: variety, never none

# The heaviest of each filter (level 1 = strength 1 at the top of the draw).
BLUR_SIGMA = (0.5, 1 / 128)  # px at level 0; fraction of the side at level 1 (8 px at 1024)
MOTION_LENGTH = (3, 1 / 24)  # kernel px at level 0; fraction of the side at level 1
DOWNSCALE_FACTOR = 8.0  # 1/8 of the side at level 1
NOISE_STD = (1 / 255, 25 / 255)  # of full scale; GFPGAN uses up to 20/255
GRAY_NOISE_SHARE = 0.4  # luminance-only noise, as many camera JPEGs have after denoising
JPEG_QUALITY = (95, 15)
WEBP_QUALITY = (95, 10)
FADE_SATURATION = 0.75  # lost at level 1 (factor 1 -> 0.25)
FADE_CONTRAST = 0.4  # lost at level 1 (factor 1 -> 0.6)
FADE_TINT = 24 / 255  # warm cast of an aged print (red up, blue down) at level 1

DOWN_INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
UP_INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}

ORDER = ("blur", "motion_blur", "downscale", "noise", "color_fade", "jpeg", "webp")
WORDS = {
    "blur": "blurry",
    "motion_blur": "motion-blurred",
    "downscale": "low-resolution",
    "noise": "noisy",
    "color_fade": "faded",
    "jpeg": "compressed",
    "webp": "compressed",
}


def _between(start: float, end: float, level: float) -> float:
    return start + (end - start) * level


def _odd(value: float) -> int:
    return int(value) // 2 * 2 + 1


# --- drawing: (rng, level, side) -> the step's parameters -------------------------------


def _draw_blur(rng: np.random.Generator, level: float, side: int) -> dict:
    sigma = _between(BLUR_SIGMA[0], BLUR_SIGMA[1] * side, level)
    return {"sigma": round(sigma, 3), "kernel": _odd(6 * sigma + 1), "side": side}


def _draw_motion_blur(rng: np.random.Generator, level: float, side: int) -> dict:
    length = _between(MOTION_LENGTH[0], MOTION_LENGTH[1] * side, level)
    angle = float(rng.uniform(0.0, 180.0))
    return {"kernel": max(3, _odd(length)), "angle": round(angle, 1), "side": side}


def _draw_downscale(rng: np.random.Generator, level: float, side: int) -> dict:
    down = list(DOWN_INTERPOLATIONS)[int(rng.integers(len(DOWN_INTERPOLATIONS)))]
    up = list(UP_INTERPOLATIONS)[int(rng.integers(len(UP_INTERPOLATIONS)))]
    scale = 1.0 / _between(1.0, DOWNSCALE_FACTOR, level)
    return {"scale": round(scale, 4), "down": down, "up": up}


def _draw_noise(rng: np.random.Generator, level: float, side: int) -> dict:
    gray = bool(rng.random() < GRAY_NOISE_SHARE)
    seed = int(rng.integers(2**31))
    return {"std": round(_between(*NOISE_STD, level), 4), "gray": gray, "seed": seed}


def _draw_color_fade(rng: np.random.Generator, level: float, side: int) -> dict:
    tint = FADE_TINT * level * float(rng.random())  # not every faded photo turned yellow
    return {
        "saturation": round(1.0 - FADE_SATURATION * level, 3),
        "contrast": round(1.0 - FADE_CONTRAST * level, 3),
        "tint": round(tint, 4),
    }


def _draw_jpeg(rng: np.random.Generator, level: float, side: int) -> dict:
    return {"quality": round(_between(*JPEG_QUALITY, level))}


def _draw_webp(rng: np.random.Generator, level: float, side: int) -> dict:
    return {"quality": round(_between(*WEBP_QUALITY, level))}


# --- applying: the step's parameters -> one albumentations transform, every range collapsed


def _blur(step: dict) -> A.BasicTransform:
    k, sigma = int(step["kernel"]), float(step["sigma"])
    return A.GaussianBlur(blur_limit=(k, k), sigma_limit=(sigma, sigma), p=1.0)


def _motion_blur(step: dict) -> A.BasicTransform:
    k, angle = int(step["kernel"]), float(step["angle"])
    return A.MotionBlur(
        blur_limit=(k, k),
        angle_range=(angle, angle),
        direction_range=(0.0, 0.0),  # symmetric streak, centred: no random shift
        allow_shifted=False,
        p=1.0,
    )


def _downscale(step: dict) -> A.BasicTransform:
    scale = float(step["scale"])
    pair = {
        "downscale": DOWN_INTERPOLATIONS[step["down"]],
        "upscale": UP_INTERPOLATIONS[step["up"]],
    }
    return A.Downscale(scale_range=(scale, scale), interpolation_pair=pair, p=1.0)


def _noise(step: dict) -> A.BasicTransform:
    std = float(step["std"])
    t = A.GaussNoise(
        std_range=(std, std), mean_range=(0.0, 0.0), per_channel=not step["gray"], p=1.0
    )
    t.set_random_seed(int(step["seed"]))  # the field is the step's own, not global state
    return t


def _color_fade(step: dict) -> A.BasicTransform:
    s, c, tint = float(step["saturation"]), float(step["contrast"]), float(step["tint"])
    # one factor per ColorJitter, so its random operation order cannot matter
    return A.Sequential(
        [
            A.ColorJitter(brightness=(1, 1), contrast=(c, c), saturation=(1, 1), hue=0, p=1),
            A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(s, s), hue=0, p=1),
            # fractions of full scale (RGBShift reads values above 1 as 0-255 levels)
            A.RGBShift(
                r_shift_limit=(tint, tint),
                g_shift_limit=(tint / 3, tint / 3),
                b_shift_limit=(-tint, -tint),
                p=1.0,
            ),
        ],
        p=1.0,
    )


def _jpeg(step: dict) -> A.BasicTransform:
    q = int(step["quality"])
    return A.ImageCompression(compression_type="jpeg", quality_range=(q, q), p=1.0)


def _webp(step: dict) -> A.BasicTransform:
    q = int(step["quality"])
    return A.ImageCompression(compression_type="webp", quality_range=(q, q), p=1.0)


Draw = Callable[[np.random.Generator, float, int], dict]
Make = Callable[[dict], A.BasicTransform]
FILTERS: dict[str, tuple[Draw, Make]] = {
    "blur": (_draw_blur, _blur),
    "motion_blur": (_draw_motion_blur, _motion_blur),
    "downscale": (_draw_downscale, _downscale),
    "noise": (_draw_noise, _noise),
    "color_fade": (_draw_color_fade, _color_fade),
    "jpeg": (_draw_jpeg, _jpeg),
    "webp": (_draw_webp, _webp),
}


def _chain(seed: int, chain: int, names: list[str], count: int, strength: float, side: int):
    """`count` of `names` in ORDER; each filter's draws come from its own stream, so they do
    not depend on strength or on which other filters were picked (strength orders damage)."""
    picker = np.random.default_rng([seed, chain])
    picked = set(picker.choice(len(names), size=count, replace=False).tolist())
    steps = []
    for name in ORDER:
        if name not in names or names.index(name) not in picked:
            continue
        rng = np.random.default_rng([seed, chain, ORDER.index(name)])
        level = strength * _between(MIN_LEVEL, 1.0, float(rng.random()))
        draw, _ = FILTERS[name]
        steps.append({"name": name, "chain": chain, **draw(rng, level, side)})
    return steps


def draw_degradations(
    seed: int, settings: RestorationParams, side: int = REFERENCE_SIDE
) -> list[dict]:
    """The seeded plan for one pair: `per_pair` filters of `settings.degradations`, scaled by
    `strength`, plus a chain at half strength when `second_order`. Pixel sizes (blur sigma
    and kernels) are drawn for a crop of `side` px; pass the crop's side when it differs."""
    names = list(dict.fromkeys(settings.degradations))  # unique, in the settings' order
    if settings.per_pair > len(names):
        raise ValueError(
            f"synthesis.restoration.per_pair is {settings.per_pair} but only {len(names)} "
            f"degradations are listed ({', '.join(names)}): lower per_pair or list more"
        )
    if side < 8:
        raise ValueError(f"side must be the crop's side in pixels, got {side}")
    plan = _chain(seed, 1, names, settings.per_pair, settings.strength, side)
    if settings.second_order:
        mild = settings.strength * SECOND_ORDER_STRENGTH
        plan += _chain(seed, 2, names, settings.per_pair, mild, side)
    return plan


def _transform(step: dict, index: int, side: int) -> A.BasicTransform:
    name = step.get("name")
    if name not in FILTERS:
        raise ValueError(
            f"degradation plan step {index}: unknown filter {name!r}; "
            f"expected one of {', '.join(FILTERS)}"
        )
    drawn_for = step.get("side")
    if drawn_for is not None and int(drawn_for) != side:
        raise ValueError(
            f"degradation plan step {index} ({name}) was drawn for a {drawn_for} px crop, the "
            f"image is {side} px: draw the plan with draw_degradations(..., side={side})"
        )
    try:
        return FILTERS[name][1](step)
    except KeyError as exc:
        raise ValueError(
            f"degradation plan step {index} ({name}) lacks the parameter {exc}; "
            "redraw the plan with draw_degradations"
        ) from None


def apply_degradations(rgb: np.ndarray, plan: list[dict[str, Any]]) -> np.ndarray:
    """The plan's steps applied in order to an H x W x 3 uint8 image; a new array of the
    same shape and dtype (the input is not modified)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(
            f"apply_degradations needs an H x W x 3 uint8 RGB image, got {rgb.dtype} "
            f"{rgb.shape}: convert it first (e.g. facelora.evaluate.metrics.to_rgb)"
        )
    side = max(rgb.shape[:2])
    out = np.ascontiguousarray(rgb).copy()
    for index, step in enumerate(plan):
        out = _transform(step, index, side)(image=out)["image"]
    return np.ascontiguousarray(out, dtype=np.uint8)


def damage_words(plan: list[dict[str, Any]]) -> str:
    """What the plan did, for the caption's {damage}: e.g. "blurry, noisy, compressed"."""
    words = dict.fromkeys(WORDS[step["name"]] for step in plan if step.get("name") in WORDS)
    return ", ".join(words)

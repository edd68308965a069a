"""The start image of a self-supervised swap pair: photo k with its face (or head) replaced.

Training pairs are end = photo k, start = photo k with the region filled, references = other
photos of the same person. The model can only learn to put the *reference* identity in if the
start does not already hold the answer, so the fill must leak no identity:

- blur (a Gaussian of 0.05 face sizes) keeps pose, expression, lighting and skin tone, but also
  the face's shape, proportions and colouring: the person is often still recognisable, and a
  model trained on it learns to sharpen the blur instead of reading the references (a
  shortcut that, on a real swap, carries the target's face into the result). Conditional
  deblurring works when the training pairs are not self-supervised (APPLE, CVPR 2026, trains
  its teacher on blurred starts and the student on pseudo-pairs), not with the same person
  on both sides.
- noise (seeded, per pixel, with the region's mean colour and spread) leaks only colour
  statistics (average skin tone and brightness), which the neck, ears and hair outside the
  face region show anyway; but per-pixel noise is far from anything edit models see in a start
  image, is likely to pass the VAE as texture, and a model may learn to keep some grain.
- gray (a flat mid-gray, 128) leaks nothing and marks the region unambiguously: it is the
  inpainting convention (diffusers' Stable Diffusion inpainting and FLUX.1 Fill pipelines
  zero the masked pixels in [-1, 1], i.e. mid-gray), encodes cleanly, and needs no seed.

Recommended: gray (the setting's default is noise). Pose and lighting still come from the
unmasked context; expression and gaze inside the region are lost with any identity-free
fill, so at use time the target must be prepared the same way (swap_start on the target).

Regions are ellipses in the face's own frame (rotated with the eye line), sized by the face
size of `face_frame` (max(2 x eye distance, 1.8 x eye-to-mouth distance)), in face sizes from
the eye line: face = forehead to chin, cheek to cheek; head = 1.4x as wide, up to the crown
and a little below the chin (hair close to the head and the ears; long hair falling past the
shoulders stays outside). The feathered edge lies outside the ellipse, so the whole ellipse is
replaced and pixels beyond the ellipse + feather are the input's, byte for byte.
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np

from facelora.config import SwapParams
from facelora.prepare.faces.align import face_frame

# Half width, then how far the ellipse reaches above and below the eye line, in face sizes.
REGIONS: dict[str, tuple[float, float, float]] = {
    "face": (0.60, 0.68, 0.93),  # cheek to cheek; mid-forehead to the chin
    "head": (0.85, 1.25, 1.02),  # ears and hair at the sides; the crown; just below the chin
}
BLUR_SIGMA = 0.05  # face sizes: eyes, nose and mouth become blobs
GRAY = 128
SHIFT = 4  # cv2.ellipse fixed-point bits: 1/16 px precision


def region_ellipse(
    landmarks: np.ndarray, region: Literal["face", "head"]
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """(center x, y), (half width, half height) in px and the angle in degrees (cv2.ellipse's
    convention) of the region for these 5 landmarks."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    frame = face_frame(pts)
    rad = math.radians(frame.angle)
    down = np.array([-math.sin(rad), math.cos(rad)])  # perpendicular to the eye line
    eye_mid = (pts[0] + pts[1]) / 2
    if np.dot((pts[3] + pts[4]) / 2 - eye_mid, down) < 0:  # an upside-down face
        down = -down
    half_width, above, below = REGIONS[region]
    center = eye_mid + down * (below - above) / 2 * frame.size
    axes = (half_width * frame.size, (above + below) / 2 * frame.size)
    return (float(center[0]), float(center[1])), (float(axes[0]), float(axes[1])), frame.angle


def region_mask(
    shape: tuple[int, ...],
    landmarks: np.ndarray,
    region: Literal["face", "head"],
    feather_px: float,
) -> np.ndarray:
    """H x W float32 in [0, 1]: 1 inside the region's ellipse, falling smoothly to exactly 0 at
    `feather_px` outside it."""
    height, width = shape[:2]
    center, axes, angle = region_ellipse(landmarks, region)
    inside = np.zeros((height, width), np.uint8)
    scale = 1 << SHIFT
    cv2.ellipse(
        inside,
        (round(center[0] * scale), round(center[1] * scale)),
        (round(axes[0] * scale), round(axes[1] * scale)),
        angle,
        0,
        360,
        1,
        thickness=-1,
        lineType=cv2.LINE_8,
        shift=SHIFT,
    )
    if feather_px <= 0:
        return inside.astype(np.float32)
    # distance of every outside pixel to the nearest inside one (0 inside)
    distance = cv2.distanceTransform(1 - inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    t = np.clip(1.0 - distance / np.float32(feather_px), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep: no visible seam


def _fill(
    rgb: np.ndarray, mask: np.ndarray, fill: str, face_size: float, seed: int
) -> tuple[np.ndarray, dict]:
    if fill == "gray":
        return np.full_like(rgb, GRAY), {"value": GRAY}
    if fill == "blur":
        sigma = BLUR_SIGMA * face_size
        return cv2.GaussianBlur(rgb, (0, 0), sigma), {"sigma": round(sigma, 3)}
    if fill == "noise":
        weights = mask[..., None]
        total = float(weights.sum()) or 1.0
        mean = (rgb * weights).sum(axis=(0, 1)) / total
        std = np.sqrt((((rgb - mean) ** 2) * weights).sum(axis=(0, 1)) / total)
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(rgb.shape, dtype=np.float32) * std + mean
        filled = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
        info = {"seed": int(seed), "mean": np.round(mean, 2).tolist()}
        return filled, {**info, "std": np.round(std, 2).tolist()}
    raise ValueError(f"synthesis.swap.fill must be blur, noise or gray, got {fill!r}")


def swap_start(
    rgb: np.ndarray, landmarks: np.ndarray, settings: SwapParams, seed: int
) -> tuple[np.ndarray, dict]:
    """The start image (same shape, uint8) and what was done, JSON-ready: the region's
    ellipse, the feather in px and the fill's parameters (its seed for noise)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(
            f"swap_start needs an H x W x 3 uint8 RGB image, got {rgb.dtype} {rgb.shape}"
        )
    size = face_frame(np.asarray(landmarks, dtype=np.float64).reshape(5, 2)).size
    feather_px = settings.feather * size
    mask = region_mask(rgb.shape, landmarks, settings.region, feather_px)
    filled, fill_info = _fill(rgb, mask, settings.fill, size, seed)
    out = rgb.copy()
    touched = mask > 0  # outside, the input's bytes are kept as they are
    m = mask[touched][:, None]
    blend = rgb[touched] * (1.0 - m) + filled[touched] * m
    out[touched] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    center, axes, angle = region_ellipse(landmarks, settings.region)
    return out, {
        "region": settings.region,
        "fill": settings.fill,
        **fill_info,
        "face_size": round(size, 2),
        "feather_px": round(feather_px, 2),
        "ellipse": {
            "center": [round(v, 2) for v in center],
            "axes": [round(v, 2) for v in axes],
            "angle": round(angle, 3),
        },
        "area": round(float((mask >= 0.5).mean()), 4),  # share of the image replaced
    }

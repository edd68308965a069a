"""Quality scores of a before/after pair, computed on aligned face crops.

Regions come from the 5 landmarks mapped into crop coordinates:
- face: an ellipse around eyes, nose and mouth (rotated with the eye line);
- skin: face pixels inside a slightly smaller ellipse whose colour is skin-like (YCrCb);
- hair: a ring around the face, above the mouth line (the top and sides of the head);
- background: everything outside the face ellipse dilated by pairs.bg_mask_dilation.

Scores: skin tone difference is CIEDE2000 between the mean CIE Lab colours of the two skin
regions; hair similarity is the mean of a colour-histogram intersection and the SSIM over the
hair ring; background SSIM is the SSIM map averaged outside the dilated face.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity

from facelora.prepare.faces.align import face_frame

# ellipse semi-axes as fractions of the face size (see faces.align.face_frame)
FACE_AXES = (0.42, 0.58)
SKIN_SHRINK = 0.8
HAIR_OUTER = 1.7
HAIR_INNER = 1.1


def _ellipse(shape: tuple[int, int], landmarks: np.ndarray, scale: float) -> np.ndarray:
    frame = face_frame(landmarks)
    # the ellipse centre sits between the eyes and the chin, below the frame centre
    mouth = (landmarks[3] + landmarks[4]) / 2
    center = (frame.center + mouth) / 2
    axes = (frame.size * FACE_AXES[0] * scale, frame.size * FACE_AXES[1] * scale)
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(
        mask,
        (round(center[0]), round(center[1])),
        (max(1, round(axes[0])), max(1, round(axes[1]))),
        frame.angle,
        0,
        360,
        1,
        thickness=-1,
    )
    return mask.astype(bool)


def face_mask(shape: tuple[int, int], landmarks: np.ndarray, dilation: float = 0.0) -> np.ndarray:
    return _ellipse(shape, landmarks, 1.0 + dilation)


def skin_mask(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    inner = _ellipse(rgb.shape[:2], landmarks, SKIN_SHRINK)
    ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    skin_like = (cr >= 133) & (cr <= 180) & (cb >= 77) & (cb <= 135)
    mask = inner & skin_like
    # a face lit oddly may fail the colour test: fall back to the whole inner ellipse
    return mask if mask.sum() >= 0.15 * max(1, inner.sum()) else inner


def hair_mask(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    ring = _ellipse(shape, landmarks, HAIR_OUTER) & ~_ellipse(shape, landmarks, HAIR_INNER)
    # keep what lies above the mouth line, measured along the face's own "up" direction
    frame = face_frame(landmarks)
    mouth = (landmarks[3] + landmarks[4]) / 2
    rad = math.radians(frame.angle)
    up = np.array([math.sin(rad), -math.cos(rad)])
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    height_above_mouth = (xs - mouth[0]) * up[0] + (ys - mouth[1]) * up[1]
    return ring & (height_above_mouth > 0)


def mean_lab(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pixels = rgb[mask].astype(np.float64) / 255.0
    if len(pixels) == 0:
        return np.full(3, np.nan)
    return rgb2lab(pixels.reshape(-1, 1, 3)).reshape(-1, 3).mean(axis=0)


def skin_delta_e(rgb_a: np.ndarray, lm_a: np.ndarray, rgb_b: np.ndarray, lm_b: np.ndarray) -> float:
    lab_a = mean_lab(rgb_a, skin_mask(rgb_a, lm_a))
    lab_b = mean_lab(rgb_b, skin_mask(rgb_b, lm_b))
    if np.isnan(lab_a).any() or np.isnan(lab_b).any():
        return float("nan")
    return float(deltaE_ciede2000(lab_a[None], lab_b[None])[0])


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    grey_a = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    grey_b = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    return structural_similarity(grey_a, grey_b, data_range=255, full=True, win_size=7)[1]


def _hist(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h = cv2.calcHist([hsv], [0, 1, 2], mask.astype(np.uint8), [12, 8, 4], [0, 180, 0, 256, 0, 256])
    total = h.sum()
    return h / total if total > 0 else h


def hair_similarity(
    rgb_a: np.ndarray, lm_a: np.ndarray, rgb_b: np.ndarray, lm_b: np.ndarray
) -> float:
    mask_a = hair_mask(rgb_a.shape[:2], lm_a)
    mask_b = hair_mask(rgb_b.shape[:2], lm_b)
    if mask_a.sum() < 16 or mask_b.sum() < 16:
        return float("nan")
    hist = float(np.minimum(_hist(rgb_a, mask_a), _hist(rgb_b, mask_b)).sum())
    if rgb_a.shape == rgb_b.shape:
        both = mask_a & mask_b
        structure = (
            float(np.clip(_ssim_map(rgb_a, rgb_b)[both].mean(), 0.0, 1.0)) if both.any() else 0.0
        )
    else:
        structure = hist
    return 0.5 * hist + 0.5 * structure


def background_ssim(
    rgb_a: np.ndarray, lm_a: np.ndarray, rgb_b: np.ndarray, lm_b: np.ndarray, dilation: float
) -> float:
    """SSIM outside the (dilated) faces of both crops; crops must share geometry and size."""
    if rgb_a.shape != rgb_b.shape:
        return float("nan")
    faces = face_mask(rgb_a.shape[:2], lm_a, dilation) | face_mask(rgb_b.shape[:2], lm_b, dilation)
    outside = ~faces
    if outside.sum() < 64:
        return float("nan")
    return float(_ssim_map(rgb_a, rgb_b)[outside].mean())


def identity_similarity(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    a = np.asarray(emb_a, np.float64)
    b = np.asarray(emb_b, np.float64)
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else float("nan")


# --- the composite score ------------------------------------------------------------------


def score_to_unit(
    name: str, value: float, ranges: dict[str, tuple[float, float]] | None = None
) -> float:
    """Map one score onto 0 (bad) .. 1 (good) for the weighted `quality` composite; `ranges`:
    the VLM rubric's (min, max) per score (higher is better)."""
    if value is None or not np.isfinite(value):
        return float("nan")
    if ranges and name in ranges:
        low, high = ranges[name]
        return float(np.clip((value - low) / (high - low), 0.0, 1.0))
    if name in ("skin_delta_e", "skin_delta_e_ref"):
        return math.exp(-value / 10.0)  # 2.3 is a just-noticeable difference
    if name == "pose_diff":
        return math.exp(-value / 20.0)
    if name == "resolution":
        return min(1.0, value / 1024.0)
    return float(np.clip(value, 0.0, 1.0))


def composite_quality(
    scores: dict[str, float],
    weights: dict[str, float],
    ranges: dict[str, tuple[float, float]] | None = None,
) -> float:
    """Weighted mean of the unit-mapped scores; missing scores are left out."""
    total = weight_sum = 0.0
    for name, weight in weights.items():
        value = scores.get(name)
        unit_value = score_to_unit(name, float("nan") if value is None else value, ranges)
        if weight > 0 and np.isfinite(unit_value):
            total += weight * unit_value
            weight_sum += weight
    return total / weight_sum if weight_sum > 0 else float("nan")

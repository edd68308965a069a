"""Paste an edited crop back into the full-resolution photo.

The crop was cut with `CropBox.matrix` (photo -> crop); the edit goes back through the
inverse map, weighted by a feathered square that is 0 at the crop's edge, so the photo
outside the square is untouched (bit for bit) and the seam fades in. Before pasting, the
edit's colours are matched per channel (mean, std) to the original crop's in the seam band.
"""

from __future__ import annotations

import cv2
import numpy as np

from facelora.prepare.faces.align import CropBox

FEATHER = 0.12  # of the crop side: the band over which the edit fades in


def feather_mask(side: int, feather: float = FEATHER) -> np.ndarray:
    """(side, side) float32 in [0, 1]: 0 on the border pixels, 1 deeper than feather x side."""
    width = max(1.0, feather * side)
    idx = np.arange(side, dtype=np.float32)
    edge = np.minimum(idx, side - 1 - idx)  # distance to the nearest border pixel
    ramp = np.clip(edge / width, 0.0, 1.0)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep: no visible kink
    return np.minimum(ramp[:, None], ramp[None, :]).astype(np.float32)


def match_colours(edited: np.ndarray, original: np.ndarray, band: np.ndarray) -> np.ndarray:
    """`edited` (float32, HxWx3) shifted and scaled per channel so its mean and std in `band`
    (a boolean mask) are the original's; the scale is kept within [0.5, 2]."""
    if band.sum() < 16:
        return edited
    out = edited.copy()
    for c in range(3):
        e, o = edited[..., c][band], original[..., c][band].astype(np.float32)
        ratio = float(np.clip((o.std() + 1e-3) / (e.std() + 1e-3), 0.5, 2.0))
        out[..., c] = (edited[..., c] - e.mean()) * ratio + o.mean()
    return out


def crop_corners(box: CropBox, side: int) -> np.ndarray:
    """The crop square's 4 corners in photo pixels (4, 2)."""
    inverse = cv2.invertAffineTransform(box.matrix(side))
    square = np.array([[0, 0], [side, 0], [side, side], [0, side]], np.float64)
    return square @ inverse[:, :2].T + inverse[:, 2]


def paste(
    photo: np.ndarray,
    edited: np.ndarray,
    original_crop: np.ndarray,
    box: CropBox,
    *,
    feather: float = FEATHER,
    colour_match: bool = True,
    use_mask: bool = True,
) -> np.ndarray:
    """`photo` (HxWx3 uint8) with `edited` (a crop of `box`, any square size) pasted in.

    Only the bounding rectangle of the crop square is touched, and there only where the warped
    mask is above 0; `use_mask=False` pastes the whole warped rectangle (for tests)."""
    side = original_crop.shape[0]
    if edited.shape[:2] != (side, side):
        edited = cv2.resize(edited, (side, side), interpolation=cv2.INTER_AREA)
    mask = feather_mask(side, feather)
    work = edited.astype(np.float32)
    if colour_match:
        band = (mask > 0) & (mask < 1)
        work = match_colours(work, original_crop, band)
    h, w = photo.shape[:2]
    corners = crop_corners(box, side)
    x0, y0 = np.floor(corners.min(0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return photo.copy()
    m = box.matrix(side).copy()
    # photo pixel (x + x0, y + y0) -> crop: shift the map's input by the rectangle's origin
    m[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    size = (x1 - x0, y1 - y0)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    back = cv2.warpAffine(work, m, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    if use_mask:
        alpha = cv2.warpAffine(mask, m, size, flags=flags, borderValue=0.0)
    else:
        alpha = np.ones(size[::-1], np.float32)
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    out = photo.copy()
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = np.clip(np.rint(region + alpha * (back - region)), 0, 255).astype(np.uint8)
    touched = alpha[..., 0] > 0
    out[y0:y1, x0:x1][touched] = blended[touched]
    return out


def sheet(before: np.ndarray, after: np.ndarray, height: int = 512) -> np.ndarray:
    """Before | after, side by side, at most `height` pixels high."""
    h, w = before.shape[:2]
    scale = min(1.0, height / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    a = cv2.resize(before, size, interpolation=cv2.INTER_AREA)
    b = cv2.resize(after, size, interpolation=cv2.INTER_AREA)
    gap = np.full((size[1], 8, 3), 255, np.uint8)
    return np.concatenate([a, gap, b], axis=1)

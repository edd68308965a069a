"""Crop geometry: a square around a face, rotated so the eyes are level, and the warp.

Geometry comes from the 5 canonical landmarks, so every detector gives the same framing:
the face size is max(2.0 x eye distance, 1.8 x eye-to-mouth distance), and the crop side is
face size x (1 + 2 x padding). The square is shifted (never padded with invented pixels) to
stay inside the photo, and shrunk when the photo is too small for the requested padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from facelora.config import CropParams


class CropRejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CropBox:
    """A square in full-resolution pixels of the upright photo."""

    cx: float
    cy: float
    side: float
    angle: float  # degrees; the eye-line angle that the warp removes

    def matrix(self, out_side: int, image_scale: float = 1.0) -> np.ndarray:
        """2x3 affine map from (possibly reduced, by image_scale) image pixels to the crop."""
        scale = out_side / (self.side * image_scale)
        m = cv2.getRotationMatrix2D(
            (self.cx * image_scale, self.cy * image_scale), self.angle, scale
        )
        m[0, 2] += out_side / 2 - self.cx * image_scale
        m[1, 2] += out_side / 2 - self.cy * image_scale
        return m

    def rescaled(self, sx: float, sy: float) -> CropBox:
        """The same region in an image resized by (sx, sy) (equal up to rounding)."""
        return CropBox(self.cx * sx, self.cy * sy, self.side * (sx + sy) / 2, self.angle)


@dataclass(frozen=True)
class FaceFrame:
    center: np.ndarray  # (2,)
    size: float
    angle: float  # eye-line angle in degrees (image coordinates, y down)


def face_frame(landmarks: np.ndarray) -> FaceFrame:
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye_mid = (pts[0] + pts[1]) / 2
    mouth_mid = (pts[3] + pts[4]) / 2
    eye_vec = pts[1] - pts[0]
    eye_to_mouth = mouth_mid - eye_mid
    size = max(2.0 * float(np.linalg.norm(eye_vec)), 1.8 * float(np.linalg.norm(eye_to_mouth)))
    angle = math.degrees(math.atan2(eye_vec[1], eye_vec[0]))
    center = eye_mid + 0.1 * eye_to_mouth
    return FaceFrame(center=center, size=size, angle=angle)


def plan_crop(
    landmarks: np.ndarray, width: int, height: int, params: CropParams
) -> tuple[CropBox, list[str]]:
    """The crop square for a face, or CropRejected with the reason. Returns (box, notes)."""
    frame = face_frame(landmarks)
    notes: list[str] = []
    angle = frame.angle if params.align else 0.0
    rad = math.radians(angle)
    up = np.array([math.sin(rad), -math.cos(rad)])  # the face's "up" in image coordinates
    center = frame.center - params.vertical_shift * frame.size * up
    side = frame.size * (1.0 + 2.0 * params.padding)
    extent = abs(math.cos(rad)) + abs(math.sin(rad))  # axis-aligned size per unit side
    fit = min(width, height) / extent
    if side > fit:
        notes.append(f"shrunk from {side:.0f} to {fit:.0f} px to stay inside the photo")
        side = fit
    if side < params.min_side:
        raise CropRejected(
            f"face too small: crop side {side:.0f} px < crop.min_side {params.min_side} "
            f"(face {frame.size:.0f} px, padding {params.padding})"
        )
    half = side * extent / 2
    cx = float(np.clip(center[0], half, width - half))
    cy = float(np.clip(center[1], half, height - half))
    if abs(cx - center[0]) > 0.5 or abs(cy - center[1]) > 0.5:
        notes.append(f"shifted by ({cx - center[0]:.0f}, {cy - center[1]:.0f}) px to stay inside")
    return CropBox(cx, cy, float(side), float(angle)), notes


def output_side(side: float, params: CropParams) -> int:
    if side >= params.output_side or params.allow_upscale:
        return params.output_side
    return max(params.size_multiple, int(side // params.size_multiple) * params.size_multiple)


def warp_crop(
    rgb: np.ndarray,
    box: CropBox,
    out_side: int,
    image_scale: float = 1.0,
    interpolation: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """Cut the square out of `rgb` (full resolution x image_scale) at out_side x out_side.

    Large reductions first shrink the region with area averaging (no aliasing), then the
    rotation is done near 1:1 with bicubic interpolation (`interpolation`: e.g. linear for a
    grey mask, whose levels must stay within the source's). A 2-D array (grey) stays 2-D.
    """
    scale = out_side / (box.side * image_scale)
    if scale < 0.5:
        half = box.side * image_scale * 0.75  # covers the rotated square (<= sqrt(2)/2)
        cx, cy = box.cx * image_scale, box.cy * image_scale
        x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
        x1 = min(rgb.shape[1], math.ceil(cx + half))
        y1 = min(rgb.shape[0], math.ceil(cy + half))
        region = rgb[y0:y1, x0:x1]
        pre = scale * 1.25  # leave a little resolution for the final interpolation
        size = (max(1, round(region.shape[1] * pre)), max(1, round(region.shape[0] * pre)))
        small = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        fx, fy = size[0] / region.shape[1], size[1] / region.shape[0]
        shifted = CropBox(
            (box.cx * image_scale - x0) * fx,
            (box.cy * image_scale - y0) * fy,
            box.side * image_scale * (fx + fy) / 2,
            box.angle,
        )
        return warp_crop(small, shifted, out_side, 1.0, interpolation)
    m = box.matrix(out_side, image_scale)
    return cv2.warpAffine(
        rgb, m, (out_side, out_side), flags=interpolation, borderMode=cv2.BORDER_REPLICATE
    )


def transform_points(points: np.ndarray, box: CropBox, out_side: int) -> np.ndarray:
    """Map full-resolution image points into crop pixel coordinates."""
    m = box.matrix(out_side)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]

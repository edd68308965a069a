"""What every face backend returns, in one shape, whatever the model behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Landmarks are always 5 points in this order (ArcFace's), in image coordinates:
# the eye on the image's left, the eye on the image's right, nose tip,
# mouth corner on the image's left, mouth corner on the image's right.
LANDMARK_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


@dataclass
class Detection:
    box: np.ndarray  # x0, y0, x1, y1 (float, pixels)
    score: float
    landmarks: np.ndarray | None = None  # (5, 2) when the detector provides them

    @property
    def side(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


@dataclass
class Face:
    box: np.ndarray  # x0, y0, x1, y1
    score: float
    landmarks: np.ndarray  # (5, 2) in LANDMARK_NAMES order
    embedding: np.ndarray  # unit length, float32


class Detector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


class Embedder(Protocol):
    name: str
    dim: int

    def describe(self, rgb: np.ndarray, detections: list[Detection]) -> list[Face]:
        """Landmarks (kept from the detector when it gives them) and a unit embedding."""
        ...


def unit(vector: np.ndarray) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v

"""Pick the face backend named by faces.backend: a detector plus a landmark/embedding model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facelora.config import FacesParams
from facelora.prepare.faces.types import Detection, Detector, Embedder, Face


@dataclass
class FaceBackend:
    detector: Detector
    embedder: Embedder

    @property
    def min_score(self) -> float:
        """Detections below this are kept out (detectors that filter inside report -inf)."""
        return getattr(self.detector, "min_score", float("-inf"))

    @property
    def min_score_setting(self) -> str:
        return getattr(self.detector, "min_score_setting", "the detector's min_score")

    @property
    def name(self) -> str:
        return f"{self.detector.name}+{self.embedder.name}"

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        return self.detector.detect(rgb)

    def describe(self, rgb: np.ndarray, detections: list[Detection]) -> list[Face]:
        return self.embedder.describe(rgb, detections) if detections else []


def make_embedder(params: FacesParams, kind: str) -> Embedder:
    if kind == "dlib":
        from facelora.prepare.faces.dlib_backend import DlibEmbedder

        return DlibEmbedder(params.dlib)
    from facelora.prepare.faces.insightface_backend import ArcFaceEmbedder

    return ArcFaceEmbedder(params.insightface, params.dlib)


def make_backend(params: FacesParams) -> FaceBackend:
    """Load the models named in params.yaml; a missing file raises ModelFileMissing."""
    if params.backend == "dlib":
        from facelora.prepare.faces.dlib_backend import DlibDetector

        return FaceBackend(DlibDetector(params.dlib), make_embedder(params, "dlib"))
    if params.backend == "insightface":
        from facelora.prepare.faces.insightface_backend import ScrfdDetector

        return FaceBackend(ScrfdDetector(params.insightface), make_embedder(params, "insightface"))
    from facelora.prepare.faces.ultralytics_backend import YoloDetector

    return FaceBackend(
        YoloDetector(params.ultralytics), make_embedder(params, params.ultralytics.embedder)
    )

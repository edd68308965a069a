"""dlib: HOG (or CNN) detector, 68-point landmarks reduced to 5, 128-D ResNet embedding.

The model files ship in the face-recognition-models package, so this backend needs no
download. That package imports the removed `pkg_resources` on import, so its folder is found
without importing it.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import cv2
import dlib
import numpy as np

from facelora.config import DlibParams
from facelora.errors import ModelFileMissing
from facelora.prepare.faces.types import Detection, Face, unit

CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the aligned chip dlib's embedder expects

MODEL_FILES = {
    "cnn_model": "mmod_human_face_detector.dat",
    "landmarks_model": "shape_predictor_68_face_landmarks.dat",
    "embedder_model": "dlib_face_recognition_resnet_model_v1.dat",
}


@cache
def bundled_models_dir() -> Path | None:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_path(params: DlibParams, setting: str) -> Path:
    configured = getattr(params, setting)
    if configured:
        path = Path(configured).expanduser()
        where = f"faces.dlib.{setting} = {configured}"
    else:
        bundled = bundled_models_dir()
        if bundled is None:
            raise ModelFileMissing(
                f"faces.dlib.{setting}: not set and the face-recognition-models package is not "
                f"installed; pip install face-recognition-models or set the path"
            )
        path = bundled / MODEL_FILES[setting]
        where = f"faces.dlib.{setting} (default {path})"
    if not path.is_file():
        raise ModelFileMissing(
            f"{where}: file not found; set faces.dlib.{setting} to the .dat file"
        )
    return path


def _rect(box: np.ndarray) -> dlib.rectangle:
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    return dlib.rectangle(x0, y0, x1, y1)


class DlibDetector:
    min_score_setting = "faces.dlib.min_score"

    def __init__(self, params: DlibParams):
        self.params = params
        self.min_score = params.min_score  # applied by the detect step, which reports it
        if params.detector == "cnn":
            self.name = "dlib-cnn"
            self._cnn = dlib.cnn_face_detection_model_v1(str(model_path(params, "cnn_model")))
        else:
            self.name = "dlib-hog"
            self._hog = dlib.get_frontal_face_detector()

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        out = []
        if self.params.detector == "cnn":
            for d in self._cnn(rgb, self.params.upsample):
                r = d.rect
                out.append(
                    Detection(
                        np.array([r.left(), r.top(), r.right(), r.bottom()], float),
                        float(d.confidence),
                    )
                )
        else:
            # the detector's own threshold (0): weaker detections than min_score are returned,
            # so the detect step can tell "no face" from "only low-confidence faces"
            # on grey: the same faces as on colour here, about 30% faster
            grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            rects, scores, _ = self._hog.run(grey, self.params.upsample, min(0.0, self.min_score))
            for r, s in zip(rects, scores, strict=True):
                out.append(
                    Detection(np.array([r.left(), r.top(), r.right(), r.bottom()], float), float(s))
                )
        return out


def five_from_68(shape: dlib.full_object_detection) -> np.ndarray:
    pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    return np.stack(
        [
            pts[36:42].mean(axis=0),  # eye on the image's left
            pts[42:48].mean(axis=0),
            pts[30],  # nose tip
            pts[48],
            pts[54],
        ]
    ).astype(np.float32)


class DlibEmbedder:
    name = "dlib-resnet128"
    dim = 128

    def __init__(self, params: DlibParams):
        self._predictor = dlib.shape_predictor(str(model_path(params, "landmarks_model")))
        parts = self._predictor(np.zeros((8, 8, 3), np.uint8), dlib.rectangle(0, 0, 7, 7)).num_parts
        if parts != 68:
            raise ModelFileMissing(
                f"faces.dlib.landmarks_model: expected a 68-point predictor, this one has "
                f"{parts} points"
            )
        weights = model_path(params, "embedder_model")
        self.runtime = params.embedder_runtime
        if self.runtime == "torch":
            from facelora.prepare.faces.dlib_resnet import DlibFaceResNet, load_layers

            self._torch_net = DlibFaceResNet(load_layers(weights))
        else:
            self._net = dlib.face_recognition_model_v1(str(weights))

    def shape(self, rgb: np.ndarray, box: np.ndarray) -> dlib.full_object_detection:
        return self._predictor(rgb, _rect(box))

    def describe(self, rgb: np.ndarray, detections: list[Detection]) -> list[Face]:
        if not detections:
            return []
        shapes = [self.shape(rgb, det.box) for det in detections]
        embeddings = self.embed(rgb, shapes)
        faces = []
        for det, shape, embedding in zip(detections, shapes, embeddings, strict=True):
            landmarks = det.landmarks if det.landmarks is not None else five_from_68(shape)
            faces.append(
                Face(det.box, det.score, np.asarray(landmarks, np.float32), unit(embedding))
            )
        return faces

    def embed(self, rgb: np.ndarray, shapes: list) -> np.ndarray:
        """128-D descriptors (not normalised) of the faces given by their 68-point shapes."""
        if self.runtime == "dlib":
            return np.array([self._net.compute_face_descriptor(rgb, s) for s in shapes])
        import torch

        chips = dlib.get_face_chips(
            rgb, dlib.full_object_detections(shapes), CHIP_SIZE, CHIP_PADDING
        )
        return self._torch_net(torch.from_numpy(np.stack(chips))).numpy()

    def landmarks(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        return five_from_68(self.shape(rgb, box))

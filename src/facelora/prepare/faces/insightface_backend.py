"""InsightFace: SCRFD detector (box, score, 5 landmarks) and ArcFace embedding (512-D).

The models come from an InsightFace model pack already on disk (buffalo_l: det_10g.onnx +
w600k_r50.onnx; buffalo_sc: det_500m.onnx + w600k_mbf.onnx). insightface's FaceAnalysis
downloads a missing pack, so it is not used: the two files are picked out of the pack folder
and loaded with `insightface.model_zoo.get_model`, and a missing file is an error that names the
params.yaml setting to fix. Everything runs on the CPU execution provider.

insightface expects OpenCV's BGR channel order; this project passes RGB, so images are
converted here, once, at the boundary.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from insightface.model_zoo import get_model
from insightface.model_zoo.package_manifest import (
    DETECTION_TASK,
    RECOGNITION_TASK,
    has_model_package_manifest,
    load_model_package,
)
from insightface.utils.face_align import norm_crop

from facelora.config import DlibParams, InsightfaceParams
from facelora.errors import ModelFileMissing
from facelora.prepare.faces.types import Detection, Face, unit

PROVIDERS = ["CPUExecutionProvider"]
# What each role looks like in the usual packs, for the error message.
EXPECTED = {
    DETECTION_TASK: "an SCRFD detector such as det_10g.onnx (buffalo_l) or det_500m.onnx "
    "(buffalo_sc)",
    RECOGNITION_TASK: "an ArcFace recogniser such as w600k_r50.onnx (buffalo_l) or "
    "w600k_mbf.onnx (buffalo_sc)",
}
# Square input sides that insightface routes to other models (2d106det/1k3d68 landmarks: 192,
# genderage: 96, inswapper: 128 with two inputs) rather than to ArcFace.
NOT_RECOGNITION_SIDES = {192}


def pack_dir(params: InsightfaceParams) -> Path:
    """ROOT/models/PACK, or PACK itself when it is written as a path (has a slash or ~)."""
    pack = params.pack
    if "/" in pack or "\\" in pack or pack.startswith("~"):
        return Path(pack).expanduser()
    return Path(params.root).expanduser() / "models" / pack


def _where(params: InsightfaceParams) -> str:
    return (
        f"faces.insightface.root = {params.root}, faces.insightface.pack = {params.pack} "
        f"(folder {pack_dir(params)})"
    )


def _graph_role(path: Path) -> str | None:
    stat = path.stat()
    return _graph_role_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@cache
def _graph_role_of(path: str, size: int, mtime_ns: int) -> str | None:
    """Which task insightface's model router gives this ONNX file, read from its graph alone.

    Reading the graph is much cheaper than opening an inference session for every model in
    the pack (buffalo_l also holds landmark and gender/age models); the detector and the
    embedder both look, so the answer is kept per file version.
    """
    del size, mtime_ns  # part of the cache key only
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # not a readable ONNX file: not one of ours
        return None
    if len(graph.output) >= 5:  # scores, boxes (and keypoints) per stride
        return DETECTION_TASK
    if len(graph.input) != 1 or len(graph.output) != 1:
        return None
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    height, width = dims[2].dim_value, dims[3].dim_value
    if height == width >= 112 and height % 16 == 0 and height not in NOT_RECOGNITION_SIDES:
        return RECOGNITION_TASK
    return None


def model_file(params: InsightfaceParams, task: str) -> Path:
    """The pack's ONNX file for `task` (detection or recognition); never downloads."""
    folder = pack_dir(params)
    if not folder.is_dir():
        raise ModelFileMissing(
            f"{_where(params)}: folder not found; it should hold {EXPECTED[task]}. "
            f"Unpack an InsightFace model pack there, or set faces.insightface.root / "
            f"faces.insightface.pack to the folder that holds one (nothing is downloaded)"
        )
    if has_model_package_manifest(folder):
        descriptor = load_model_package(folder).tasks.get(task)
        if descriptor is None or not descriptor.path.is_file():
            raise ModelFileMissing(
                f"{_where(params)}: the pack's manifest.json names no existing {task} model; "
                f"it should name {EXPECTED[task]}"
            )
        return descriptor.path
    found = sorted(p for p in folder.glob("*.onnx") if _graph_role(p) == task)
    if not found:
        raise ModelFileMissing(
            f"{_where(params)}: no {task} model found among the *.onnx files; expected "
            f"{EXPECTED[task]}. Set faces.insightface.pack to a complete pack"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(
            f"{_where(params)}: several {task} models ({names}); keep one per pack folder"
        )
    return found[0]


def load_model(params: InsightfaceParams, task: str) -> Any:
    """An insightface SCRFD or ArcFaceONNX object for the pack's `task` model."""
    path = model_file(params, task)
    folder = pack_dir(params)
    if has_model_package_manifest(folder):  # the manifest carries the preprocessing
        model = get_model(str(folder), model_task=task, providers=PROVIDERS)
    else:
        model = get_model(str(path), providers=PROVIDERS)
    if model is None or model.taskname != task:
        got = None if model is None else model.taskname
        raise ValueError(f"{path}: insightface loads this as {got!r}, not as a {task} model")
    return model


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


class ScrfdDetector:
    """SCRFD faces with their 5 keypoints (already in LANDMARK_NAMES order)."""

    name = "insightface-scrfd"

    def __init__(self, params: InsightfaceParams):
        self.params = params
        self._model = load_model(params, DETECTION_TASK)
        self._input_size = (params.det_size, params.det_size)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        boxes, kpss = self._model.detect(
            _bgr(rgb), input_size=self._input_size, det_thresh=self.params.min_score
        )
        out = []
        for i, row in enumerate(boxes):
            landmarks = None if kpss is None else np.asarray(kpss[i], np.float32).reshape(5, 2)
            out.append(Detection(np.asarray(row[:4], float), float(row[4]), landmarks))
        return [d for d in out if d.score >= self.params.min_score]


class ArcFaceEmbedder:
    """ArcFace embeddings of faces aligned on their 5 landmarks (insightface's norm_crop).

    Detections without landmarks (a YOLO box-only detector) get them from dlib's 68-point
    predictor, loaded only when first needed.
    """

    name = "insightface-arcface"

    def __init__(self, params: InsightfaceParams, dlib_params: DlibParams):
        self._model = load_model(params, RECOGNITION_TASK)
        self._side = int(self._model.input_size[0])
        self._dlib_params = dlib_params
        self._dlib: Any = None
        last = self._model.output_shape[-1]
        if isinstance(last, int) and last > 0:
            self.dim = last
        else:  # a symbolic output size: ask the model
            blank = np.zeros((self._side, self._side, 3), np.uint8)
            self.dim = int(np.asarray(self._model.get_feat(blank)).size)

    def _landmarks(self, rgb: np.ndarray, det: Detection) -> np.ndarray:
        if det.landmarks is not None:
            return np.asarray(det.landmarks, np.float32).reshape(5, 2)
        if self._dlib is None:
            from facelora.prepare.faces.dlib_backend import DlibEmbedder

            self._dlib = DlibEmbedder(self._dlib_params)
        return self._dlib.landmarks(rgb, det.box)

    def describe(self, rgb: np.ndarray, detections: list[Detection]) -> list[Face]:
        bgr = _bgr(rgb)
        faces = []
        for det in detections:
            landmarks = self._landmarks(rgb, det)
            aligned = norm_crop(bgr, landmark=landmarks, image_size=self._side)
            embedding = unit(np.asarray(self._model.get_feat(aligned)))
            faces.append(Face(det.box, det.score, landmarks, embedding))
        return faces

"""Ultralytics YOLO face detector (e.g. yolov8n-face.pt): boxes, scores and, for models with
5 keypoints, the landmarks.

The weights file is never downloaded: faces.ultralytics.weights must name a file on disk.
Ultralytics reads its environment when first imported, so before that import this module
points its settings folder away from ~/.config (unless YOLO_CONFIG_DIR is already set) and
turns off everything that may reach the network: the connectivity probe, analytics and
pip auto-install of missing requirements.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from facelora.config import UltralyticsParams
from facelora.errors import ModelFileMissing
from facelora.prepare.faces.types import Detection


def _offline_environment() -> None:
    if not os.environ.get("YOLO_CONFIG_DIR"):
        folder = Path(tempfile.gettempdir()) / f"facelora-ultralytics-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
    os.environ["YOLO_OFFLINE"] = "1"  # no DNS probe at import; no analytics, no update checks
    os.environ["YOLO_AUTOINSTALL"] = "0"  # never pip-install a missing requirement
    os.environ.setdefault("YOLO_VERBOSE", "0")


_offline_environment()

from ultralytics import YOLO  # noqa: E402  (must follow the environment set-up above)
from ultralytics.utils import patches as _patches  # noqa: E402


def _restore_pil_open() -> None:
    """Importing ultralytics replaces PIL.Image.open, process-wide, with an opener that on
    any unreadable file tries to install pi-heif and then fails with ModuleNotFoundError;
    facelora records unreadable files as rejections and installs nothing, so the original
    opener is put back."""
    from PIL import Image

    original = getattr(_patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


_restore_pil_open()

FACE_CLASS = "face"


def weights_path(params: UltralyticsParams) -> Path:
    if not params.weights:
        raise ModelFileMissing(
            "faces.ultralytics.weights: not set; set it to a YOLO face-detection .pt file "
            "(e.g. yolov8n-face.pt) on disk (nothing is downloaded)"
        )
    path = Path(params.weights).expanduser()
    if not path.is_file():
        raise ModelFileMissing(
            f"faces.ultralytics.weights = {params.weights}: file not found ({path}); set it to "
            f"a YOLO face-detection .pt file on disk (nothing is downloaded)"
        )
    return path


class YoloDetector:
    """A YOLO detect or pose model run on the CPU.

    A model that knows a class named "face" reports only that class; a one-class model
    reports its class; a multi-class model without "face" (e.g. COCO yolov8n.pt) is refused,
    as its boxes are not faces. Keypoints become landmarks when there are exactly 5 per box
    (the RetinaFace order used by YOLO face models: eye on the image's left first).
    """

    name = "ultralytics-yolo"

    def __init__(self, params: UltralyticsParams):
        self.params = params
        path = weights_path(params)
        self._model = YOLO(str(path))
        names = dict(self._model.names or {})
        faces = [i for i, n in names.items() if str(n).lower() == FACE_CLASS]
        if faces:
            self._classes: list[int] | None = faces
        elif len(names) <= 1:
            self._classes = None
        else:
            shown = ", ".join(str(n) for n in list(names.values())[:8])
            raise ValueError(
                f"faces.ultralytics.weights = {params.weights}: the model's classes ({shown}, "
                f"...) include no '{FACE_CLASS}'; use a face-detection model"
            )

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # ultralytics treats arrays as OpenCV BGR
        result = self._model.predict(
            bgr, device="cpu", conf=self.params.min_score, classes=self._classes, verbose=False
        )[0]
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy().astype(float)
        scores = boxes.conf.cpu().numpy().astype(float)
        points = None
        if result.keypoints is not None:
            xy = result.keypoints.xy.cpu().numpy().astype(np.float32)
            if xy.ndim == 3 and xy.shape[1:] == (5, 2):
                points = xy
        out = []
        for i in range(len(scores)):
            landmarks = None if points is None else points[i]
            out.append(Detection(xyxy[i], float(scores[i]), landmarks))
        return [d for d in out if d.score >= self.params.min_score]

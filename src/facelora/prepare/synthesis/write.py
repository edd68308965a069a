"""Writing one synthesized pair into its kind's folder: images, caption, table rows.

Faces of the written images are described with the configured face backend at the geometry
the pair was made with (the crop's landmarks: a degraded or masked start has the same face in
the same place), so identity and skin scores compare like with like; an image a model made
is searched for its face like any photo.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facelora.config import Params
from facelora.io.atomic import atomic_path, link_or_copy, write_text
from facelora.io.tables import IMAGES
from facelora.prepare.faces.backends import FaceBackend
from facelora.prepare.faces.detect import analyse_image, face_row
from facelora.prepare.faces.types import Detection
from facelora.prepare.images import RawFile
from facelora.prepare.synthesis.made import caption_name, end_name, start_name
from facelora.prepare.synthesis.plan import Job, Source


@dataclass
class Written:
    """What one pair adds to the kind's tables (rows in the detect tables' schemas)."""

    manifest: dict
    images: list[dict]
    faces: list[dict]


def encode_png(rgb: np.ndarray, compression: int) -> bytes:
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, compression]
    )
    if not ok:
        raise OSError("could not encode a PNG")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _image_row(file: str, data: bytes, rgb: np.ndarray, n_faces: int) -> dict:
    row = dict.fromkeys(IMAGES.names)
    row.update(
        image=file,
        status="ok",
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        orientation=1,
        format="PNG",
        mode="RGB",
        n_faces=n_faces,
        n_small_faces=0,
    )
    return row


class PairWriter:
    """Writes pairs of one kind into `folder` (one per worker process)."""

    def __init__(self, folder: Path, crops_dir: Path, params: Params, backend: FaceBackend):
        self.folder, self.crops_dir = folder, crops_dir
        self.params, self.backend = params, backend
        self.images: list[dict] = []
        self.faces: list[dict] = []

    def crop_png(self, source: Source) -> Path:
        return self.crops_dir / source.crop

    def read_crop(self, source: Source) -> np.ndarray:
        data = self.crop_png(source).read_bytes()
        return decode_png(data)

    def _known(self, file: str, data: bytes, rgb: np.ndarray, source: Source) -> None:
        """An image with the source's face at the source's place: describe it there."""
        det = Detection(source.box.copy(), source.score, source.landmarks.copy())
        faces = self.backend.describe(rgb, [det])
        self.images.append(_image_row(file, data, rgb, len(faces)))
        h, w = rgb.shape[:2]
        name = self.backend.name
        self.faces.extend(face_row(file, i, f, 1.0, w, h, name) for i, f in enumerate(faces))

    def _detected(self, file: str, data: bytes) -> None:
        """An image a model made: find its faces like any photo's."""
        row, faces = analyse_image(file, RawFile(data, "", ".png"), self.params, self.backend)
        row = {**row, "sha256": hashlib.sha256(data).hexdigest()}
        self.images.append(row)
        self.faces.extend(faces)

    def made_image(self, file: str, rgb: np.ndarray, source: Source | None) -> str:
        """Write a new image; `source`: its face is where the source's was (else: detect)."""
        data = encode_png(rgb, self.params.crop.png_compression)
        write_bytes(self.folder / file, data)
        if source is not None:
            self._known(file, data, rgb, source)
        else:
            self._detected(file, data)
        return hashlib.sha256(data).hexdigest()

    def crop_image(self, file: str, source: Source) -> str:
        """Link a source crop as one of the pair's images (no copy, no re-encoding)."""
        png = self.crop_png(source)
        link_or_copy(png, self.folder / file)
        data = png.read_bytes()
        self._known(file, data, decode_png(data), source)
        return hashlib.sha256(data).hexdigest()

    def finish(self, job: Job, caption: str, provenance: dict) -> Written:
        """The caption file and the manifest row, once the images are written."""
        write_text(self.folder / caption_name(job.pair), caption + "\n")
        refs = [start_name(job.pair, n + 2) for n in range(len(job.references))]
        row = {
            "pair": job.pair,
            "kind": job.kind,
            "status": "ok",
            "reason": None,
            "start": start_name(job.pair),
            "end": end_name(job.pair),
            "references": refs,
            "caption": caption,
            "source": job.source.record(),
            "reference_sources": [r.record() for r in job.references],
            "variation": job.variation,
            "seed": job.seed,
            "instruction": job.instruction,
            "instruction_label": job.instruction_label,
            "scores": {},
            **provenance,
        }
        written = Written(row, self.images, self.faces)
        self.images, self.faces = [], []
        return written

    def failed(self, job: Job, reason: str, provenance: dict | None = None) -> Written:
        row = {
            "pair": job.pair,
            "kind": job.kind,
            "status": "failed",
            "reason": reason,
            "source": job.source.record(),
            "variation": job.variation,
            "seed": job.seed,
            "instruction": job.instruction,
            "instruction_label": job.instruction_label,
            **(provenance or {}),
        }
        self.images, self.faces = [], []
        return Written(row, [], [])

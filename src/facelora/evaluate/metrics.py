"""Metrics that judge an edited output image against its pair.

Each metric compares the generated image (`output`) with some of: the start image (`source`),
the edited image the pair asks for (`target`), a face reference (`reference`, one image or a
list) and the caption's change text (`change_text`, the instruction without the trigger word):

- identity_sim (higher is better): cosine similarity of face embeddings between the reference
  face (the source face when there is no reference) and the output's face, with one detector,
  one alignment and one embedder for both. InsightFace ArcFace when asked for (or, with
  `identity_backend: auto`, when its model pack is on disk), else dlib's 128-D ResNet, which
  ships with face-recognition-models. An output with no detectable face is a failure: NaN with
  `failed=True` and the note "no face in output", never a dropped row.
- lpips (lower is better): LPIPS distance between output and target at the analysis size. The
  backbone (torchvision's ImageNet AlexNet/VGG16/SqueezeNet1.1) is read from a local file only:
  the torch hub cache or a configured path. The hub-cache file is used only when its SHA-256
  matches the official checkpoint's (its name carries the hash prefix); a configured file is
  used as given and reported (`backbone_official`): real weights are needed for meaningful
  numbers. The linear heads ship with the `lpips` package.
- bg_ssim (higher is better; an edit that stays on the face gives ~1.0): SSIM of the grey
  output vs the grey source, both at the analysis size, averaged outside the source's face
  ellipse (facelora.prepare.pairs.quality.face_mask, dilated by bg_mask_dilation). A source
  without a face gets the SSIM of the whole image, with a note.
- clip_score (higher is better): 100 * max(cos(image embedding, text embedding), 0), the usual
  CLIP-score definition (Hessel et al. 2021 without their 2.5 rescaling), from a local CLIP
  model folder (transformers CLIPModel + CLIPProcessor, local_files_only).

Nothing here downloads: a missing model makes its metric unavailable (`available=False`,
`reason` naming the setting to fix) and its value NaN; no metric is ever computed with random
weights unless a configured file holds them, and then `describe()` says so.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pydantic import ValidationError
from skimage.metrics import structural_similarity

from facelora.config import SAME_PERSON_SIMILARITY, EvalParams, FacesParams, ImagesParams
from facelora.errors import ModelFileMissing, SettingsError
from facelora.models.perceptual import (
    BackboneUnavailable,
    find_lpips_backbone,
    load_clip,
    load_lpips,
)
from facelora.prepare.faces.backends import FaceBackend, make_backend
from facelora.prepare.faces.types import Face
from facelora.prepare.pairs.quality import face_mask

NAN = float("nan")
# the metric settings that EvalParams validates (the rest of MetricSettings is context)
EVAL_KEYS = (
    "identity_backend",
    "lpips_net",
    "lpips_backbone",
    "bg_mask_dilation",
    "clip_model",
    "analysis_size",
)
MIN_BACKGROUND_PX = 64  # fewer pixels outside the face: no background to judge


@dataclass
class MetricSettings:
    """What the metrics need; `section` is where these live in params.yaml (for messages)."""

    identity_backend: str = "auto"  # auto | insightface | dlib
    faces: FacesParams = field(default_factory=FacesParams)  # insightface root/pack, dlib files
    lpips_net: str = "alex"  # alex | vgg | squeeze
    lpips_backbone: str | None = None  # None: the torch hub cache (torch.hub.get_dir())
    bg_mask_dilation: float = 0.25  # face ellipse grown by this fraction before masking
    clip_model: str | None = None  # a local CLIP model folder; None: clip_score unavailable
    analysis_size: int = 512  # longer side of the frame LPIPS and SSIM are computed at
    device: str = "cpu"  # LPIPS and CLIP: cpu | cuda | auto (cuda when available)
    section: str = "metrics"

    def __post_init__(self) -> None:
        # the settings schema's own checks (EvalParams), reported under this section's keys
        values = {name: getattr(self, name) for name in EVAL_KEYS}
        try:
            EvalParams(**values)
        except ValidationError as exc:
            problems = [f"{self.key(str(e['loc'][0]))}: {e['msg']}" for e in exc.errors()]
            raise SettingsError("; ".join(problems)) from None

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    @property
    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class MetricResult:
    value: float
    note: str | None = None
    failed: bool = False  # the output failed this metric (e.g. no face in it): count it


ImageLike = np.ndarray | Image.Image | str | Path


def to_rgb(image: ImageLike) -> np.ndarray:
    """H x W x 3 uint8 RGB from an array, a PIL image or a file (decoded upright, EXIF)."""
    if isinstance(image, str | Path):
        from facelora.prepare.images import read_image

        return read_image(image, ImagesParams()).rgb
    if isinstance(image, Image.Image):
        from facelora.prepare.images import to_rgb8

        return np.ascontiguousarray(to_rgb8(image, ImagesParams().alpha_background)[0])
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 RGB arrays, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"images must be H x W x 3 RGB arrays, got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3])


def analysis_frame(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """(width, height) with the longer side `side` and the aspect of `shape`."""
    h, w = shape[:2]
    scale = side / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    shrink = size[0] * size[1] < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _aspect_note(a: np.ndarray, b: np.ndarray, what: str) -> str | None:
    ra, rb = a.shape[1] / a.shape[0], b.shape[1] / b.shape[0]
    if abs(math.log(ra / rb)) > 0.01:
        return f"{what} aspect differs ({a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]})"
    return None


def _join(notes: Sequence[str | None]) -> str | None:
    kept = [n for n in notes if n]
    return "; ".join(kept) or None


class Metric:
    """Base: `available`, `reason` (why not), `backend` (what computes it), a value per call."""

    name = ""
    higher_is_better = True
    available = False
    reason: str | None = None
    backend = "unavailable"

    def __call__(
        self,
        output: ImageLike,
        source: ImageLike | None = None,
        target: ImageLike | None = None,
        reference: ImageLike | Sequence[ImageLike] | None = None,
        change_text: str | None = None,
    ) -> MetricResult:
        if not self.available:
            return MetricResult(NAN)
        return self.compute(output, source, target, reference, change_text)

    def compute(self, output, source, target, reference, change_text) -> MetricResult:
        raise NotImplementedError

    def _unavailable(self, reason: str) -> None:
        self.available, self.reason, self.backend = False, reason, "unavailable"

    def extras(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "backend": self.backend,
            "reason": self.reason,
            "higher_is_better": self.higher_is_better,
            **self.extras(),
        }


# --- faces --------------------------------------------------------------------------------


class FaceFinder:
    """The largest confident face of an image, found, aligned and embedded by one backend.

    Detection runs on a copy at most faces.max_side pixels (as in the detect step); box and
    landmarks are mapped back to full resolution. Recent results are kept per image content,
    so the source image seen by two metrics is analysed once.
    """

    CACHE_SIZE = 8

    def __init__(self, backend: FaceBackend, faces: FacesParams, kind: str):
        self.backend = backend
        self.faces = faces
        self.kind = kind  # dlib | insightface
        self._seen: OrderedDict[tuple, tuple[Face | None, int]] = OrderedDict()

    @property
    def name(self) -> str:
        return self.backend.embedder.name

    def largest(self, rgb: np.ndarray) -> tuple[Face | None, int]:
        """(the largest face or None, how many confident faces were found)."""
        key = (rgb.shape, hashlib.sha1(np.ascontiguousarray(rgb).data).hexdigest())
        if key in self._seen:
            self._seen.move_to_end(key)
            return self._seen[key]
        result = self._find(rgb)
        self._seen[key] = result
        if len(self._seen) > self.CACHE_SIZE:
            self._seen.popitem(last=False)
        return result

    def _find(self, rgb: np.ndarray) -> tuple[Face | None, int]:
        small = rgb
        if max(rgb.shape[:2]) > self.faces.max_side:
            small = resize(rgb, analysis_frame(rgb.shape, self.faces.max_side))
        scale = np.array([small.shape[1] / rgb.shape[1], small.shape[0] / rgb.shape[0]])
        found = [d for d in self.backend.detect(small) if d.score >= self.backend.min_score]
        if not found:
            return None, 0
        best = min(found, key=lambda d: (-round(d.area, 3), float(d.box[0]), float(d.box[1])))
        face = self.backend.describe(small, [best])[0]
        full = Face(
            np.asarray(face.box, np.float64) / np.tile(scale, 2),
            face.score,
            np.asarray(face.landmarks, np.float64) / scale,
            face.embedding,
        )
        return full, len(found)


def load_face_finder(settings: MetricSettings) -> tuple[FaceFinder | None, str | None, list[str]]:
    """(finder or None, why none, notes) for settings.identity_backend; never downloads."""
    notes: list[str] = []
    choice = settings.identity_backend
    faces = settings.faces
    if choice in ("auto", "insightface"):
        try:
            backend = make_backend(faces.model_copy(update={"backend": "insightface"}))
        except (ModelFileMissing, ImportError, ValueError) as exc:
            if choice == "insightface":
                return None, f"{settings.key('identity_backend')} = insightface: {exc}", notes
            notes.append(f"insightface not used ({exc})")
        else:
            return FaceFinder(backend, faces, "insightface"), None, notes
    try:
        backend = make_backend(faces.model_copy(update={"backend": "dlib"}))
    except (ModelFileMissing, ImportError, RuntimeError) as exc:
        return None, f"{settings.key('identity_backend')} = {choice}: dlib failed: {exc}", notes
    return FaceFinder(backend, faces, "dlib"), None, notes


class IdentitySimilarity(Metric):
    name = "identity_sim"

    def __init__(self, settings: MetricSettings, finder: FaceFinder | None = None):
        self.settings = settings
        self.notes: list[str] = []
        if finder is None:
            finder, reason, self.notes = load_face_finder(settings)
            if finder is None:
                self._unavailable(reason or "no face backend")
        self.finder = finder
        if finder is not None:
            self.available, self.reason, self.backend = True, None, finder.name
        configured = settings.faces.same_person_similarity
        self.threshold = (
            NAN
            if finder is None
            else configured
            if configured is not None
            else SAME_PERSON_SIMILARITY[finder.kind]
        )

    def extras(self) -> dict[str, Any]:
        return {"same_person_threshold": self.threshold, "notes": _join(self.notes)}

    def compute(self, output, source, target, reference, change_text) -> MetricResult:
        assert self.finder is not None
        refs, role = _references(reference, source)
        out_face, n_out = self.finder.largest(to_rgb(output))
        notes = []
        if out_face is None:
            return MetricResult(NAN, "no face in output", failed=True)
        if n_out > 1:
            notes.append(f"{n_out} faces in output: the largest compared")
        if not refs:
            return MetricResult(NAN, _join([*notes, "no reference or source image"]))
        sims = []
        for ref in refs:
            face, _ = self.finder.largest(to_rgb(ref))
            if face is not None:
                sims.append(float(np.dot(face.embedding, out_face.embedding)))
        if not sims:
            return MetricResult(NAN, _join([*notes, f"no face in {role}"]))
        if len(sims) < len(refs):
            notes.append(f"{len(refs) - len(sims)} of {len(refs)} {role} images without a face")
        return MetricResult(float(np.mean(sims)), _join(notes))


def _references(reference, source) -> tuple[list, str]:
    if reference is None or (isinstance(reference, list | tuple) and not reference):
        return ([] if source is None else [source]), "source"
    if isinstance(reference, list | tuple):
        return list(reference), "reference"
    return [reference], "reference"


# --- background SSIM ----------------------------------------------------------------------


def ssim_map(grey_a: np.ndarray, grey_b: np.ndarray) -> np.ndarray:
    """skimage's SSIM map with the settings of pairs.quality (7x7, data range 255)."""
    return structural_similarity(grey_a, grey_b, data_range=255, full=True, win_size=7)[1]


class BackgroundSSIM(Metric):
    name = "bg_ssim"

    def __init__(self, settings: MetricSettings, finder: FaceFinder | None = None):
        self.settings = settings
        if finder is None:  # any detector with landmarks will do: dlib always works offline
            finder, reason, _ = load_face_finder(replace(settings, identity_backend="dlib"))
            if finder is None:
                self._unavailable(reason or "no face detector")
                return
        self.finder = finder
        self.available = True
        self.backend = f"skimage-ssim outside {finder.backend.name} face mask"

    def extras(self) -> dict[str, Any]:
        return {
            "mask_dilation": self.settings.bg_mask_dilation,
            "analysis_size": self.settings.analysis_size,
        }

    def compute(self, output, source, target, reference, change_text) -> MetricResult:
        if source is None:
            return MetricResult(NAN, "no source image")
        src, out = to_rgb(source), to_rgb(output)
        size = analysis_frame(src.shape, self.settings.analysis_size)
        grey_src = cv2.cvtColor(resize(src, size), cv2.COLOR_RGB2GRAY)
        grey_out = cv2.cvtColor(resize(out, size), cv2.COLOR_RGB2GRAY)
        notes = [_aspect_note(out, src, "output/source")]
        smap = ssim_map(grey_src, grey_out)
        face, n_faces = self.finder.largest(src)
        if face is None:
            notes.append("no face in source: SSIM over the whole image")
            return MetricResult(float(smap.mean()), _join(notes))
        if n_faces > 1:
            notes.append(f"{n_faces} faces in source: only the largest masked")
        landmarks = face.landmarks * np.array([size[0] / src.shape[1], size[1] / src.shape[0]])
        outside = ~face_mask((size[1], size[0]), landmarks, self.settings.bg_mask_dilation)
        if outside.sum() < MIN_BACKGROUND_PX:
            notes.append("the face mask covers the whole image: no background to compare")
            return MetricResult(NAN, _join(notes))
        return MetricResult(float(smap[outside].mean()), _join(notes))


# --- LPIPS --------------------------------------------------------------------------------


class LPIPSDistance(Metric):
    name = "lpips"
    higher_is_better = False

    def __init__(self, settings: MetricSettings):
        self.settings = settings
        self.backbone_file: Path | None = None
        self.backbone_sha256: str | None = None
        self.backbone_official: bool | None = None
        setting = settings.key("lpips_backbone")
        net = settings.lpips_net
        configured = settings.lpips_backbone
        try:
            found = find_lpips_backbone(net, configured, setting, settings.key("lpips_net"))
        except BackboneUnavailable as exc:
            self._unavailable(str(exc))
            return
        path, sha, is_official = found.path, found.sha256, found.official
        try:
            self.model = load_lpips(net, path).to(settings.torch_device)
        except BackboneUnavailable as exc:
            where = f"{setting} = {configured}" if configured else f"{setting} (default)"
            self._unavailable(f"{where}: {exc}")
            return
        self.backbone_file, self.backbone_sha256 = path, sha
        self.backbone_official = is_official
        self.available = True
        self.backend = f"lpips-{net} (backbone {path}"
        self.backend += ")" if is_official else ", NOT the official torchvision weights)"

    def extras(self) -> dict[str, Any]:
        return {
            "net": self.settings.lpips_net,
            "backbone_file": None if self.backbone_file is None else str(self.backbone_file),
            "backbone_sha256": self.backbone_sha256,
            "backbone_official": self.backbone_official,
            "analysis_size": self.settings.analysis_size,
        }

    def compute(self, output, source, target, reference, change_text) -> MetricResult:
        import torch

        if target is None:
            return MetricResult(NAN, "no target image")
        tgt, out = to_rgb(target), to_rgb(output)
        size = analysis_frame(tgt.shape, self.settings.analysis_size)
        note = _aspect_note(out, tgt, "output/target")
        device = self.settings.torch_device

        def tensor(rgb: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(resize(rgb, size)).permute(2, 0, 1)[None].float()
            return (t / 127.5 - 1.0).to(device)

        with torch.inference_mode():
            value = float(self.model(tensor(out), tensor(tgt)).reshape(-1)[0])
        return MetricResult(value, note)


# --- CLIP score ---------------------------------------------------------------------------


class CLIPScore(Metric):
    name = "clip_score"

    def __init__(self, settings: MetricSettings):
        self.settings = settings
        setting = settings.key("clip_model")
        self.path: Path | None = None
        try:
            model, processor = load_clip(settings.clip_model, setting)
        except BackboneUnavailable as exc:
            self._unavailable(str(exc))
            return
        path = Path(settings.clip_model).expanduser()
        self.model = model.eval().requires_grad_(False).to(settings.torch_device)
        self.processor = processor
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.path = path
        self.available = True
        self.backend = f"clip ({path})"

    def extras(self) -> dict[str, Any]:
        return {
            "model": None if self.path is None else str(self.path),
            "definition": "100 * max(cos(image_embedding, text_embedding), 0)",
        }

    def compute(self, output, source, target, reference, change_text) -> MetricResult:
        import torch

        if not change_text or not change_text.strip():
            return MetricResult(NAN, "no change text")
        inputs = self.processor(
            text=[change_text.strip()],
            images=[to_rgb(output)],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        ).to(self.settings.torch_device)
        with torch.inference_mode():
            out = self.model(**inputs)
            image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            cos = float((image * text).sum())
        return MetricResult(100.0 * max(cos, 0.0))


# --- the suite ----------------------------------------------------------------------------


class MetricSuite:
    """All metrics, their models loaded once; one dict of values per evaluated image."""

    def __init__(self, settings: MetricSettings | None = None):
        self.settings = settings or MetricSettings()
        identity = IdentitySimilarity(self.settings)
        background = BackgroundSSIM(self.settings, identity.finder)
        self.metrics: dict[str, Metric] = {
            "identity_sim": identity,
            "lpips": LPIPSDistance(self.settings),
            "bg_ssim": background,
            "clip_score": CLIPScore(self.settings),
        }

    def evaluate_detailed(
        self,
        output: ImageLike,
        source: ImageLike | None = None,
        target: ImageLike | None = None,
        reference: ImageLike | Sequence[ImageLike] | None = None,
        change_text: str | None = None,
    ) -> dict[str, MetricResult]:
        out = to_rgb(output)  # each image decoded once for all metrics
        src = None if source is None else to_rgb(source)
        tgt = None if target is None else to_rgb(target)
        if isinstance(reference, list | tuple):
            ref: Any = [to_rgb(r) for r in reference]
        else:
            ref = None if reference is None else to_rgb(reference)
        return {
            name: metric(out, src, tgt, ref, change_text) for name, metric in self.metrics.items()
        }

    def evaluate(
        self,
        output: ImageLike,
        source: ImageLike | None = None,
        target: ImageLike | None = None,
        reference: ImageLike | Sequence[ImageLike] | None = None,
        change_text: str | None = None,
    ) -> dict[str, Any]:
        """{metric: value (NaN when unavailable or failed), failures, notes}."""
        results = self.evaluate_detailed(output, source, target, reference, change_text)
        row: dict[str, Any] = {name: r.value for name, r in results.items()}
        row["failures"] = _join([f"{n}: {r.note}" for n, r in results.items() if r.failed])
        row["notes"] = _join(
            [f"{n}: {r.note}" for n, r in results.items() if r.note and not r.failed]
        )
        return row

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: metric.describe() for name, metric in self.metrics.items()}

    def backend_columns(self) -> dict[str, str]:
        """{metric_backend: what computed it, or 'unavailable'} for a flat table row."""
        return {f"{name}_backend": m.backend for name, m in self.metrics.items()}


def settings_from_params(params) -> MetricSettings:
    """The metric settings of params.yaml's `eval` section (with the face settings)."""
    e = params.eval
    return MetricSettings(
        identity_backend=e.identity_backend,
        faces=params.faces,
        lpips_net=e.lpips_net,
        lpips_backbone=e.lpips_backbone,
        bg_mask_dilation=e.bg_mask_dilation,
        clip_model=e.clip_model,
        analysis_size=e.analysis_size,
        device=params.model.device,
        section="eval",
    )

"""`facelora apply`: edit the faces of photos with a trained LoRA, pasted back in place.

For each photo: decode it upright (EXIF), find the faces (faces.*), cut each with training's
crop geometry (crop.*), edit the crop with the pipeline + LoRA (eval.resolution, eval.steps,
eval.guidance; model.*), paste the edit back through the inverse of the crop's map with a
feathered mask and a colour match at the seam, and write the photo (PNG: outside the pasted
squares it is the upright input, pixel for pixel) and a before/after sheet. Photos without a
usable face are reported in report.json with the reason (and copied through, upright).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from facelora.apply import lora as lora_choice
from facelora.apply.paste import paste, sheet
from facelora.config import Params
from facelora.errors import MissingInput, SettingsError
from facelora.io.atomic import write_json, write_png
from facelora.io.progress import progress
from facelora.models.adapters import bucket_size, resolve_device
from facelora.prepare.faces.align import CropRejected, output_side, plan_crop, warp_crop
from facelora.prepare.faces.backends import FaceBackend, make_backend
from facelora.prepare.faces.detect import largest_first
from facelora.prepare.images import ImageRejected, decode_image, read_file, relative_name

log = logging.getLogger(__name__)
REPORT = "report.json"
SHEETS = "sheets"


@dataclass
class ApplyOptions:
    prompt: str
    scale: float | None = None  # None: the final model card's, else eval.lora_scale
    faces: str = "all"  # all | largest | an index (0: the largest face)
    seed: int | None = None  # None: params seed
    format: str = "png"  # png | same (re-encode as the input's format: not exact)
    skip_unedited: bool = False


@dataclass
class PhotoResult:
    photo: str
    status: str  # edited | unedited | rejected
    output: str | None = None
    sheet: str | None = None
    faces: list[dict] = field(default_factory=list)
    reason: str | None = None


def list_photos(photos: Path, params: Params) -> list[tuple[str, Path]]:
    photos = Path(photos)
    if photos.is_file():
        return [(photos.name, photos)]
    if not photos.is_dir():
        raise MissingInput(f"{photos}: no such photo or folder")
    exts = set(params.images.extensions)
    found = sorted(p for p in photos.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    return [(relative_name(p, photos), p) for p in found]


def output_stems(items: list[tuple[str, Path]]) -> dict[str, str]:
    """Each photo's output name without the suffix: its own name without its suffix, or with
    it (a.jpg -> a.jpg.png) where two photos would otherwise write the same file."""
    stems = [str(Path(rel).with_suffix("")) for rel, _ in items]
    return {
        rel: stem if stems.count(stem) == 1 else rel
        for (rel, _), stem in zip(items, stems, strict=True)
    }


def find_faces(rgb_full: np.ndarray, raw, params: Params, backend: FaceBackend) -> list:
    """Landmarks (full-resolution pixels) of the usable faces, the largest first."""
    small = decode_image(raw, params.images, max_side=params.faces.max_side)
    to_full = 1.0 / small.scale
    found = [d for d in backend.detect(small.rgb) if d.score >= backend.min_score]
    kept = [d for d in found if d.side * to_full >= params.faces.min_face_px]
    faces = backend.describe(small.rgb, largest_first(kept))
    return [f.landmarks.astype(np.float64) * to_full for f in faces]


def chosen(n: int, which: str) -> list[int]:
    if which == "all":
        return list(range(n))
    if which == "largest":
        return [0] if n else []
    index = int(which)
    return [index] if index < n else []


def parse_faces(which: str) -> str:
    if which in ("all", "largest") or (which.isdigit()):
        return which
    raise SettingsError(f"--faces {which}: give all, largest or a face index (0 = largest)")


class Applier:
    """One pipeline (and one face backend) for every photo."""

    def __init__(self, params: Params, lora: str | Path, scale: float | None = None):
        from facelora.models import lora_io
        from facelora.models.inference import apply_lora, load_pipeline

        self.params = params
        model = params.model
        self.choice = lora_choice.resolve(lora)
        lora_choice.check_family(self.choice, model.family)
        tensors, _ = lora_io.read_lora(self.choice.file)
        device = resolve_device(model.device)
        self.pipe = load_pipeline(model.family, model.path, model.dtype, device, model.quantize)
        lora_io.check_compatible(tensors, self.pipe.transformer, str(self.choice.file))
        if scale is None:
            scale = self.choice.scale if self.choice.scale is not None else params.eval.lora_scale
        self.scale = float(scale)
        apply_lora(self.pipe, self.choice.file, self.scale)
        self.backend = make_backend(params.faces)

    def edit(self, crop: np.ndarray, prompt: str, seed: int) -> np.ndarray:
        from facelora.models.inference import generate

        e = self.params.eval
        side = crop.shape[0]
        width, height = bucket_size(side, side, e.resolution)
        array = generate(
            self.pipe,
            Image.fromarray(crop),
            [],
            prompt,
            width=width,
            height=height,
            steps=e.steps,
            seed=seed,
            guidance=e.guidance,
            output_type="np",
        )
        array = np.asarray(array, dtype=np.float32).reshape(height, width, -1)
        if not np.isfinite(array).all():
            raise ValueError("the generated image has NaN/inf values")
        return np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)

    def apply_one(
        self,
        rel: str,
        path: Path,
        out: Path,
        options: ApplyOptions,
        seed: int,
        stem: str | None = None,
    ) -> PhotoResult:
        """Edit one photo into `out` as STEM.png (default: its name without the suffix)."""
        params = self.params
        try:
            raw = read_file(path, params.images)
            loaded = decode_image(raw, params.images)
        except ImageRejected as exc:
            return PhotoResult(rel, "rejected", reason=exc.reason)
        photo = loaded.rgb
        h, w = photo.shape[:2]
        landmarks = find_faces(photo, raw, params, self.backend)
        result = PhotoResult(rel, "unedited")
        reasons = []
        if not landmarks:
            reasons.append("no face found")
        picked = chosen(len(landmarks), options.faces)
        if landmarks and not picked:
            reasons.append(f"--faces {options.faces}: only {len(landmarks)} face(s) found")
        edited = photo
        for n, index in enumerate(picked):
            face = {"face_index": index}
            try:
                box, notes = plan_crop(landmarks[index], w, h, params.crop)
            except CropRejected as exc:
                face.update(status="skipped", reason=exc.reason)
                result.faces.append(face)
                reasons.append(f"face {index}: {exc.reason}")
                continue
            side = output_side(box.side, params.crop)
            crop = warp_crop(photo, box, side)
            try:
                new = self.edit(crop, options.prompt, seed + n)
            except ValueError as exc:
                face.update(status="failed", reason=str(exc))
                result.faces.append(face)
                reasons.append(f"face {index}: {exc}")
                continue
            edited = paste(edited, new, crop, box)
            face.update(
                status="edited",
                box={"cx": box.cx, "cy": box.cy, "side": box.side, "angle": box.angle},
                crop_side=side,
                notes=notes,
            )
            result.faces.append(face)
        if any(f.get("status") == "edited" for f in result.faces):
            result.status = "edited"
        if reasons:
            result.reason = "; ".join(reasons)
        if result.status != "edited" and options.skip_unedited:
            return result
        stem = stem or str(Path(rel).with_suffix(""))
        target = out / f"{stem}.png"
        if options.format == "same" and loaded.info.format in ("JPEG", "WEBP"):
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(edited).save(target, format=loaded.info.format, quality=95)
        else:
            write_png(target, edited)
        result.output = str(target.relative_to(out))
        if result.status == "edited":
            sheet_path = out / SHEETS / f"{stem}.png"
            write_png(sheet_path, sheet(photo, edited))
            result.sheet = str(sheet_path.relative_to(out))
        return result


def apply_photos(
    params: Params,
    photos: str | Path,
    lora: str | Path,
    out: str | Path,
    options: ApplyOptions,
    applier: Applier | None = None,
) -> dict:
    """Edit every photo of `photos` (a file or a folder) into `out`; returns the report."""
    if options.format not in ("png", "same"):
        raise SettingsError(f"--format {options.format}: give png or same")
    parse_faces(options.faces)
    out = Path(out)
    items = list_photos(Path(photos), params)
    applier = applier or Applier(params, lora, options.scale)
    seed = options.seed if options.seed is not None else params.seed
    stems = output_stems(items)
    results = []
    for i, (rel, path) in enumerate(progress(items, desc="apply", unit="photo")):
        # each photo's seeds depend only on its position, one per face
        results.append(applier.apply_one(rel, path, out, options, seed + 1000 * i, stems[rel]))
    report = {
        "lora": str(applier.choice.file),
        "family": params.model.family,
        "scale": applier.scale,
        "prompt": options.prompt,
        "seed": seed,
        "photos": [vars(r) for r in results],
        "counts": {
            s: sum(r.status == s for r in results) for s in ("edited", "unedited", "rejected")
        },
    }
    write_json(out / REPORT, report, sort_keys=False)
    return report

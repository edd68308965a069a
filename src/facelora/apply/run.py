"""`facelora apply`: edit the faces of photos with a trained LoRA, pasted back in place.

For each photo: decode it upright (EXIF), find the faces (faces.*), cut each with training's
crop geometry (crop.*), edit the crop with the pipeline + LoRA (eval.resolution, eval.steps,
eval.guidance; model.*), paste the edit back through the inverse of the crop's map with a
feathered mask and a colour match at the seam, and write the photo (PNG: outside the pasted
squares it is the upright input, pixel for pixel) and a before/after sheet. Photos without a
usable face are reported in report.json with the reason (and copied through, upright).
Settings: apply.* (flags override them); reference images (swap LoRAs) follow each crop.
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
from facelora.io.atomic import atomic_path, write_json, write_png
from facelora.io.progress import progress
from facelora.models.adapters import bucket_size, resolve_device
from facelora.prepare.faces.align import CropRejected, output_side, plan_crop, warp_crop
from facelora.prepare.faces.backends import FaceBackend, make_backend
from facelora.prepare.faces.detect import largest_first
from facelora.prepare.images import ImageRejected, decode_image, read_file, relative_name
from facelora.registry.families import family as get_family

log = logging.getLogger(__name__)
REPORT = "report.json"
SHEETS = "sheets"


@dataclass
class ApplyOptions:
    prompt: str
    scale: float | None = None  # None: the final model card's, else eval.lora_scale
    faces: str = "all"  # all | largest | an index (0: the largest face)
    seed: int | None = None  # None: params seed
    format: str = "png"  # png | same (each photo in its input's format)
    skip_unedited: bool = False
    jpeg: str = "lossless"  # JPEG inputs with format same: lossless (PNG) | reencode (JPEG)
    jpeg_quality: int = 95
    references: list[Path] = field(default_factory=list)  # after each crop, in order


def resolve_prompt(prompt: str | None, params: Params) -> str:
    """--prompt, else apply.prompt; neither: refused (there is no default edit)."""
    prompt = params.apply.prompt if prompt is None else prompt
    if not prompt.strip():
        trigger = params.captions.trigger
        raise SettingsError(
            f'no prompt: pass --prompt "{trigger} <the edit>" or set apply.prompt in '
            f'params.yaml (e.g. apply.prompt: "{trigger} add round glasses")'
        )
    return prompt


def options_from(params: Params, **flags) -> ApplyOptions:
    """The options: each flag given (not None), else its apply.* setting."""
    a = params.apply
    settings = {
        "faces": a.faces,
        "seed": a.seed,
        "format": a.format,
        "skip_unedited": a.skip_unedited,
        "jpeg": a.jpeg,
        "jpeg_quality": a.jpeg_quality,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    prompt = resolve_prompt(given.pop("prompt", None), params)
    return ApplyOptions(prompt=prompt, **{**settings, **given})


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
    exts = set(params.images.extensions)
    kinds = ", ".join(sorted(exts))
    if not photos.is_dir():
        raise MissingInput(
            f"{photos}: no such photo or folder: put the photos to edit ({kinds}) in {photos} "
            "(apply.photos) or name them on the command line"
        )
    found = sorted(p for p in photos.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not found:
        raise MissingInput(
            f"{photos}: no photos ({kinds}, images.extensions): put the photos to edit there"
        )
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

    def reference(self, path: Path) -> Image.Image:
        """A reference image, upright: its largest face cut like the photos' faces (crop.*),
        or the whole image scaled to at most crop.output_side when no face is found."""
        params = self.params
        try:
            raw = read_file(path, params.images)
            rgb = decode_image(raw, params.images).rgb
        except ImageRejected as exc:
            raise MissingInput(f"--reference {path}: {exc.reason}") from None
        h, w = rgb.shape[:2]
        for landmarks in find_faces(rgb, raw, params, self.backend)[:1]:
            try:
                box, _ = plan_crop(landmarks, w, h, params.crop)
            except CropRejected:
                break
            return Image.fromarray(warp_crop(rgb, box, output_side(box.side, params.crop)))
        whole = Image.fromarray(rgb)
        whole.thumbnail((params.crop.output_side, params.crop.output_side), Image.LANCZOS)
        return whole

    def edit(
        self,
        crop: np.ndarray,
        prompt: str,
        seed: int,
        references: list[Image.Image] | None = None,
    ) -> np.ndarray:
        from facelora.models.inference import generate

        e = self.params.eval
        side = crop.shape[0]
        width, height = bucket_size(side, side, e.resolution)
        array = generate(
            self.pipe,
            Image.fromarray(crop),
            references or [],
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
        references: list[Image.Image] | None = None,
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
                new = self.edit(crop, options.prompt, seed + n, references)
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
        target = write_photo(out, rel, stem, edited, loaded.info.format, options)
        result.output = str(target.relative_to(out))
        if result.status == "edited":
            sheet_path = out / SHEETS / f"{stem}.png"
            write_png(sheet_path, sheet(photo, edited))
            result.sheet = str(sheet_path.relative_to(out))
        return result


def write_photo(
    out: Path, rel: str, stem: str, rgb: np.ndarray, fmt: str | None, options: ApplyOptions
) -> Path:
    """OUT/STEM.png, or with --format same OUT/REL in the input's format: WebP lossless,
    JPEG as PNG (apply.jpeg: lossless) or re-encoded (reencode, apply.jpeg_quality)."""
    same = options.format == "same"
    if same and (fmt == "WEBP" or (fmt == "JPEG" and options.jpeg == "reencode")):
        target = out / rel
        with atomic_path(target) as tmp:
            if fmt == "WEBP":
                Image.fromarray(rgb).save(tmp, format="WEBP", lossless=True)
            else:  # upright pixels: no EXIF orientation is written
                Image.fromarray(rgb).save(
                    tmp, format="JPEG", quality=options.jpeg_quality, subsampling=0
                )
        return target
    target = out / f"{stem}.png"
    write_png(target, rgb)
    return target


def check_references(params: Params, references: list[Path]) -> None:
    most = get_family(params.model.family).max_references
    if len(references) > most:
        raise SettingsError(
            f"--reference: {len(references)} images, but {params.model.family} takes at most "
            f"{most} besides the face crop: pass fewer"
        )
    for path in references:
        if not Path(path).is_file():
            raise MissingInput(f"--reference {path}: no such file")


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
    check_references(params, options.references)
    out = Path(out)
    items = list_photos(Path(photos), params)
    applier = applier or Applier(params, lora, options.scale)
    trigger = applier.choice.trigger
    if trigger and options.prompt.split()[:1] != [trigger]:
        log.warning("the prompt does not start with the LoRA's trigger word %s", trigger)
    references = [applier.reference(Path(p)) for p in options.references]
    seed = options.seed if options.seed is not None else params.seed
    stems = output_stems(items)
    results = []
    for i, (rel, path) in enumerate(progress(items, desc="apply", unit="photo")):
        # each photo's seeds depend only on its position, one per face
        results.append(
            applier.apply_one(rel, path, out, options, seed + 1000 * i, stems[rel], references)
        )
    report = {
        "lora": str(applier.choice.file),
        "family": params.model.family,
        "scale": applier.scale,
        "prompt": options.prompt,
        "references": [str(p) for p in options.references],
        "seed": seed,
        "photos": [vars(r) for r in results],
        "counts": {
            s: sum(r.status == s for r in results) for s in ("edited", "unedited", "rejected")
        },
    }
    write_json(out / REPORT, report, sort_keys=False)
    return report

"""Finding and decoding input photos safely.

Every file either loads as an upright RGB uint8 array or raises `ImageRejected` with a reason a
person can act on. Bad files never crash a run: zero-byte, truncated, corrupt, non-images with
image extensions, decompression bombs (refused from the header, before decoding), CMYK,
16-bit, greyscale, palette and alpha images, and EXIF-rotated photos.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from facelora.config import ImagesParams
from facelora.errors import MissingInput

# We check pixel counts ourselves (images.max_pixels) before decoding, with a clearer message.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}
# Files of these kinds are images we do not read: they are recorded, never silently skipped.
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
    ".avif",
    ".jfif",
    ".jp2",
    ".ico",
    ".psd",
    ".cr2",
    ".nef",
    ".dng",
    ".arw",
}

# EXIF orientation tag value -> the PIL transpose that makes the photo upright
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_ORIENTATION_TAG = 0x0112


class ImageRejected(Exception):
    """A file that yields no usable image; `reason` is what goes into the rejects table."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ImageInfo:
    sha256: str
    bytes: int
    width: int  # of the upright (orientation-corrected) full-resolution image
    height: int
    orientation: int
    mode: str
    format: str
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedImage:
    info: ImageInfo
    rgb: np.ndarray  # H x W x 3 uint8, upright; possibly a reduced copy of the full image
    scale: float  # size of `rgb` / full resolution (1.0 = full resolution)


def relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def walk_files(root: str | Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative name, entry) of every file under root, following links, hidden folders
    (.git, .dvc, ...) skipped: each folder's files in name order, then its subfolders in
    name order (os.walk's order, without building a Path per file)."""
    stack = [("", os.fspath(root))]
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable folder: os.walk skips it too
        subfolders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.name.startswith("."):
                    subfolders.append((prefix + entry.name + "/", entry.path))
            else:
                yield prefix + entry.name, entry
        stack.extend(reversed(subfolders))


def printable(rel: str) -> str:
    """A file name that is not valid UTF-8, with its odd bytes written as \\xNN."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def require_folder(root: str | Path) -> None:
    if not Path(root).is_dir():
        raise MissingInput(f"images folder not found: {root} (paths.raw in params.yaml)")


def image_reason(rel: str, accepted: set[str]) -> tuple[str, str | None] | None:
    """(shown name, reason) for an image-like file name (None: not an image, e.g. a caption).
    The reason is None for files to decode, or why the file is refused without reading it."""
    ext = os.path.splitext(rel)[1].lower()
    if ext not in accepted and ext not in UNSUPPORTED_IMAGE_EXTENSIONS:
        return None  # captions, manifests and other sidecar files
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return printable(rel), "file name is not valid UTF-8: rename the file"
    if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
        supported = ", ".join(sorted(accepted))
        return rel, f"unsupported file type {ext} (supported: {supported})"
    return rel, None


def scan_images(root: str | Path, params: ImagesParams) -> Iterator[tuple[str, Path, str | None]]:
    """Yield (relative name, path, reason) for every image-like file under root, sorted.

    `reason` is None for files to decode, or why the file is refused without reading it.
    Hidden folders (.git, .dvc, ...) are not searched.
    """
    require_folder(root)
    accepted = set(params.extensions)
    for rel, entry in walk_files(root):
        found = image_reason(rel, accepted)
        if found is not None:
            yield found[0], Path(entry.path), found[1]


@dataclass
class RawFile:
    data: bytes
    sha256: str
    suffix: str


def read_file(path: str | Path, params: ImagesParams) -> RawFile:
    """The file's bytes and their SHA-256, after the size checks."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageRejected(f"cannot read file: {exc.strerror}") from None
    if size == 0:
        raise ImageRejected("empty file (0 bytes)")
    if size > params.max_file_mb * 1024 * 1024:
        raise ImageRejected(
            f"file too large: {size / 2**20:.0f} MB > images.max_file_mb {params.max_file_mb}"
        )
    data = path.read_bytes()
    return RawFile(data, hashlib.sha256(data).hexdigest(), path.suffix)


def read_image(
    path: str | Path,
    params: ImagesParams,
    max_side: int | None = None,
    min_scale: float = 1.0,
) -> LoadedImage:
    """Decode a photo upright as RGB uint8 (see decode_image)."""
    return decode_image(read_file(path, params), params, max_side, min_scale)


def decode_image(
    raw: RawFile,
    params: ImagesParams,
    max_side: int | None = None,
    min_scale: float = 1.0,
) -> LoadedImage:
    """Decode a photo upright as RGB uint8.

    max_side: return a copy whose longer side is at most this (JPEGs decode directly at a
    reduced scale, which is much faster). min_scale: allow JPEG reduced decoding down to this
    fraction of full resolution (used when the caller needs less than full resolution).
    """
    data, digest, size = raw.data, raw.sha256, len(raw.data)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not a readable image (unknown format, or not an image)") from None
    except Exception as exc:  # PIL raises many types for broken headers
        raise ImageRejected(f"not a readable image ({_describe(exc)})") from None
    if im.format not in ACCEPTED_FORMATS:
        raise ImageRejected(
            f"unsupported image format {im.format} inside {raw.suffix or 'a file'} "
            f"(supported: JPEG, PNG, WebP)"
        )
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageRejected(f"invalid image size {w}x{h}")
    if w * h > params.max_pixels:
        raise ImageRejected(
            f"too many pixels: {w}x{h} = {w * h / 1e6:.0f} MP > images.max_pixels "
            f"{params.max_pixels / 1e6:.0f} MP (refused before decoding)"
        )
    is_jpeg = im.format in ("JPEG", "MPO")
    if not is_jpeg:  # PNG/WebP may keep EXIF after the pixels: reading it decodes them
        _load(im)
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:
        orientation = 1  # unreadable EXIF: keep the stored orientation
    if orientation not in _ORIENTATION_FIX:
        orientation = 1
    info = ImageInfo(
        sha256=digest,
        bytes=size,
        width=w,
        height=h,
        orientation=orientation,
        mode=im.mode,
        format=im.format,
    )
    if orientation in (5, 6, 7, 8):
        info.width, info.height = h, w
    if orientation != 1:
        info.notes.append(f"EXIF orientation {orientation} applied")

    want_scale = min_scale
    if max_side is not None:
        want_scale = min(want_scale, max_side / max(w, h))
    want_scale = min(1.0, want_scale)
    if is_jpeg:
        if want_scale < 1.0:  # decode directly at 1/2, 1/4 or 1/8 scale: much faster
            im.draft("RGB", (max(1, int(w * want_scale)), max(1, int(h * want_scale))))
        _load(im)
    rgb, notes = to_rgb8(im, params.alpha_background)
    info.notes.extend(notes)
    if orientation != 1:
        rgb = np.asarray(Image.fromarray(rgb).transpose(_ORIENTATION_FIX[orientation]))
    scale = rgb.shape[1] / info.width
    if max_side is not None and max(rgb.shape[:2]) > max_side:
        factor = max_side / max(rgb.shape[:2])
        new_size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        rgb = cv2.resize(rgb, new_size, interpolation=cv2.INTER_AREA)
        scale = rgb.shape[1] / info.width
    return LoadedImage(info=info, rgb=np.ascontiguousarray(rgb), scale=scale)


def _describe(exc: Exception) -> str:
    """The error, without memory addresses (reasons must be reproducible)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as exc:
        reason = f"truncated or corrupt image data ({_describe(exc)})"
        raise ImageRejected(reason) from None


def to_rgb8(im: Image.Image, background: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Any PIL mode -> H x W x 3 uint8, with notes on what was converted."""
    notes: list[str] = []
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im).astype(np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
            notes.append("16-bit converted to 8-bit")
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        notes.append("greyscale converted to RGB")
        return np.stack([grey] * 3, axis=-1), notes
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        if (alpha < 1.0).any():
            bg = np.array(background, dtype=np.float32)
            rgb = rgba[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)
            notes.append(f"alpha composited on {tuple(background)}")
            return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), notes
        return np.ascontiguousarray(rgba[..., :3]), notes
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif mode in ("L", "1"):
        notes.append("greyscale converted to RGB")
    elif mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return np.asarray(im.convert("RGB")), notes

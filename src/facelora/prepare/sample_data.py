"""`facelora sample-data DIR`: the demo's raw dataset, built from photos installed packages ship.

Sources: scikit-image's astronaut, matplotlib's grace_hopper and the group photo t1.jpg from
insightface (its six faces are also cut out as separate portraits). Each portrait is enlarged to
a realistic photo size and given deterministic, face-local synthetic edits (restoration, warmer
skin, sunglasses, red lips), laid out in all three paired layouts, together with the kinds of
bad input the workflow must survive. No third-party photo is stored in this repository.
"""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facelora.config import DlibParams
from facelora.errors import MissingInput, RefusedInput
from facelora.prepare.faces.align import face_frame

TARGET_FACE_PX = 380  # face size in the enlarged portraits (a crop of about 720 px)
JPEG_QUALITY = 92


@dataclass
class Portrait:
    name: str
    rgb: np.ndarray
    landmarks: np.ndarray  # (5, 2)


@dataclass
class Edit:
    name: str
    caption: str
    apply: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # -> (start, end)


# --- source photos ------------------------------------------------------------------------


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(f"the {package} package is not installed (pip install {package})")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise MissingInput(f"{path} not found in the installed {package} package")
    return path


def source_photos() -> dict[str, np.ndarray]:
    def load(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    return {
        "astronaut": load(_package_file("skimage", "data", "astronaut.png")),
        "grace_hopper": load(
            _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")
        ),
        "t1_group": load(_package_file("insightface", "data", "images", "t1.jpg")),
        "coffee": load(_package_file("skimage", "data", "coffee.png")),
    }


class _Landmarker:
    def __init__(self):
        from facelora.prepare.faces.dlib_backend import DlibDetector, DlibEmbedder

        params = DlibParams(upsample=1)
        self.detector = DlibDetector(params)
        self.embedder = DlibEmbedder(params)

    def faces(self, rgb: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(box, landmarks) per face, largest first, ties left to right."""
        dets = sorted(self.detector.detect(rgb), key=lambda d: (-d.area, d.box[0]))
        return [(d.box, self.embedder.landmarks(rgb, d.box)) for d in dets if d.score > 0.3]


def _enlarge(rgb: np.ndarray, landmarks: np.ndarray, name: str) -> Portrait:
    factor = TARGET_FACE_PX / face_frame(landmarks).size
    size = (round(rgb.shape[1] * factor), round(rgb.shape[0] * factor))
    big = cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4)
    return Portrait(name, big, landmarks * factor)


def portraits(photos: dict[str, np.ndarray], lm: _Landmarker) -> list[Portrait]:
    out = []
    for name in ("astronaut", "grace_hopper"):
        found = lm.faces(photos[name])
        if not found:
            raise RuntimeError(f"no face found in the sample photo {name}")
        out.append(_enlarge(photos[name], found[0][1], name))
    group = photos["t1_group"]
    faces = sorted(lm.faces(group), key=lambda f: f[0][0])  # left to right
    for k, (_box, landmarks) in enumerate(faces):
        frame = face_frame(landmarks)
        half = frame.size * 1.9
        x0 = int(max(0, frame.center[0] - half))
        y0 = int(max(0, frame.center[1] - half * 1.1))
        x1 = int(min(group.shape[1], frame.center[0] + half))
        y1 = int(min(group.shape[0], frame.center[1] + half * 1.2))
        region = group[y0:y1, x0:x1]
        out.append(_enlarge(region, landmarks - [x0, y0], f"t1_person{k + 1}"))
    return out


# --- edits (deterministic, face-local) ----------------------------------------------------


def _ellipse_mask(shape, landmarks: np.ndarray, scale: float, feather: float) -> np.ndarray:
    frame = face_frame(landmarks)
    mouth = (landmarks[3] + landmarks[4]) / 2
    center = (frame.center + mouth) / 2
    mask = np.zeros(shape[:2], np.float32)
    axes = (round(frame.size * 0.42 * scale), round(frame.size * 0.58 * scale))
    cv2.ellipse(mask, (round(center[0]), round(center[1])), axes, frame.angle, 0, 360, 1.0, -1)
    k = int(frame.size * feather) | 1
    return cv2.GaussianBlur(mask, (k, k), 0)[..., None]


def _blend(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.clip(a * (1 - mask) + b * mask, 0, 255).astype(np.uint8)


def degrade(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigmaX=face_frame(landmarks).size / 90)
    noisy = blurred.astype(np.float32) + rng.normal(0, 9, rgb.shape).astype(np.float32)
    _, buf = cv2.imencode(
        ".jpg", np.clip(noisy, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 18]
    )
    jpeg = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    start = _blend(
        rgb.astype(np.float32),
        jpeg.astype(np.float32),
        _ellipse_mask(rgb.shape, landmarks, 1.3, 0.15),
    )
    return start, rgb


def warmer_skin(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab[..., 1] += 9
    lab[..., 2] += 14
    warm = cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    mask = _ellipse_mask(rgb.shape, landmarks, 1.0, 0.2)
    return rgb, _blend(rgb.astype(np.float32), warm.astype(np.float32), mask)


def sunglasses(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = rgb.copy()
    frame = face_frame(landmarks)
    r = round(frame.size * 0.13)
    overlay = out.copy()
    for eye in landmarks[:2]:
        cv2.circle(overlay, (round(eye[0]), round(eye[1])), r, (25, 25, 30), -1, cv2.LINE_AA)
    a, b = landmarks[0], landmarks[1]
    direction = (b - a) / np.linalg.norm(b - a)
    p0, p1 = a + direction * r, b - direction * r
    cv2.line(
        overlay,
        tuple(np.round(p0).astype(int)),
        tuple(np.round(p1).astype(int)),
        (25, 25, 30),
        max(2, r // 6),
        cv2.LINE_AA,
    )
    return rgb, cv2.addWeighted(overlay, 0.8, out, 0.2, 0)


def red_lips(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    left, right = landmarks[3], landmarks[4]
    center = (left + right) / 2
    width = np.linalg.norm(right - left)
    mask = np.zeros(rgb.shape[:2], np.float32)
    angle = float(np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0])))
    axes = (round(width * 0.55), round(width * 0.22))
    cv2.ellipse(mask, (round(center[0]), round(center[1])), axes, angle, 0, 360, 1.0, -1)
    k = int(width * 0.15) | 1
    mask = cv2.GaussianBlur(mask, (k, k), 0)[..., None] * 0.7
    red = np.zeros_like(rgb, dtype=np.float32)
    red[...] = (200, 20, 40)
    return rgb, _blend(rgb.astype(np.float32), red, mask)


EDITS = [
    Edit("restore", "EDITFACE restore the face: sharpen the details and remove the noise", degrade),
    Edit("warm", "EDITFACE make the skin tone warmer", warmer_skin),
    Edit("glasses", "EDITFACE add dark round sunglasses", sunglasses),
    Edit("lips", "EDITFACE paint the lips bright red", red_lips),
]


# --- writing ------------------------------------------------------------------------------


def _save(path: Path, rgb: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=JPEG_QUALITY, **kwargs)


def _save_rotated(path: Path, rgb: np.ndarray) -> None:
    """Store the photo turned on its side with EXIF orientation 6, as phones do."""
    stored = np.ascontiguousarray(np.rot90(rgb, k=1))  # viewer rotates 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(path, stored, exif=exif.tobytes())


def _bomb_png() -> bytes:
    """A valid tiny PNG whose header claims 40000 x 40000 pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", 40000, 40000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def build_sample_data(dest: str | Path) -> dict:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise RefusedInput(f"{dest} exists and is not empty: choose a new folder")
    photos = source_photos()
    lm = _Landmarker()
    people = portraits(photos, lm)
    counts = {"pairs": 0, "bad": 0}

    def pair_images(p: Portrait, edit: Edit):
        return edit.apply(p.rgb, p.landmarks)

    kontext = dest / "kontext"
    for p in people[:2]:  # astronaut, grace_hopper: Kontext layout with sidecar captions
        for edit in EDITS:
            start, end = pair_images(p, edit)
            stem = f"{p.name}_{edit.name}"
            if p.name == "grace_hopper" and edit.name == "warm":
                _save_rotated(kontext / f"{stem}_start.jpg", start)
                _save_rotated(kontext / f"{stem}_end.jpg", end)
            elif p.name == "grace_hopper" and edit.name == "lips":
                stem = "Grace Hopper – lips"  # spaces and unicode in names
                _save(kontext / f"{stem}_start.jpg", start)
                _save(kontext / f"{stem}_end.jpg", end)
            else:
                _save(kontext / f"{stem}_start.jpg", start)
                _save(kontext / f"{stem}_end.jpg", end)
            (kontext / f"{stem}.txt").write_text(edit.caption + "\n", encoding="utf-8")
            counts["pairs"] += 1
        # a face reference (_start2): the same person, mirrored and re-framed
    ref = np.ascontiguousarray(people[0].rgb[:, ::-1])
    h, w = ref.shape[:2]
    _save(kontext / "astronaut_warm_start2.jpg", cv2.resize(ref[h // 16 :, : w - w // 16], (w, h)))
    # a CMYK start image
    start, end = pair_images(people[0], EDITS[1])
    Image.fromarray(start).convert("CMYK").save(kontext / "astronaut_cmyk_start.jpg", quality=92)
    _save(kontext / "astronaut_cmyk_end.jpg", end)
    (kontext / "astronaut_cmyk.txt").write_text("make the skin tone warmer\n", encoding="utf-8")
    # the whole group photo with one face edited: the pair step must pick that face
    group = photos["t1_group"]
    group_faces = lm.faces(group)
    _, edited = sunglasses(group, group_faces[min(2, len(group_faces) - 1)][1])
    _save(kontext / "group_glasses_start.jpg", group)
    _save(kontext / "group_glasses_end.jpg", edited)
    (kontext / "group_glasses.txt").write_text(EDITS[2].caption + "\n", encoding="utf-8")
    counts["pairs"] += 3

    folders = dest / "folders"  # t1 persons 1-3: target + control folders
    for p in people[2:5]:
        for edit in EDITS[:2]:
            start, end = pair_images(p, edit)
            _save(folders / "control" / f"{p.name}_{edit.name}.jpg", start)
            _save(folders / "target" / f"{p.name}_{edit.name}.jpg", end)
            if not (p is people[4] and edit.name == "warm"):  # one pair lacks its caption
                (folders / "target" / f"{p.name}_{edit.name}.txt").write_text(
                    edit.caption + "\n", encoding="utf-8"
                )
            counts["pairs"] += 1
    _save(folders / "control" / "orphan_control.jpg", people[2].rgb)  # no target: unpaired

    manifest_dir = dest / "manifest"  # t1 persons 4-6: a JSONL manifest
    rows = []
    for p in people[5:]:
        for edit in (EDITS[0], EDITS[3]):
            start, end = pair_images(p, edit)
            _save(manifest_dir / "before" / f"{p.name}_{edit.name}.jpg", start)
            _save(manifest_dir / "after" / f"{p.name}_{edit.name}.jpg", end)
            rows.append(
                {
                    "start": f"before/{p.name}_{edit.name}.jpg",
                    "end": f"after/{p.name}_{edit.name}.jpg",
                    "caption": edit.caption,
                }
            )
            counts["pairs"] += 1
    rows.append({"start": "before/missing.jpg", "end": "after/missing.jpg", "caption": "x"})
    (manifest_dir / "pairs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )

    bad = dest / "bad"  # bad input: each must come out with a recorded reason
    bad.mkdir(parents=True)
    (bad / "empty.jpg").write_bytes(b"")
    full = io.BytesIO()
    Image.fromarray(people[0].rgb).save(full, format="JPEG", quality=90)
    (bad / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    (bad / "not_an_image.png").write_text("this is a text file with an image extension\n")
    (bad / "bomb.png").write_bytes(_bomb_png())
    _save(bad / "coffee_no_face.jpg", photos["coffee"])
    (kontext / "lonely_start.jpg").write_bytes(
        (kontext / "astronaut_restore_start.jpg").read_bytes()
    )
    # an exact copy of a whole pair: rejected as a duplicate
    for role in ("start", "end"):
        src = kontext / f"astronaut_restore_{role}.jpg"
        (kontext / f"astronaut_restore_copy_{role}.jpg").write_bytes(src.read_bytes())
    (kontext / "astronaut_restore_copy.txt").write_text(EDITS[0].caption + "\n", encoding="utf-8")
    counts["bad"] = 8
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    counts["files"] = len(files)
    return counts

"""What each kind makes from which face crops: one job per pair, decided before any work.

The sources are the usable face crops of the crop step (one per face). Every job has a name,
a seed and its inputs fixed by the sources' content and the settings, so a rerun plans the
same jobs, a shard always gets the same ones, and an API answer can be cached by content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facelora.config import Params
from facelora.io.naming import short_hash
from facelora.io.tables import CROPS, FACES, IMAGES, read_table
from facelora.prepare.faces.align import CropBox, transform_points
from facelora.prepare.pairs.identity import cluster_identities

KIND_LETTER = {"restoration": "r", "swap": "s", "edit": "e"}


@dataclass(frozen=True)
class Source:
    """One usable face crop, with its face geometry in the crop's own pixels."""

    image: str  # the photo, relative to the raw folder
    face_index: int
    sha256: str  # of the photo
    crop: str  # the crop image, relative to the crops folder
    side: int
    landmarks: np.ndarray = field(compare=False, repr=False)  # (5, 2) crop pixels
    box: np.ndarray = field(compare=False, repr=False)  # x0, y0, x1, y1 in crop pixels
    score: float = 1.0
    embedding: np.ndarray = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    @property
    def key(self) -> str:
        return f"{self.image}#{self.face_index}"

    def record(self) -> dict:
        return {
            "image": self.image,
            "face_index": self.face_index,
            "sha256": self.sha256,
            "crop": self.crop,
        }


@dataclass(frozen=True)
class Job:
    kind: str
    pair: str  # the pair's file name stem
    source: Source
    variation: int
    seed: int
    references: tuple[Source, ...] = ()
    instruction: str | None = None
    instruction_label: str | None = None


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the run's seed and a job's identity (independent of order)."""
    text = "|".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def _box_in_crop(face: dict, box: CropBox, side: int) -> np.ndarray:
    corners = np.array(
        [
            [face["x0"], face["y0"]],
            [face["x1"], face["y0"]],
            [face["x0"], face["y1"]],
            [face["x1"], face["y1"]],
        ]
    )
    pts = transform_points(corners, box, side)
    return np.array([*pts.min(axis=0), *pts.max(axis=0)], dtype=np.float64)


def read_sources(crops_path: str | Path, faces_path: str | Path, images_path: str | Path):
    """Every usable face crop, sorted by photo and face."""
    crops = read_table(crops_path, CROPS)
    crops = crops[crops["status"] == "ok"]
    faces = read_table(faces_path, FACES).set_index(["image", "face_index"])
    images = read_table(images_path, IMAGES).set_index("image")
    out = []
    for c in crops.sort_values(["image", "face_index"]).to_dict("records"):
        face = faces.loc[(c["image"], int(c["face_index"]))].to_dict()
        face.update(image=c["image"], face_index=int(c["face_index"]))
        if isinstance(images.loc[c["image"], "duplicate_of"], str):
            continue  # the same bytes as an earlier photo: one source is enough
        box = CropBox(float(c["cx"]), float(c["cy"]), float(c["side"]), float(c["angle"]))
        side = int(c["out_side"])
        out.append(
            Source(
                image=c["image"],
                face_index=int(c["face_index"]),
                sha256=str(images.loc[c["image"], "sha256"]),
                crop=c["crop"],
                side=side,
                landmarks=transform_points(np.stack(face["landmarks"]), box, side),
                box=_box_in_crop(face, box, side),
                score=float(face["score"]),
                embedding=np.asarray(face["embedding"], np.float32),
            )
        )
    return out


def pair_name(kind: str, *identity: object) -> str:
    return KIND_LETTER[kind] + short_hash("|".join(map(str, (kind, *identity))), 12)


def plan_restoration(sources: list[Source], params: Params) -> list[Job]:
    seed = _seed(params)
    return [
        Job(
            "restoration",
            pair_name("restoration", s.sha256, s.face_index, v),
            s,
            v,
            derive_seed(seed, "restoration", s.sha256, s.face_index, v),
        )
        for s in sources
        for v in range(params.synthesis.variations)
    ]


def identity_groups(sources: list[Source], threshold: float) -> list[list[Source]]:
    """Sources of one person (clustered by embedding), each group with 2+ distinct photos."""
    if not sources:
        return []
    labels = cluster_identities(np.stack([s.embedding for s in sources]), threshold)
    groups: dict[int, list[Source]] = {}
    for label, s in zip(labels, sources, strict=True):
        groups.setdefault(int(label), []).append(s)
    return [g for g in groups.values() if len({s.sha256 for s in g}) >= 2]


def plan_swap(sources: list[Source], params: Params) -> tuple[list[Job], list[dict]]:
    """Jobs, and the sources left out with the reason (no other photo of the person)."""
    seed, settings = _seed(params), params.synthesis.swap
    groups = identity_groups(sources, params.faces.same_person)
    grouped = {s.key for g in groups for s in g}
    skipped = [
        {
            "source": s.key,
            "reason": "no other photo of the same person (a swap needs a reference photo)",
        }
        for s in sources
        if s.key not in grouped
    ]
    jobs = []
    for group in groups:
        for s in group:
            others = [o for o in group if o.sha256 != s.sha256]  # never the same photo
            for v in range(params.synthesis.variations):
                job_seed = derive_seed(seed, "swap", s.sha256, s.face_index, v)
                rng = np.random.default_rng(job_seed)
                k = min(settings.max_references, len(others))
                refs = tuple(others[i] for i in sorted(rng.choice(len(others), k, replace=False)))
                name = pair_name("swap", s.sha256, s.face_index, v, *[r.sha256 for r in refs])
                jobs.append(Job("swap", name, s, v, job_seed, refs))
    jobs.sort(key=lambda j: j.pair)
    return jobs, skipped


def plan_edit(sources: list[Source], params: Params) -> list[Job]:
    seed = _seed(params)
    jobs = []
    for s in sources:
        for label, text in params.synthesis.instruction_list():
            for v in range(params.synthesis.variations):
                job_seed = derive_seed(seed, "edit", s.sha256, s.face_index, text, v)
                name = pair_name("edit", s.sha256, s.face_index, text, v)
                jobs.append(Job("edit", name, s, v, job_seed, (), text, label))
    return jobs


def plan(kind: str, sources: list[Source], params: Params) -> tuple[list[Job], list[dict]]:
    if kind == "restoration":
        return plan_restoration(sources, params), []
    if kind == "swap":
        return plan_swap(sources, params)
    return plan_edit(sources, params), []


def _seed(params: Params) -> int:
    return params.seed if params.synthesis.seed is None else params.synthesis.seed

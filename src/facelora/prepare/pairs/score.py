"""Scoring pairs (sharded): choose the face, cut aligned crops, compute the quality scores.

An edit pair's start and end are cut with ONE crop square (from the start face, or the end
face when the start has none, e.g. a degraded photo), so they stay pixel-aligned; a pair's
loss mask (drawn in the end image's pixels) is cut with the end crop's square and size. Identity
pairs (two photos) use each photo's own crop. With several faces, `pairs.multi_face` chooses:
the face that changed most between start and end, the largest, or all of them (one pair each);
the choice is written into the row.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from facelora.config import Params, ScoreRange
from facelora.io.atomic import link_or_copy, write_csv, write_parquet, write_png
from facelora.io.parallel import ordered_map
from facelora.io.progress import progress
from facelora.io.sharding import in_shard
from facelora.io.tables import CROPS, FACES, IMAGES, ParquetRowWriter, frame_records, read_rows_of
from facelora.prepare.faces.align import CropBox, transform_points, warp_crop
from facelora.prepare.faces.pose import pose_difference
from facelora.prepare.images import ImageRejected, read_image
from facelora.prepare.pairs import quality
from facelora.prepare.pairs.index import INDEX, REJECTED_COLUMNS
from facelora.prepare.synthesis.made import ImageRoots, MadeFolder, image_roots, is_made
from facelora.registry.scores import SCORE_COLUMNS, VLM_DESCRIPTION, is_score_column

log = logging.getLogger(__name__)
IMAGES_SUBDIR = "images"
MATCH_IOU = 0.3
ASPECT_TOLERANCE = 0.01

PAIRS = pa.schema(
    [(name, INDEX.field(name).type) for name in INDEX.names]
    + [
        ("status", pa.string()),  # ok | rejected
        ("reason", pa.string()),
        ("face_choice", pa.string()),
        ("geometry", pa.string()),  # start | end (one shared square) | own (each photo's own)
        ("n_start_faces", pa.int32()),
        ("n_end_faces", pa.int32()),
        ("start_crop", pa.string()),  # PNG paths relative to the pairs folder
        ("end_crop", pa.string()),
        ("reference_crops", pa.list_(pa.string())),
        ("mask_crop", pa.string()),  # the mask cut like the end crop (grey PNG), or null
        ("out_side", pa.int32()),
        # the end image's 5 landmarks [x, y] in end-crop pixels (training's loss regions)
        ("end_landmarks", pa.list_(pa.list_(pa.float32()))),
        *[(name, pa.float32()) for name in SCORE_COLUMNS],
        ("rubric_scores", pa.string()),  # JSON {vlm_<name>: value}: gather makes them columns
        ("notes", pa.string()),
    ]
)


def composite(params: Params, scores: dict) -> float:
    """The `quality` composite of a pair's scores (VLM scores mapped by the rubric's ranges)."""
    rubric = params.synthesis.scorer.rubric
    ranges = {f"vlm_{n}": (item.min, item.max) for n, item in rubric.items()}
    return quality.composite_quality(scores, params.pairs.quality_weights, ranges)


def _numbers(scores: dict) -> dict[str, float]:
    return {k: float(v) for k, v in scores.items() if is_score_column(k)}


def _rubric_values(scores: dict) -> dict:
    """A scorer's answer as the pair keeps it: the numeric vlm_* scores and the description
    (not e.g. the scorer's model name)."""
    return {
        k: v
        for k, v in scores.items()
        if (is_score_column(k) and isinstance(v, int | float)) or k == VLM_DESCRIPTION
    }


def made_scores(made: list[MadeFolder]) -> dict[str, dict]:
    """A synthesized pair's end image -> the VLM scores in its manifest row (and the
    description of the change)."""
    out = {}
    for folder in made:
        for row in folder.pairs():
            found = _rubric_values(row.get("scores") or {})
            if found:
                out[folder.key(row["end"])] = found
    return out


def pairs_schema(params: Params) -> pa.Schema:
    """The gathered pairs table: PAIRS plus one column per VLM rubric score."""
    from facelora.prepare.synthesis.scoring import score_names

    names = score_names(params)
    text = [(VLM_DESCRIPTION, pa.string())] if names and params.synthesis.scorer.describe else []
    return pa.schema([*PAIRS, *[(name, pa.float32()) for name in names], *text])


class PairRejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _box(face: dict) -> np.ndarray:
    return np.array([face["x0"], face["y0"], face["x1"], face["y1"]], dtype=np.float64)


def _crop_box(crop: dict) -> CropBox:
    return CropBox(float(crop["cx"]), float(crop["cy"]), float(crop["side"]), float(crop["angle"]))


class PairScorer:
    """Everything one job needs to score its pairs; built once per worker process."""

    def __init__(
        self,
        roots: ImageRoots,
        crops_dir: Path,
        pairs_dir: Path,
        params: Params,
        faces: dict,
        crops: dict,
        images: dict,
    ):
        self.roots, self.crops_dir, self.pairs_dir = roots, crops_dir, pairs_dir
        self.params = params
        self.faces = faces  # image -> [face rows sorted by face_index]
        self.crops = crops  # (image, face_index) -> crop row
        self.images = images  # image -> images-table row
        self.vlm: dict[str, dict] = {}  # a synthesized end image -> its pair's VLM scores

    # --- helpers --------------------------------------------------------------------------

    def _load(self, rel: str, min_scale: float = 1.0, max_side: int | None = None):
        try:
            return read_image(
                self.roots.path(rel), self.params.images, max_side=max_side, min_scale=min_scale
            )
        except ImageRejected as exc:
            raise PairRejected(f"{rel} can no longer be read: {exc.reason}") from None

    def _read_png(self, path: Path) -> np.ndarray:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise PairRejected(f"crop {path} is missing or unreadable: rerun the crop step")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _face_crop(self, rel: str, face_index: int) -> dict | None:
        crop = self.crops.get((rel, face_index))
        return crop if crop is not None and crop["status"] == "ok" else None

    def _no_face_reason(self, rel: str) -> str:
        reason = self.images[rel]["reason"]
        return reason if isinstance(reason, str) else "no usable face"

    def _emit(self, pid: str, role: str, pixels: np.ndarray | None, link_from: Path | None) -> str:
        name = f"{IMAGES_SUBDIR}/{pid}_{role}.png"
        if link_from is not None:
            link_or_copy(link_from, self.pairs_dir / name)
        else:
            write_png(self.pairs_dir / name, pixels, self.params.crop.png_compression)
        return name

    # --- face choice ----------------------------------------------------------------------

    def _face_options(self, cand: dict, scale: tuple[float, float], shared: bool) -> list[tuple]:
        """(start face, end face or None) options. Same geometry: faces match by overlap of
        the rescaled boxes; otherwise (a cropped end, say) by embedding similarity."""
        starts, ends = self.faces.get(cand["start"], []), self.faces.get(cand["end"], [])
        if not starts:
            return [(None, e) for e in ends]
        factor = np.array([scale[0], scale[1], scale[0], scale[1]])

        def affinity(s: dict, e: dict) -> float:
            if shared:
                iou = _iou(_box(s) * factor, _box(e))
                return iou if iou >= MATCH_IOU else -1.0
            sim = quality.identity_similarity(s["embedding"], e["embedding"])
            return sim if sim >= self.params.faces.same_person else -1.0

        options, used = [], set()
        for s in starts:
            scored = [(affinity(s, e), e) for e in ends if e["face_index"] not in used]
            best = max(scored, key=lambda t: t[0], default=(-1.0, None))
            if best[0] >= 0:
                used.add(best[1]["face_index"])
                options.append((s, best[1]))
            else:
                options.append((s, None))
        return options

    def _changes(self, cand: dict, options: list[tuple], scale: tuple[float, float]) -> list[float]:
        side = 512
        a = self._load(cand["start"], max_side=side)
        b = self._load(cand["end"], max_side=side)
        b_rgb = cv2.resize(b.rgb, (a.rgb.shape[1], a.rgb.shape[0]), interpolation=cv2.INTER_AREA)
        out = []
        for s, e in options:
            face = s if s is not None else e
            box = _box(face) * (a.scale if s is not None else a.scale / scale[0])
            x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
            x1, y1 = min(a.rgb.shape[1], int(box[2]) + 1), min(a.rgb.shape[0], int(box[3]) + 1)
            if x1 <= x0 or y1 <= y0:
                out.append(0.0)
                continue
            diff = np.abs(a.rgb[y0:y1, x0:x1].astype(np.int16) - b_rgb[y0:y1, x0:x1]).mean()
            out.append(float(diff))
        return out

    def _choose(self, cand: dict, options: list[tuple], scale) -> list[tuple[tuple, str]]:
        n = len(options)
        if n == 1:
            return [(options[0], "the only face")]
        policy = self.params.pairs.multi_face
        if policy == "all":
            return [
                (o, f"face {i + 1} of {n} (pairs.multi_face: all)") for i, o in enumerate(options)
            ]
        if policy == "largest":
            return [(options[0], f"largest of {n} faces")]
        changes = self._changes(cand, options, scale)
        best = int(np.argmax(changes))
        return [(options[best], f"most changed of {n} faces (mean difference {changes[best]:.1f})")]

    # --- scoring --------------------------------------------------------------------------

    def score(self, cand: dict) -> list[dict]:
        base = {k: cand[k] for k in INDEX.names}
        base.update(
            n_start_faces=len(self.faces.get(cand["start"], [])),
            n_end_faces=len(self.faces.get(cand["end"], [])),
        )
        try:
            if cand["layout"] == "auto_identity":
                return [self._score_identity(dict(base))]
            return self._score_edit(base)
        except PairRejected as exc:
            return [{**base, "status": "rejected", "reason": exc.reason}]

    def _score_edit(self, base: dict) -> list[dict]:
        si, ei = self.images[base["start"]], self.images[base["end"]]
        scale = (ei["width"] / si["width"], ei["height"] / si["height"])
        shared = abs(scale[0] - scale[1]) <= ASPECT_TOLERANCE * max(scale)
        options = self._face_options(base, scale, shared)
        if not options:
            raise PairRejected(
                f"no face in start ({self._no_face_reason(base['start'])}) "
                f"or end ({self._no_face_reason(base['end'])})"
            )
        rows = []
        for (s, e), choice in self._choose(base, options, scale):
            row = dict(base, face_choice=choice)
            if self.params.pairs.multi_face == "all" and len(options) > 1:
                face = s["face_index"] if s is not None else e["face_index"]
                row["pair_id"] = f"{base['pair_id']}_f{face}"
            try:
                rows.append(self._score_edit_face(row, s, e, scale, shared))
            except PairRejected as exc:
                rows.append({**row, "status": "rejected", "reason": exc.reason})
        return rows

    def _score_edit_face(self, row: dict, s: dict | None, e: dict | None, scale, shared) -> dict:
        if e is None and self.params.pairs.require_end_face:
            raise PairRejected(
                "no face found in the end image at the start face's place "
                "(the edit removed or moved the face; pairs.require_end_face)"
            )
        row["start_face"] = None if s is None else int(s["face_index"])
        row["end_face"] = None if e is None else int(e["face_index"])
        s_crop = self._face_crop(row["start"], s["face_index"]) if s is not None else None
        e_crop = self._face_crop(row["end"], e["face_index"]) if e is not None else None
        pid = row["pair_id"]
        if is_made(row["start"]) and is_made(row["end"]):
            return self._finish_made(row, s, e)
        if not shared:
            if s_crop is None or e_crop is None:
                raise PairRejected(
                    "start and end differ in aspect ratio and a face has no usable crop: "
                    + self._crop_reason(row, s, e)
                )
            return self._finish_own(row, s, e, s_crop, e_crop, geometry="own")
        if s_crop is not None:
            geometry, box, out = "start", _crop_box(s_crop), int(s_crop["out_side"])
            start_png = self.crops_dir / s_crop["crop"]
            row["start_crop"] = self._emit(pid, "start", None, start_png)
            start_rgb = self._read_png(start_png)
            end_box = box.rescaled(*scale)
            end_img = self._load(row["end"], min_scale=out / end_box.side)
            end_rgb = warp_crop(end_img.rgb, end_box, out, end_img.scale)
            row["end_crop"] = self._emit(pid, "end", end_rgb, None)
            start_box = box
        elif e_crop is not None:
            geometry, end_box, out = "end", _crop_box(e_crop), int(e_crop["out_side"])
            end_png = self.crops_dir / e_crop["crop"]
            row["end_crop"] = self._emit(pid, "end", None, end_png)
            end_rgb = self._read_png(end_png)
            start_box = end_box.rescaled(1 / scale[0], 1 / scale[1])
            start_img = self._load(row["start"], min_scale=out / start_box.side)
            start_rgb = warp_crop(start_img.rgb, start_box, out, start_img.scale)
            row["start_crop"] = self._emit(pid, "start", start_rgb, None)
        else:
            raise PairRejected(self._crop_reason(row, s, e))
        row.update(geometry=geometry, out_side=out)
        self._cut_mask(row, end_box, out)
        lm_s = transform_points(np.stack(s["landmarks"]), start_box, out) if s is not None else None
        lm_e = transform_points(np.stack(e["landmarks"]), end_box, out) if e is not None else None
        lm_s = lm_s if lm_s is not None else lm_e
        lm_e = lm_e if lm_e is not None else lm_s
        resolution = min(start_box.side, end_box.side)
        return self._scores(row, s, e, start_rgb, lm_s, end_rgb, lm_e, resolution, shared=True)

    def _cut_mask(self, row: dict, end_box: CropBox, out: int) -> None:
        """The pair's mask (end image pixels) cut with the end crop's square at its size, so
        each mask pixel lies on the end crop's pixel; linear interpolation keeps it grey."""
        rel = row.get("mask")
        if rel is None:
            return
        mask = self._load(rel, min_scale=out / end_box.side)
        end = self.images[row["end"]]
        size, end_size = (mask.info.width, mask.info.height), (end["width"], end["height"])
        if size != end_size:  # the index checks this too; the files may have changed since
            raise PairRejected(
                f"mask {rel} is {size[0]}x{size[1]} px but its end image is "
                f"{end_size[0]}x{end_size[1]}: a mask is drawn in the end image's pixels"
            )
        grey = cv2.cvtColor(mask.rgb, cv2.COLOR_RGB2GRAY)
        pixels = warp_crop(grey, end_box, out, mask.scale, interpolation=cv2.INTER_LINEAR)
        row["mask_crop"] = self._emit(row["pair_id"], "mask", pixels, None)

    def _crop_reason(self, row: dict, s: dict | None, e: dict | None) -> str:
        parts = []
        for role, face in (("start", s), ("end", e)):
            if face is None:
                continue
            crop = self.crops.get((row[role], face["face_index"]))
            reason = crop["reason"] if crop is not None else "not cropped"
            parts.append(f"{role} face: {reason}")
        return "; ".join(parts) or "no usable face crop"

    def _score_identity(self, row: dict) -> dict:
        s = self.faces[row["start"]][row["start_face"]]
        e = self.faces[row["end"]][row["end_face"]]
        s_crop = self._face_crop(row["start"], row["start_face"])
        e_crop = self._face_crop(row["end"], row["end_face"])
        if s_crop is None or e_crop is None:
            raise PairRejected("a face crop is missing: rerun the crop step")
        row["face_choice"] = "fixed by identity pairing"
        return self._finish_own(row, s, e, s_crop, e_crop, geometry="own")

    def _finish_own(self, row, s, e, s_crop, e_crop, geometry: str) -> dict:
        pid = row["pair_id"]
        s_png, e_png = self.crops_dir / s_crop["crop"], self.crops_dir / e_crop["crop"]
        row["start_crop"] = self._emit(pid, "start", None, s_png)
        row["end_crop"] = self._emit(pid, "end", None, e_png)
        start_rgb, end_rgb = self._read_png(s_png), self._read_png(e_png)
        s_box, e_box = _crop_box(s_crop), _crop_box(e_crop)
        self._cut_mask(row, e_box, int(e_crop["out_side"]))
        lm_s = transform_points(np.stack(s["landmarks"]), s_box, int(s_crop["out_side"]))
        lm_e = transform_points(np.stack(e["landmarks"]), e_box, int(e_crop["out_side"]))
        row.update(
            geometry=geometry,
            out_side=min(int(s_crop["out_side"]), int(e_crop["out_side"])),
            start_face=int(s["face_index"]),
            end_face=int(e["face_index"]),
        )
        resolution = min(s_box.side, e_box.side)
        return self._scores(row, s, e, start_rgb, lm_s, end_rgb, lm_e, resolution, shared=False)

    def _finish_made(self, row: dict, s: dict | None, e: dict | None) -> dict:
        """A synthesized pair: its images are aligned crops already (linked, not cut)."""
        pid = row["pair_id"]
        start_png, end_png = self.roots.path(row["start"]), self.roots.path(row["end"])
        row["start_crop"] = self._emit(pid, "start", None, start_png)
        row["end_crop"] = self._emit(pid, "end", None, end_png)
        start_rgb, end_rgb = self._read_png(start_png), self._read_png(end_png)
        known = s if s is not None else e
        lm_s = np.stack(known["landmarks"]).astype(np.float64)
        lm_e = np.stack((e if e is not None else s)["landmarks"]).astype(np.float64)
        if s is None:  # the end's face, in the start's pixels
            lm_s = lm_s * (start_rgb.shape[0] / end_rgb.shape[0])
        if e is None:
            lm_e = lm_e * (end_rgb.shape[0] / start_rgb.shape[0])
        row.update(geometry="made", out_side=int(min(start_rgb.shape[0], end_rgb.shape[0])))
        resolution = float(min(start_rgb.shape[0], end_rgb.shape[0]))
        return self._scores(row, s, e, start_rgb, lm_s, end_rgb, lm_e, resolution, shared=True)

    def _reference_image(self, rel: str, index: int) -> tuple[Path, np.ndarray] | str:
        """(image file, landmarks in its pixels) of a reference face, or why there is none."""
        faces_of = self.faces.get(rel, [])
        if len(faces_of) <= index:
            return self._no_face_reason(rel) if not faces_of else f"no face {index}"
        face = faces_of[index]
        if is_made(rel):  # an aligned crop already
            return self.roots.path(rel), np.stack(face["landmarks"]).astype(np.float64)
        crop = self._face_crop(rel, index)
        if crop is None:
            return (self.crops.get((rel, index)) or {}).get("reason", "no usable crop")
        box, side = _crop_box(crop), int(crop["out_side"])
        landmarks = transform_points(np.stack(face["landmarks"]), box, side)
        return self.crops_dir / crop["crop"], landmarks

    def _references(self, row: dict, e: dict | None, end_a: np.ndarray, lm_end_a: np.ndarray):
        sims, deltas, names, kept, faces, notes = [], [], [], [], [], []
        wanted = row.get("reference_faces")
        for k, rel in enumerate(row["references"] or []):
            index = int(wanted[k]) if wanted is not None and len(wanted) > k else 0
            found = self._reference_image(rel, index)
            if isinstance(found, str):
                notes.append(f"reference {rel} dropped: {found}")
                continue
            png, lm = found
            names.append(self._emit(row["pair_id"], f"ref{len(names) + 1}", None, png))
            kept.append(rel)
            faces.append(index)
            ref = self.faces[rel][index]
            if e is not None:
                sims.append(quality.identity_similarity(ref["embedding"], e["embedding"]))
            rgb = self._read_png(png)
            ref_a = self._resize(rgb)
            lm_ref_a = lm * (self.params.pairs.analysis_side / rgb.shape[0])
            deltas.append(quality.skin_delta_e(ref_a, lm_ref_a, end_a, lm_end_a))
        return names, kept, faces, sims, deltas, notes

    def _resize(self, rgb: np.ndarray) -> np.ndarray:
        side = self.params.pairs.analysis_side
        return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)

    def _scores(self, row, s, e, start_rgb, lm_s, end_rgb, lm_e, resolution, shared) -> dict:
        side = self.params.pairs.analysis_side
        start_a, end_a = self._resize(start_rgb), self._resize(end_rgb)
        lm_s_a = lm_s * (side / start_rgb.shape[0])
        lm_e_a = lm_e * (side / end_rgb.shape[0])
        nan = float("nan")
        scores = dict.fromkeys(SCORE_COLUMNS, nan)
        if s is not None and e is not None:
            scores["identity_sim"] = quality.identity_similarity(s["embedding"], e["embedding"])
            scores["pose_diff"] = pose_difference(
                (s["yaw"], s["pitch"], s["roll"]), (e["yaw"], e["pitch"], e["roll"])
            )
        scores["skin_delta_e"] = quality.skin_delta_e(start_a, lm_s_a, end_a, lm_e_a)
        scores["hair_sim"] = quality.hair_similarity(start_a, lm_s_a, end_a, lm_e_a)
        if shared:
            scores["bg_ssim"] = quality.background_ssim(
                start_a, lm_s_a, end_a, lm_e_a, self.params.pairs.bg_mask_dilation
            )
        scores["resolution"] = float(resolution)
        scores["face_score"] = float(min(f["score"] for f in (s, e) if f is not None))
        names, kept, faces, sims, deltas, notes = self._references(row, e, end_a, lm_e_a)
        row.update(reference_crops=names, references=kept, reference_faces=faces)
        if sims:
            scores["identity_sim_ref"] = float(np.mean(sims))
        if deltas:
            scores["skin_delta_e_ref"] = float(np.nanmean(deltas))
        vlm = self.vlm.get(row["end"], {}) if is_made(row["end"]) else {}
        scores["quality"] = composite(self.params, {**scores, **_numbers(vlm)})
        row.update(scores)
        row["rubric_scores"] = json.dumps(vlm, sort_keys=True) if vlm else None
        row["end_landmarks"] = np.round(lm_e, 2).tolist()
        row.update(status="ok", reason=None, notes="; ".join(notes) or None)
        return row


# --- the sharded job and the gather -------------------------------------------------------

_worker: dict = {}


def _init(scorer: PairScorer) -> None:
    _worker["scorer"] = scorer


def _work(cand: dict) -> list[dict]:
    return _worker["scorer"].score(cand)


def _lookups(
    index: pd.DataFrame, faces_path, crops_path, images_path, made: list[MadeFolder]
) -> tuple[dict, dict, dict]:
    """Rows of the images this shard's pairs use (filtered before conversion: memory follows
    the shard, not the whole dataset)."""
    needed = set(index["start"]) | set(index["end"])
    for refs in index["references"]:
        needed.update(refs if refs is not None else [])
    wanted = pa.array(sorted(needed), pa.string())
    faces: dict[str, list[dict]] = {}
    for f in read_rows_of(faces_path, FACES, wanted):
        faces.setdefault(f["image"], []).append(f)
    crops = {(c["image"], c["face_index"]): c for c in read_rows_of(crops_path, CROPS, wanted)}
    images = {r["image"]: r for r in read_rows_of(images_path, IMAGES, wanted)}
    for folder in made:
        for f in frame_records(folder.faces()):
            if f["image"] in needed:
                faces.setdefault(f["image"], []).append(f)
        made_images = frame_records(folder.images())
        images.update((r["image"], r) for r in made_images if r["image"] in needed)
    return faces, crops, images


def score_shard(
    index_path: str | Path,
    raw_dir: str | Path,
    faces_path: str | Path,
    crops_path: str | Path,
    images_path: str | Path,
    pairs_dir: str | Path,
    shard_out: str | Path,
    params: Params,
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
    *,
    crops_dir: str | Path,
    made: list[MadeFolder] = (),
) -> int:
    """Score this shard's candidates of the pair index; the face crops (`crops_dir`) are
    where the crops table's paths point; `made`: the synthesis folders the index read."""
    index = pq.read_table(index_path, schema=INDEX).to_pandas()
    # a boolean array, not a mapped Series: on an empty index pandas would take an empty
    # object Series for a column selection and drop every column
    mine = np.array([in_shard(p, shard) for p in index["pair_id"]], dtype=bool)
    index = index.loc[mine]
    made = list(made)
    faces, crops, images = _lookups(index, faces_path, crops_path, images_path, made)
    crops_dir = Path(crops_dir)
    roots = image_roots(raw_dir, made)
    scorer = PairScorer(roots, crops_dir, Path(pairs_dir), params, faces, crops, images)
    scorer.vlm = made_scores(made)
    candidates = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in index.to_dict("records")
    ]
    for c in candidates:
        for k in ("references", "reference_faces"):
            c[k] = None if c[k] is None else list(c[k])
    results = ordered_map(_work, candidates, workers, _init, (scorer,))
    scored = progress(results, total=len(candidates), desc="pairs", unit="pair")
    rows = [row for found in scored for row in found]
    if params.synthesis.scorer.other_pairs and params.synthesis.scorer.backend != "none":
        _score_other_pairs(rows, Path(pairs_dir), params)
    count = 0
    with ParquetRowWriter(shard_out, PAIRS) as writer:
        for row in rows:
            writer.add(row)
            count += row["status"] == "ok"
    log.info("shard %d/%d: %d candidates, %d usable pairs", *shard, len(candidates), count)
    return count


def _score_other_pairs(rows: list[dict], pairs_dir: Path, params: Params) -> None:
    """synthesis.scorer.other_pairs: the VLM rates the raw layouts' pairs too (their crops),
    answers cached under the pairs folder; `quality` takes the scores in."""
    from facelora.prepare.synthesis.scoring import score_pairs

    todo = [r for r in rows if r["status"] == "ok" and r["layout"] != "synthesis"]

    def read(row: dict, role: str) -> bytes:
        return (pairs_dir / row[f"{role}_crop"]).read_bytes()

    items = [(read(r, "start"), read(r, "end"), r["caption"]) for r in todo]
    for row, result in zip(todo, score_pairs(items, params, pairs_dir / ".cache"), strict=True):
        if isinstance(result, dict):
            vlm = _rubric_values(result)
            row["rubric_scores"] = json.dumps(vlm, sort_keys=True)
            row["quality"] = composite(params, {**row, **_numbers(vlm)})
        else:
            note = f"not rated by the VLM: {result}"
            row["notes"] = "; ".join(x for x in (row["notes"], note) if x)


def gate_reason(row: dict, require: dict[str, ScoreRange]) -> str | None:
    """Why a scored pair fails pairs.require, or None. Missing scores do not fail."""
    for name, bounds in require.items():
        value = row.get(name)
        if value is None or not np.isfinite(value):
            continue
        if bounds.min is not None and value < bounds.min:
            return f"{name} {value:.3f} < pairs.require.{name}.min {bounds.min}"
        if bounds.max is not None and value > bounds.max:
            return f"{name} {value:.3f} > pairs.require.{name}.max {bounds.max}"
    return None


def gather_pairs(
    shards: list[Path],
    index_rejected: str | Path,
    pairs_dir: str | Path,
    params: Params,
    table_out: str | Path,
    rejected_out: str | Path,
) -> dict:
    """Merge shard tables into the pairs table (pairs.require applied) and the rejects (the
    index's and the scoring's); delete the PNGs in `pairs_dir` that no row refers to."""
    pairs_dir = Path(pairs_dir)
    table = pa.concat_tables([pq.read_table(s, schema=PAIRS) for s in shards])
    rows = table.sort_by([("pair_id", "ascending")]).to_pylist()
    schema = pairs_schema(params)
    vlm_columns = schema.names[len(PAIRS.names) :]
    for row in rows:
        vlm = json.loads(row["rubric_scores"]) if row["rubric_scores"] else {}
        row.update({name: vlm.get(name) for name in vlm_columns})
        if row["status"] == "ok":
            reason = gate_reason(row, params.pairs.require)
            if reason:
                row.update(status="rejected", reason=reason)
    write_parquet(table_out, pa.Table.from_pylist(rows, schema=schema))
    rejected = pd.read_csv(index_rejected, dtype=str, keep_default_na=False).replace("", None)
    scored_rejects = pd.DataFrame(
        [
            {
                "pair_id": r["pair_id"],
                "image": None,
                "start": r["start"],
                "end": r["end"],
                "reason": r["reason"],
            }
            for r in rows
            if r["status"] == "rejected"
        ],
        columns=REJECTED_COLUMNS,
    )
    write_csv(rejected_out, pd.concat([rejected, scored_rejects], ignore_index=True))
    referenced = set()
    for r in rows:
        referenced.update(
            x
            for x in [r["start_crop"], r["end_crop"], r["mask_crop"], *(r["reference_crops"] or [])]
            if x
        )
    image_dir = pairs_dir / IMAGES_SUBDIR
    if image_dir.is_dir():
        for png in image_dir.iterdir():
            if f"{IMAGES_SUBDIR}/{png.name}" not in referenced:
                png.unlink()
    stats = {
        "pairs": sum(r["status"] == "ok" for r in rows),
        "rejected": len(rejected) + len(scored_rejects),
    }
    log.info("gathered pairs: %s", stats)
    return stats

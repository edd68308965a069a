"""The pair index: every candidate pair from every layout, checked against the detect tables.

Cheap and global (one job): layouts are read, files are checked (decodable, not identical,
not a duplicate pair), photos outside any layout are paired by identity when enabled, and every
file left over is listed with the reason. Scoring the pairs (images) is sharded afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from facelora.config import Params
from facelora.io.atomic import write_csv, write_parquet
from facelora.io.naming import short_hash
from facelora.io.tables import CROPS, FACES, IMAGES, read_table
from facelora.prepare.pairs.identity import identity_pairs
from facelora.prepare.pairs.layouts import Discovery, PairCandidate, discover
from facelora.prepare.synthesis.made import MadeFolder

log = logging.getLogger(__name__)

INDEX = pa.schema(
    [
        ("pair_id", pa.string()),
        ("layout", pa.string()),
        ("source", pa.string()),
        ("start", pa.string()),
        ("end", pa.string()),
        ("references", pa.list_(pa.string())),
        ("mask", pa.string()),  # the user's loss mask (end image pixels), raw-folder path
        ("start_face", pa.int32()),
        ("end_face", pa.int32()),
        ("reference_faces", pa.list_(pa.int32())),
        ("caption", pa.string()),
        ("caption_source", pa.string()),
        ("start_sha256", pa.string()),
        ("end_sha256", pa.string()),
    ]
)

REJECTED_COLUMNS = ["pair_id", "image", "start", "end", "reason"]


def pair_id(c: PairCandidate) -> str:
    key = "|".join([c.layout, c.start, c.end, *c.references, str(c.start_face), str(c.end_face)])
    return "p" + short_hash(key, 12)


def _reject(reason: str, c: PairCandidate | None = None, image: str | None = None) -> dict:
    return {
        "pair_id": pair_id(c) if c else None,
        "image": image if image is not None else (c.source if c else None),
        "start": c.start if c else None,
        "end": c.end if c else None,
        "reason": reason,
    }


def _check_files(c: PairCandidate, images: dict[str, dict]) -> str | None:
    for role, rel in [("start", c.start), ("end", c.end)] + [
        (f"reference {i + 1}", r) for i, r in enumerate(c.references)
    ]:
        row = images.get(rel)
        if row is None:
            return (
                f"{role} image {rel} was not seen by detect (extension not in images.extensions?)"
            )
        if row["sha256"] is None:  # not decodable; "no face" alone is fine, scoring decides
            return f"{role} image {rel} rejected at detect: {row['reason']}"
    if images[c.start]["sha256"] == images[c.end]["sha256"]:
        return "start and end are the same image (identical files, no edit)"
    return _check_mask(c, images) if c.mask is not None else None


def _check_mask(c: PairCandidate, images: dict[str, dict]) -> str | None:
    """A mask the pair step cannot cut with the end's geometry rejects the pair (a mask is
    an instruction: training the pair without it would learn what the user masked out)."""
    row = images.get(c.mask)
    if row is None:
        return f"mask {c.mask} was not seen by detect (extension not in images.extensions?)"
    if row["sha256"] is None or pd.isna(row["width"]):  # no size: not decoded
        return f"mask {c.mask} is not a readable image: {row['reason']} (fix or remove it)"
    end = images[c.end]
    mask_size = (int(row["width"]), int(row["height"]))
    end_size = (int(end["width"]), int(end["height"]))
    if mask_size != end_size:
        return (
            f"mask {c.mask} is {mask_size[0]}x{mask_size[1]} px but its end image {c.end} is "
            f"{end_size[0]}x{end_size[1]}: a mask is drawn in the end image's pixels "
            "(fix or remove it)"
        )
    return None


def _identity_candidates(
    unclaimed: list[str], faces: pd.DataFrame, crops: pd.DataFrame, images: dict, params: Params
) -> tuple[list[PairCandidate], set[str]]:
    settings = params.pairs.auto_identity
    ok = crops.loc[crops["status"] == "ok", ["image", "face_index"]]
    nodes = faces.merge(ok, on=["image", "face_index"])
    nodes = nodes[nodes["image"].isin(set(unclaimed))].reset_index(drop=True)
    nodes = nodes[nodes["image"].map(lambda r: images[r]["duplicate_of"] is None)]
    nodes = nodes.reset_index(drop=True)
    if nodes.empty:
        return [], set()
    found = identity_pairs(
        np.stack(nodes["embedding"].to_numpy()),
        nodes["image"].tolist(),
        [images[r]["sha256"] for r in nodes["image"]],
        params.faces.same_person,
        settings.near_duplicate,
        settings.max_references,
        settings.max_pairs_per_identity,
    )
    candidates, used = [], set()
    for start, end, refs, sim in found:
        s, e = nodes.iloc[start], nodes.iloc[end]
        candidates.append(
            PairCandidate(
                layout="auto_identity",
                source=f"auto_identity:similarity={sim:.3f}",
                start=s["image"],
                end=e["image"],
                references=[nodes.iloc[r]["image"] for r in refs],
                start_face=int(s["face_index"]),
                end_face=int(e["face_index"]),
                reference_faces=[int(nodes.iloc[r]["face_index"]) for r in refs],
            )
        )
        used.update([s["image"], e["image"]] + [nodes.iloc[r]["image"] for r in refs])
    return candidates, used


def made_candidates(made: list[MadeFolder]) -> tuple[list[PairCandidate], set[str]]:
    """The synthesized pairs of each folder, and the photos they were made from."""
    out, sources = [], set()
    for folder in made:
        for row in folder.pairs():
            out.append(
                PairCandidate(
                    layout="synthesis",
                    source=f"synthesis:{folder.kind}:{row['pair']}",
                    start=folder.key(row["start"]),
                    end=folder.key(row["end"]),
                    references=[folder.key(r) for r in row["references"]],
                    caption=row["caption"],
                    caption_source=f"synthesis:{folder.kind}",
                )
            )
            sources.add(row["source"]["image"])
            sources.update(r["image"] for r in row["reference_sources"])
    return out, sources


def _image_rows(frame: pd.DataFrame) -> dict[str, dict]:
    images = {r["image"]: r for r in frame.to_dict("records")}
    for r in images.values():  # pandas gives NaN for missing strings
        for k in ("sha256", "duplicate_of", "reason"):
            r[k] = r[k] if isinstance(r[k], str) else None
    return images


def build_index(
    raw_dir: str | Path,
    images_path: str | Path,
    faces_path: str | Path,
    crops_path: str | Path,
    params: Params,
    made: list[MadeFolder] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(index, rejected): one row per candidate pair; one row per rejected pair or file.
    `made`: synthesis folders whose pairs join the layouts' (their photos count as used)."""
    images = _image_rows(read_table(images_path, IMAGES))
    raw_images = set(images)
    for folder in made:
        images.update(_image_rows(folder.images()))
    found: Discovery = discover(raw_dir, params.pairs.sources, params.images.extensions)
    synthesized, made_from = made_candidates(list(made))
    found.candidates.extend(synthesized)
    rejected = [_reject(r["reason"], image=r["image"]) for r in found.rejected]
    claimed = {r["image"] for r in found.rejected} | made_from
    rows, seen_content = [], {}
    for c in found.candidates:
        claimed.update([c.start, c.end, *c.references, *([c.mask] if c.mask else [])])
        reason = _check_files(c, images)
        if reason is None:
            content = (
                images[c.start]["sha256"],
                images[c.end]["sha256"],
                tuple(images[r]["sha256"] for r in c.references),
            )
            if content in seen_content:
                reason = f"duplicate of pair {seen_content[content]} (same image contents)"
            else:
                seen_content[content] = pair_id(c)
        if reason:
            rejected.append(_reject(reason, c))
        else:
            rows.append(c)
    unclaimed = sorted(raw_images - claimed)
    if params.pairs.auto_identity.enabled and unclaimed:
        faces = read_table(faces_path, FACES)
        crops = read_table(crops_path, CROPS)
        auto, used = _identity_candidates(unclaimed, faces, crops, images, params)
        rows.extend(auto)
        why = "no other photo of the same person with a usable face (pairs.auto_identity)"
        for rel in unclaimed:
            if rel not in used and images[rel]["status"] == "ok":
                rejected.append(_reject(why, image=rel))
    else:
        hint = "not part of any pair (no _start/_end name, control folder or manifest row)"
        for rel in unclaimed:
            if images[rel]["status"] == "ok":
                rejected.append(_reject(hint, image=rel))
    index = pd.DataFrame(
        [
            {
                **asdict(c),
                "pair_id": pair_id(c),
                "start_sha256": images[c.start]["sha256"],
                "end_sha256": images[c.end]["sha256"],
            }
            for c in rows
        ],
        columns=INDEX.names,
    )
    index = index.sort_values("pair_id", kind="stable").reset_index(drop=True)
    rejected_frame = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    return index, rejected_frame


def write_index(
    index: pd.DataFrame, rejected: pd.DataFrame, out: str | Path, rejected_out: str | Path
) -> None:
    write_parquet(out, pa.Table.from_pandas(index, schema=INDEX, preserve_index=False))
    write_csv(rejected_out, rejected)
    log.info("pair index: %d candidates, %d rejected", len(index), len(rejected))

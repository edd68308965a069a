"""Hold out a validation split of pairs, seeded and grouped so nothing leaks into training.

Pairs are grouped (by identity: start faces clustered by embedding; or by start photo; or not
at all), groups that share a photo are joined (with a synthesized pair, the photos it was made
from), and whole groups go to validation, chosen by a seeded hash of the group's key. A pair's
side therefore does not change when unrelated pairs are added to the data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from facelora.config import Params
from facelora.io.atomic import write_parquet
from facelora.io.datasets import write_kontext_dataset
from facelora.io.tables import FACES, frame_records, read_table
from facelora.prepare.pairs.identity import UnionFind, cluster_identities
from facelora.prepare.synthesis.made import MadeFolder


def trainable_pairs(pairs_path: str | Path, captions_path: str | Path) -> pd.DataFrame:
    """Usable pairs with an accepted caption, sorted by pair_id."""
    pairs = read_table(pairs_path)
    captions = read_table(captions_path)
    captions = captions.loc[captions["status"] == "ok", ["pair_id", "caption", "change"]]
    usable = pairs[pairs["status"] == "ok"].drop(columns=["caption"])
    return usable.merge(captions, on="pair_id").sort_values("pair_id").reset_index(drop=True)


def _made_photos(made: list[MadeFolder]) -> dict[str, set[str]]:
    """Each synthesized image -> the photos its pair was made from (source and references)."""
    out: dict[str, set[str]] = {}
    for folder in made:
        for row in folder.pairs():
            photos = {row["source"]["image"], *(r["image"] for r in row["reference_sources"])}
            for file in (row["start"], row["end"], *row["references"]):
                out[folder.key(file)] = photos
    return out


def _photos(pair, made_photos: dict[str, set[str]]) -> set[str]:
    found: set[str] = set()
    refs = getattr(pair, "references", None)
    images = [pair.start, getattr(pair, "end", None), *(refs if refs is not None else [])]
    for image in images:
        if isinstance(image, str):
            found |= made_photos.get(image, {image})
    return found


def _joined(keys: list[str], photo_sets: list[set[str]]) -> list[str]:
    """Pairs that share a photo end in one group (a pair made from photo X never sits on
    the other side from X's own pairs), named by their smallest key."""
    uf = UnionFind(len(keys))
    first: dict[str, int] = {}
    for i, photos in enumerate(photo_sets):
        for photo in photos:
            uf.union(i, first.setdefault(photo, i))
    for i, key in enumerate(keys):  # equal keys are one group already
        uf.union(i, first.setdefault("key:" + key, i))
    names: dict[int, str] = {}
    for i, key in enumerate(keys):
        root = uf.find(i)
        names[root] = min(names.get(root, key), key)
    return [names[uf.find(i)] for i in range(len(keys))]


def _group_keys(
    pairs: pd.DataFrame, faces_path: str | Path, params: Params, made: list[MadeFolder]
) -> list[str]:
    how = params.split.group_by
    if how == "none":
        return pairs["pair_id"].tolist()
    made_photos = _made_photos(made)
    photo_sets = [_photos(row, made_photos) for row in pairs.itertuples()]
    if how == "image":
        return _joined(pairs["start_sha256"].tolist(), photo_sets)
    tables = [read_table(faces_path, FACES), *(m.faces() for m in made)]
    faces = pd.concat(tables, ignore_index=True).set_index(["image", "face_index"])["embedding"]
    embeddings = []
    for row in pairs.itertuples():
        image, face = (
            (row.start, row.start_face) if pd.notna(row.start_face) else (row.end, row.end_face)
        )
        embeddings.append(np.asarray(faces.loc[(image, int(face))], np.float32))
    labels = cluster_identities(np.stack(embeddings), params.faces.same_person)
    # name each identity group by its first start photo: stable when unrelated data is added
    first = pd.Series(pairs["start"].to_numpy()).groupby(labels).transform("min")
    return _joined(first.tolist(), photo_sets)


def _unit_hash(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16**15


def assign_split(
    pairs: pd.DataFrame, faces_path: str | Path, params: Params, made: list[MadeFolder] = ()
) -> pd.DataFrame:
    """A group goes to validation when its seeded hash falls below the fraction, so adding
    data never moves an existing group; min_validation tops up with the lowest hashes.
    `made`: the synthesis folders (their faces group synthesized pairs by person too)."""
    keys = _group_keys(pairs, faces_path, params, list(made)) if len(pairs) else []
    frame = pd.DataFrame({"pair_id": pairs["pair_id"], "group": keys, "split": "train"})
    groups = sorted(set(keys), key=lambda k: _unit_hash(params.seed, k))
    fraction = params.split.validation_fraction
    chosen = {g for g in groups if _unit_hash(params.seed, g) < fraction}
    sizes = frame["group"].value_counts()
    for group in groups:
        if sum(sizes[g] for g in chosen) >= params.split.min_validation:
            break
        chosen.add(group)
    if groups and len(chosen) == len(groups):  # always keep a group for training
        chosen.discard(groups[-1])
    frame.loc[frame["group"].isin(chosen), "split"] = "validation"
    return frame


def run_split(
    pairs_path,
    captions_path,
    faces_path,
    out_path,
    validation_dir,
    params: Params,
    *,
    pairs_dir,
    made: list[MadeFolder] = (),
) -> dict:
    """The split table, and the validation pairs as a phase folder (their crops are under
    `pairs_dir`, where the pairs table's paths point)."""
    pairs = trainable_pairs(pairs_path, captions_path)
    split = assign_split(pairs, faces_path, params, made)
    write_parquet(out_path, split)
    val = pairs.merge(split[split["split"] == "validation"][["pair_id"]], on="pair_id")
    write_kontext_dataset(validation_dir, frame_records(val), Path(pairs_dir))
    return {
        "train": int((split["split"] == "train").sum()),
        "validation": len(val),
        "groups": int(split["group"].nunique()),
    }

"""Hold out a validation split of pairs, seeded and grouped so nothing leaks into training.

Pairs are grouped (by identity: start faces clustered by embedding; or by start photo; or not
at all) and whole groups go to validation, chosen by a seeded hash of the group's key. A pair's
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
from facelora.prepare.pairs.identity import cluster_identities


def trainable_pairs(pairs_path: str | Path, captions_path: str | Path) -> pd.DataFrame:
    """Usable pairs with an accepted caption, sorted by pair_id."""
    pairs = read_table(pairs_path)
    captions = read_table(captions_path)
    captions = captions.loc[captions["status"] == "ok", ["pair_id", "caption", "change"]]
    usable = pairs[pairs["status"] == "ok"].drop(columns=["caption"])
    return usable.merge(captions, on="pair_id").sort_values("pair_id").reset_index(drop=True)


def _group_keys(pairs: pd.DataFrame, faces_path: str | Path, params: Params) -> list[str]:
    how = params.split.group_by
    if how == "none":
        return pairs["pair_id"].tolist()
    if how == "image":
        return pairs["start_sha256"].tolist()
    faces = read_table(faces_path, FACES).set_index(["image", "face_index"])["embedding"]
    embeddings = []
    for row in pairs.itertuples():
        image, face = (
            (row.start, row.start_face) if pd.notna(row.start_face) else (row.end, row.end_face)
        )
        embeddings.append(np.asarray(faces.loc[(image, int(face))], np.float32))
    labels = cluster_identities(np.stack(embeddings), params.faces.same_person)
    # name each identity group by its first start photo: stable when unrelated data is added
    first = pd.Series(pairs["start"].to_numpy()).groupby(labels).transform("min")
    return first.tolist()


def _unit_hash(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16**15


def assign_split(pairs: pd.DataFrame, faces_path: str | Path, params: Params) -> pd.DataFrame:
    """A group goes to validation when its seeded hash falls below the fraction, so adding
    data never moves an existing group; min_validation tops up with the lowest hashes."""
    keys = _group_keys(pairs, faces_path, params) if len(pairs) else []
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
    pairs_path, captions_path, faces_path, out_path, validation_dir, params: Params, *, pairs_dir
) -> dict:
    """The split table, and the validation pairs as a phase folder (their crops are under
    `pairs_dir`, where the pairs table's paths point)."""
    pairs = trainable_pairs(pairs_path, captions_path)
    split = assign_split(pairs, faces_path, params)
    write_parquet(out_path, split)
    val = pairs.merge(split[split["split"] == "validation"][["pair_id"]], on="pair_id")
    write_kontext_dataset(validation_dir, frame_records(val), Path(pairs_dir))
    return {
        "train": int((split["split"] == "train").sum()),
        "validation": len(val),
        "groups": int(split["group"].nunique()),
    }

"""Identity grouping and automatic pairing of different photos of the same person."""

import numpy as np
import pandas as pd
import pytest

from facelora.config import validate_params
from facelora.prepare.pairs.identity import cluster_identities, identity_pairs

from helpers import run_data_half


def _people(n_people=4, photos=3, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, 64))
    emb = np.repeat(centres, photos, axis=0) + noise * rng.normal(size=(n_people * photos, 64))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, np.repeat(np.arange(n_people), photos)


def test_clusters_recover_people_in_any_block_size():
    emb, people = _people()
    for block in (1, 5, 2048):
        labels = cluster_identities(emb, 0.9, block=block)
        for p in range(4):
            assert len(set(labels[people == p])) == 1
        assert len(set(labels)) == 4


def test_pairs_stay_within_a_person_and_skip_duplicates():
    emb, people = _people(photos=3)
    images = [f"img{i}.jpg" for i in range(len(emb))]
    contents = [f"sha{i}" for i in range(len(emb))]
    contents[1] = contents[0]  # photo 1 is a byte copy of photo 0
    found = identity_pairs(emb, images, contents, 0.9, 0.999, 1, 50)
    assert found
    for start, end, refs, sim in found:
        assert people[start] == people[end] and all(people[r] == people[end] for r in refs)
        assert contents[start] != contents[end] and start != end
        assert sim >= 0.9
        assert len(refs) <= 1


def test_max_pairs_per_identity():
    emb, _ = _people(n_people=1, photos=10)
    found = identity_pairs(
        emb, [str(i) for i in range(10)], [str(i) for i in range(10)], 0.9, 0.999, 0, 3
    )
    assert len(found) == 3


@pytest.mark.shared_faces
def test_auto_identity_pairs_real_photos_of_the_same_person(tmp_path, shared_faces):
    raw = tmp_path / "raw"
    people = ["obama", "biden", "lennon", "rose_leslie", "alex_lacamoire"]
    for person in people:
        for photo in (shared_faces / "same_person" / person).iterdir():
            (raw / person).mkdir(parents=True, exist_ok=True)
            (raw / person / photo.name).write_bytes(photo.read_bytes())
    (raw / "obama" / "copy_of_obama.jpg").write_bytes((raw / "obama" / "obama.jpg").read_bytes())
    params = validate_params(
        {
            "pairs": {"auto_identity": {"enabled": True, "max_references": 1}},
            "crop": {"min_side": 128},
            "split": {"min_validation": 0, "validation_fraction": 0.0},
        }
    )
    results = run_data_half(raw, tmp_path / "results", params)
    pairs = pd.read_parquet(results / "pairs" / "pairs.parquet")
    usable = pairs[pairs["status"] == "ok"]
    assert len(usable) >= 6
    assert (usable["layout"] == "auto_identity").all()
    for row in usable.itertuples():
        person = row.start.split("/")[0]
        assert row.end.split("/")[0] == person
        assert all(r.split("/")[0] == person for r in row.references)
        assert {row.start, row.end} != {"obama/obama.jpg", "obama/copy_of_obama.jpg"}
        assert row.identity_sim >= 0.92
    captions = pd.read_parquet(results / "captions" / "captions.parquet")
    assert (captions["caption"] == "EDITFACE keep the same person, new photo").all()

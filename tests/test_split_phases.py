"""Validation split and phase selection."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facelora.config import PhaseParams, validate_params
from facelora.io.datasets import read_manifest
from facelora.prepare.phases import PhaseEmpty, select_phase
from facelora.prepare.split import assign_split


def _pairs(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "pair_id": [f"p{i:012x}" for i in range(n)],
            "start": [f"person{i // 2}/a.jpg" for i in range(n)],
            "start_sha256": [f"sha{i // 2}" for i in range(n)],
            "skin_delta_e": rng.uniform(0, 10, n),
            "quality": rng.uniform(0, 1, n),
            "bg_ssim": np.where(np.arange(n) % 5 == 0, np.nan, rng.uniform(0.5, 1, n)),
        }
    )


def _split(pairs, **split):
    params = validate_params({"split": {"group_by": "image", **split}, "seed": 7})
    return assign_split(pairs, None, params)


def test_split_is_seeded_grouped_and_sized():
    pairs = _pairs()
    a = _split(pairs, validation_fraction=0.2)
    b = _split(pairs, validation_fraction=0.2)
    assert a.equals(b)
    val = a[a["split"] == "validation"]
    assert 2 <= len(val) <= 12  # about 20% of 20, in whole groups
    # both pairs that share a start photo are on the same side
    assert a.groupby("group")["split"].nunique().max() == 1


def test_split_is_stable_when_data_is_added():
    pairs = _pairs(20)
    before = _split(pairs, validation_fraction=0.2).set_index("pair_id")["split"]
    more = pd.concat([pairs, _pairs(40, seed=1).iloc[20:]], ignore_index=True)
    after = _split(more, validation_fraction=0.2).set_index("pair_id")["split"]
    # every pair keeps its side: adding data does not reshuffle the evaluation set
    assert (after.loc[before.index] == before).all()


def test_no_validation_when_asked_and_never_everything():
    pairs = _pairs(4)
    assert (_split(pairs, validation_fraction=0.0, min_validation=0)["split"] == "train").all()
    topped_up = _split(_pairs(6), validation_fraction=0.0, min_validation=3)
    assert (topped_up["split"] == "validation").sum() == 4  # two whole groups of 2
    one_group = pairs.assign(start_sha256="same")
    assert (_split(one_group, validation_fraction=0.5)["split"] == "train").all()


def test_filters_let_missing_scores_through_and_top_ranks():
    pairs = _pairs()
    phase = PhaseParams(
        name="x",
        steps=1,
        filters={"bg_ssim": {"min": 0.8}},
        top={"by": "skin_delta_e", "fraction": 0.5},
    )
    chosen, stats = select_phase(pairs, phase)
    kept = pairs[(pairs["bg_ssim"] >= 0.8) | pairs["bg_ssim"].isna()]
    assert stats["after_filters"] == len(kept)
    assert len(chosen) == int(np.ceil(len(kept) / 2))
    # lower skin difference is better: the chosen ones are the smallest
    assert chosen["skin_delta_e"].max() <= kept["skin_delta_e"].sort_values().iloc[len(chosen) - 1]


def test_top_k_and_explicit_order():
    pairs = _pairs()
    phase = PhaseParams(name="x", steps=1, top={"by": "quality", "k": 3})
    chosen, _ = select_phase(pairs, phase)
    assert list(chosen["quality"]) == sorted(pairs["quality"], reverse=True)[:3]
    phase = PhaseParams(name="x", steps=1, top={"by": "quality", "k": 3, "order": "ascending"})
    chosen, _ = select_phase(pairs, phase)
    assert list(chosen["quality"]) == sorted(pairs["quality"])[:3]


def test_an_empty_phase_is_an_error_that_says_what_to_change():
    phase = PhaseParams(name="strict", steps=1, filters={"quality": {"min": 2.0}})
    with pytest.raises(PhaseEmpty, match="phase 'strict' selected 0 of 20.*loosen"):
        select_phase(_pairs(), phase)


def test_phase_folders_of_the_sample_data(demo_results):
    split = pd.read_parquet(demo_results / "split" / "split.parquet")
    validation = set(split.loc[split["split"] == "validation", "pair_id"])
    assert validation
    assert {m["pair_id"] for m in read_manifest(demo_results / "validation")} == validation
    for folder in [demo_results / "validation", *(demo_results / "phases").iterdir()]:
        for m in read_manifest(folder):  # the loss regions of training: the end's landmarks
            side = Image.open(folder / m["end"]).width
            points = np.array(m["end_landmarks"])
            assert points.shape == (5, 2) and (points > 0).all() and (points < side).all()
    sizes = []
    for phase in ("broad", "skin_match", "best_quality"):
        folder = demo_results / "phases" / phase
        manifest = read_manifest(folder)
        info = json.loads((folder / "phase.json").read_text())
        assert info["selected"] == len(manifest)
        ids = {m["pair_id"] for m in manifest}
        assert not ids & validation  # held-out pairs never train
        for m in manifest:
            for name in [m["start"], m["end"], *m["references"]]:
                assert (folder / name).is_file()
            caption = (folder / f"{m['pair_id']}.txt").read_text().strip()
            assert caption == m["caption"] and caption.startswith("EDITFACE ")
        sizes.append(len(manifest))
    assert sizes[0] > sizes[1] > sizes[2] >= 1  # broad first, then narrower
    second = json.loads((demo_results / "phases" / "skin_match" / "phase.json").read_text())
    assert second["previous_phase"] == "broad" and second["init_from"] == "best"
    assert second["steps"] == 4000


def test_photos_without_pairs_end_in_words_not_a_traceback(tmp_path, sample_raw):
    """Plain photos (no pair layout): the pair step scores an empty index (it crashed on the
    empty table before); the phases are written empty with the reason (what to set), the data
    summary reports it, and training such a phase stops with that reason."""
    from facelora.config import Params
    from facelora.errors import SettingsError
    from facelora.prepare.summary import format_summary, write_summary
    from facelora.registry.layout import Layout
    from facelora.train.data import read_phase

    from helpers import run_data_half

    raw = tmp_path / "raw"
    raw.mkdir()
    for i, photo in enumerate(sorted((sample_raw / "kontext").glob("*_start.jpg"))[:3]):
        (raw / f"photo{i}.jpg").write_bytes(photo.read_bytes())
    params = Params()
    run_data_half(raw, tmp_path / "results", params)
    layout = Layout(str(tmp_path / "results"))
    assert pd.read_parquet(layout.pairs()).empty
    reasons = pd.read_csv(layout.pairs_rejected())["reason"]
    assert len(reasons) == 3 and reasons.str.contains("not part of any pair").all()
    broad = Path(layout.phase_dir("broad"))
    info = json.loads((broad / "phase.json").read_text())
    assert info["selected"] == 0 and "no training pairs to select from" in info["empty"]
    assert "pairs.auto_identity.enabled" in info["empty"] and not read_manifest(broad)
    summary = write_summary(
        layout.root, params, tmp_path / "s.json", tmp_path / "f.png", tmp_path / "c.png"
    )
    text = format_summary(summary)
    assert "phase broad is EMPTY" in text
    assert "what to change:" in text and "synthesis.kinds" in text
    with pytest.raises(SettingsError, match="no training pairs to select from"):
        read_phase(broad, 64, 3)

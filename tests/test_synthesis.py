"""Synthesized pairs: the standalone command on real photos, and the pairs in the data half.

The filters and masks themselves are tested in test_synthesis_degrade.py; the API backends
against real local HTTP servers in test_synthesis_api.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from facelora.config import validate_params
from facelora.prepare.pairs.layouts import discover_kontext
from facelora.prepare.synthesis.degrade import apply_degradations
from facelora.prepare.synthesis.made import MadeFolder, read_manifest
from facelora.registry.layout import Layout

from helpers import BIN, run_data_half

SMALL_CROPS = {"crop": {"min_side": 128}}  # the shared photos are web-sized


def _params_file(tmp: Path, **sections) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({**SMALL_CROPS, **sections}))
    return path


def _synthesize(kind: str, photos: Path, out: Path, params: Path) -> subprocess.CompletedProcess:
    command = ["--params", str(params), "synthesize", kind, str(photos), "--out", str(out)]
    return subprocess.run(
        [str(BIN / "facelora"), *command],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def people(shared_faces, tmp_path_factory) -> Path:
    """Photos of several people, 2-4 each, in one flat folder (person__file)."""
    flat = tmp_path_factory.mktemp("people")
    for person in sorted((shared_faces / "same_person").iterdir()):
        for photo in sorted(person.iterdir()):
            shutil.copy(photo, flat / f"{person.name}__{photo.name}")
    return flat


@pytest.fixture(scope="module")
def restored(people, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("restoration")
    params = _params_file(tmp, synthesis={"restoration": {"per_pair": 3}})
    done = _synthesize("restoration", people, tmp / "out", params)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "out", params


def test_restoration_alone_writes_a_kontext_folder_with_provenance(restored, people):
    out, _ = restored
    rows = list(read_manifest(out / "manifest.jsonl"))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 10, [r.get("reason") for r in rows if r["status"] != "ok"]
    for row in ok:
        start, end = _rgb(out / row["start"]), _rgb(out / row["end"])
        assert start.shape == end.shape and start.shape[0] == start.shape[1]  # aligned crops
        assert not np.array_equal(start, end)
        # the degradation recorded is the one applied: re-applying it to the end (the clean
        # crop) gives the start exactly
        assert np.array_equal(apply_degradations(end, row["degradations"]), start)
        assert len({s["name"] for s in row["degradations"]}) == 3
        assert row["source"]["image"] in {p.name for p in people.iterdir()}
        assert (out / f"{row['pair']}.txt").read_text().strip() == row["caption"]
        assert row["caption"].startswith("EDITFACE restore the ")
        start_bytes = (out / row["start"]).read_bytes()
        assert row["sha256"]["start"] == hashlib.sha256(start_bytes).hexdigest()
    # any tool that reads the Kontext layout finds exactly these pairs
    found = discover_kontext(out, out, {".png"})
    assert sorted(c.start for c in found.candidates) == sorted(r["start"] for r in ok)
    assert not found.rejected


def test_restoration_is_deterministic(restored, people, tmp_path):
    """Same photos, settings and seed: the same bytes, file for file."""
    out, params = restored
    again = _synthesize("restoration", people, tmp_path / "again", params)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _digest(tmp_path / "again") == _digest(out)
    # another seed draws other degradations
    other = _params_file(tmp_path, seed=7, synthesis={"restoration": {"per_pair": 3}})
    assert _synthesize("restoration", people, tmp_path / "seed7", other).returncode == 0
    a = {r["source"]["image"]: r["degradations"] for r in read_manifest(out / "manifest.jsonl")}
    b = {
        r["source"]["image"]: r["degradations"]
        for r in read_manifest(tmp_path / "seed7" / "manifest.jsonl")
    }
    assert a.keys() == b.keys() and a != b


def test_swap_references_are_the_same_person_and_never_the_same_photo(people, tmp_path):
    params = _params_file(tmp_path, synthesis={"kinds": ["swap"], "variations": 2})
    done = _synthesize("swap", people, tmp_path / "swap", params)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(read_manifest(tmp_path / "swap" / "manifest.jsonl"))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 8
    person = lambda image: image.split("__")[0]  # noqa: E731
    for row in ok:
        (ref,) = row["reference_sources"]
        assert person(ref["image"]) == person(row["source"]["image"])
        assert ref["sha256"] != row["source"]["sha256"] and ref["image"] != row["source"]["image"]
        start = _rgb(tmp_path / "swap" / row["start"])
        end = _rgb(tmp_path / "swap" / row["end"])
        reference = _rgb(tmp_path / "swap" / row["references"][0])
        assert not np.array_equal(start, end)
        # outside the region the photo's own pixels remain; the face is replaced
        assert (start == end).all(axis=2).mean() > 0.05
        centre = slice(start.shape[0] * 2 // 5, start.shape[0] * 3 // 5)
        assert np.abs(start[centre, centre].astype(int) - end[centre, centre]).mean() > 20
        assert not np.array_equal(reference, end)
    # sources without a second photo of the person are left out with the reason
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all("no other photo of the same person" in r["reason"] for r in skipped)
    assert pd.read_csv(tmp_path / "swap" / "failed.csv").shape[0] == len(skipped)


def test_no_usable_face_says_what_to_change(tmp_path, shared_faces):
    params = _params_file(tmp_path)
    done = _synthesize("restoration", shared_faces / "no_face", tmp_path / "out", params)
    assert done.returncode == 2
    assert "no usable face crop" in done.stderr and "Traceback" not in done.stderr


def test_synthesized_pairs_join_the_data_half(sample_raw, tmp_path):
    """restoration + swap pairs are scored, captioned, split and selected like any pair; two
    shards give the same folders as one; a pair never leaves its source photo's side."""
    params = validate_params({"synthesis": {"kinds": ["restoration", "swap"]}})
    one = run_data_half(sample_raw, tmp_path / "one", params, shards=1)
    two = run_data_half(sample_raw, tmp_path / "two", params, shards=2)
    L1, L2 = Layout(str(one)), Layout(str(two))
    for kind in ("restoration", "swap"):
        assert _digest(Path(L1.synthesis_dir(kind))) == _digest(Path(L2.synthesis_dir(kind)))
    assert pd.read_parquet(L1.pairs()).equals(pd.read_parquet(L2.pairs()))
    pairs = pd.read_parquet(L1.pairs())
    made = pairs[pairs["layout"] == "synthesis"]
    assert set(made["status"]) == {"ok"}
    assert made["source"].str.startswith("synthesis:restoration").sum() >= 10
    assert made["source"].str.startswith("synthesis:swap").sum() >= 1
    assert made["geometry"].eq("made").all() and made["identity_sim"].notna().all()
    swaps = made[made["source"].str.startswith("synthesis:swap")]
    assert swaps["reference_crops"].map(len).min() == 1
    # restoration keeps the person: a degraded crop still embeds close to the clean one
    assert made.loc[made["source"].str.contains("restoration"), "identity_sim"].median() > 0.9
    captions = pd.read_parquet(L1.captions()).set_index("pair_id")
    assert captions.loc[made["pair_id"], "status"].eq("ok").all()
    # the split keeps every pair made from one photo on the same side as the photo's own pairs
    split = pd.read_parquet(L1.split()).set_index("pair_id")["split"]
    source_of = {}
    for folder in (MadeFolder.at(L1.synthesis_dir(k)) for k in ("restoration", "swap")):
        for row in folder.pairs():
            source_of[folder.key(row["end"])] = row["source"]["image"]
    sides: dict[str, set] = {}
    for row in pairs[pairs["status"] == "ok"].itertuples():
        photo = source_of.get(row.end, row.start)
        if row.pair_id in split.index:
            sides.setdefault(photo, set()).add(split[row.pair_id])
    assert sides and all(len(s) == 1 for s in sides.values())
    # phases take them: the broad phase holds synthesized pairs
    manifest = (Path(L1.phase_dir("broad")) / "manifest.jsonl").read_text()
    assert "restore the" in manifest


# --- the edit kind against a real local API server -----------------------------------------


def _edit_params(tmp: Path, api, backend: str, **generator) -> Path:
    url = api.openai_url if backend == "openai" else api.url
    settings = {
        "backend": backend,
        "model": "gpt-image-1" if backend == "openai" else "gemini-2.5-flash-image",
        "base_url": url,
        "api_key_env": "FACELORA_TEST_KEY",
        "size": 256,
        "retries": 1,
        **generator,
    }
    return _params_file(
        tmp,
        synthesis={
            "kinds": ["edit"],
            "instructions": {
                "categories": {"smile": "make the person smile {intensity}"},
                "intensities": {"slight": "slightly", "strong": "broadly"},
            },
            "generator": settings,
        },
    )


@pytest.fixture
def api(monkeypatch):
    from api_servers import FakeApi

    with FakeApi() as server:
        monkeypatch.setenv("FACELORA_TEST_KEY", server.key)
        yield server


@pytest.fixture(scope="module")
def two_people(shared_faces, tmp_path_factory) -> Path:
    flat = tmp_path_factory.mktemp("two_people")
    for person in ("obama", "biden"):
        for photo in sorted((shared_faces / "same_person" / person).iterdir()):
            shutil.copy(photo, flat / f"{person}__{photo.name}")
    return flat


@pytest.mark.parametrize("backend", ["openai", "gemini"])
def test_edit_pairs_from_an_api_and_a_rerun_asks_nothing(api, two_people, tmp_path, backend):
    params = _edit_params(tmp_path, api, backend)
    out = tmp_path / "edit"
    done = _synthesize("edit", two_people, out, params)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_manifest(out / "manifest.jsonl") if r["status"] == "ok"]
    crops = {r["source"]["image"] for r in rows}
    assert len(rows) == 2 * len(crops) >= 4  # every crop x (slight, strong)
    assert {r["instruction"] for r in rows} == {
        "make the person smile slightly",
        "make the person smile broadly",
    }
    for row in rows:
        assert row["generator"] == backend and row["request_key"]
        assert row["caption"] == f"EDITFACE {row['instruction']}"
        start, end = _rgb(out / row["start"]), _rgb(out / row["end"])
        assert end.shape == start.shape  # the answer, brought to the crop's size
        assert not np.array_equal(start, end)
        assert "FACELORA_TEST_KEY" not in json.dumps(row) and api.key not in json.dumps(row)
    sent = api.count()
    assert sent == len(rows)
    before = _digest(out)
    again = _synthesize("edit", two_people, out, params)  # a rerun into the same folder
    assert again.returncode == 0 and api.count() == sent  # every answer came from the cache
    assert _digest(out) == before


def test_edit_budget_stops_cleanly_and_a_larger_one_finishes(api, two_people, tmp_path):
    params = _edit_params(tmp_path, api, "openai", max_requests=2)
    out, cache = tmp_path / "edit", tmp_path / "cache"
    command = ["--params", str(params), "synthesize", "edit", str(two_people)]
    command += ["--out", str(out), "--cache", str(cache)]
    first = subprocess.run([str(BIN / "facelora"), *command], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = list(read_manifest(out / "manifest.jsonl"))
    assert sum(r["status"] == "ok" for r in rows) == 2 and api.count() == 2
    not_run = [r for r in rows if r["status"] == "failed"]
    assert not_run and all("max_requests" in r["reason"] for r in not_run)
    assert "max_requests" in first.stderr  # says how far it got
    more = _edit_params(tmp_path, api, "openai", max_requests=100)
    command[1] = str(more)
    second = subprocess.run([str(BIN / "facelora"), *command], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = list(read_manifest(out / "manifest.jsonl"))
    assert all(r["status"] == "ok" for r in rows)
    assert api.count() == len(rows)  # the two finished ones were not asked again


def test_edit_with_a_missing_key_variable_names_it(api, two_people, tmp_path, monkeypatch):
    monkeypatch.delenv("FACELORA_TEST_KEY")
    done = _synthesize("edit", two_people, tmp_path / "x", _edit_params(tmp_path, api, "openai"))
    assert done.returncode == 2 and "FACELORA_TEST_KEY" in done.stderr
    assert "Traceback" not in done.stderr and api.count() == 0


def test_vlm_scores_reach_the_pairs_and_a_filter_on_them_changes_a_phase(api, sample_raw, tmp_path):
    """The rubric's scores become pair columns vlm_<name>; a phase filter on one keeps only
    the pairs that pass; the composite quality takes them in; a rerun asks nothing again."""
    scorer = {
        "backend": "openai",
        "model": "a-vlm",
        "base_url": api.openai_url,
        "api_key_env": "FACELORA_TEST_KEY",
        "other_pairs": True,
    }
    phases = [{"name": "broad", "steps": 2}]
    settings = {"synthesis": {"kinds": ["restoration"], "scorer": scorer}, "phases": phases}
    results = run_data_half(sample_raw, tmp_path / "scored", validate_params(settings))
    L = Layout(str(results))
    pairs = pd.read_parquet(L.pairs())
    ok = pairs[pairs["status"] == "ok"]
    names = ["vlm_instruction_success", "vlm_identity_kept", "vlm_artifacts", "vlm_intensity"]
    assert set(names) <= set(pairs.columns) and "vlm_description" in pairs.columns
    made = ok[ok["layout"] == "synthesis"]
    other = ok[ok["layout"] != "synthesis"]
    assert made[names].notna().all().all() and other[names].notna().all().all()
    assert made["vlm_identity_kept"].between(1, 5).all()
    assert made["vlm_description"].str.startswith("changed").all()
    manifest = list(read_manifest(L.synthesis_manifest("restoration")))
    assert all(r["scores"]["vlm_identity_kept"] for r in manifest if r["status"] == "ok")
    sent = api.count()
    assert sent == len(made) + len(other)
    broad = json.loads((Path(L.phase_dir("broad")) / "phase.json").read_text())
    # a phase filter on a VLM score (the same results folder: its caches answer)
    cut = float(ok["vlm_identity_kept"].median())
    filtered = [{"name": "broad", "steps": 2, "filters": {"vlm_identity_kept": {"min": cut}}}]
    weighted = {"vlm_identity_kept": 1.0}
    narrowed = validate_params(
        {**settings, "phases": filtered, "pairs": {"quality_weights": weighted}}
    )
    again = run_data_half(sample_raw, results, narrowed)
    assert api.count() == sent  # every answer came from the caches
    narrow = json.loads((Path(Layout(str(again)).phase_dir("broad")) / "phase.json").read_text())
    assert narrow["dropped_by_filter"]["vlm_identity_kept"] > 0
    assert 0 < narrow["selected"] < broad["selected"]
    assert narrow["score_means"]["vlm_identity_kept"] >= cut
    # quality is now the identity score mapped onto 0..1 by the rubric's range
    scored = pd.read_parquet(Layout(str(again)).pairs())
    scored = scored[scored["status"] == "ok"]
    expected = (scored["vlm_identity_kept"] - 1) / 4
    assert np.allclose(scored["quality"], expected, atol=1e-4)
    # pairs.require on a VLM score, and the VLM's description as the caption
    scorer["caption_from_description"] = True
    gated = validate_params({**settings, "pairs": {"require": {"vlm_identity_kept": {"min": cut}}}})
    run_data_half(sample_raw, results, gated)
    assert api.count() == sent
    pairs = pd.read_parquet(L.pairs())
    below = pairs[pairs["vlm_identity_kept"] < cut]
    assert len(below) and set(below["status"]) == {"rejected"}
    assert below["reason"].str.contains("pairs.require.vlm_identity_kept.min").all()
    captions = pd.read_parquet(L.captions())
    described = captions[captions["source"] == "vlm_description"]
    assert len(described) == (pairs["status"] == "ok").sum()
    assert described["caption"].str.match(r"^EDITFACE changed \d").all()


def test_a_vlm_score_outside_the_rubric_is_refused():
    with pytest.raises(Exception, match="not in synthesis.scorer.rubric"):
        validate_params(
            {
                "synthesis": {"scorer": {"backend": "openai", "model": "m"}},
                "pairs": {"require": {"vlm_sharpness": {"min": 3}}},
            }
        )
    with pytest.raises(Exception, match="set synthesis.scorer.backend"):
        validate_params({"pairs": {"require": {"vlm_identity_kept": {"min": 3}}}})


def test_score_rates_a_folder_with_a_local_vlm(restored, tmp_path):
    """`facelora score DIR` with the transformers backend: every usable pair gets the
    rubric's scores in range, under the schema, from the local model; a rerun is cached."""
    from helpers import build_tiny_qwen2_5_vl

    model = build_tiny_qwen2_5_vl(tmp_path / "vlm", "hub")
    folder = tmp_path / "pairs"
    shutil.copytree(restored[0], folder)
    rubric = {
        "sharpness": {"min": 1, "max": 5, "question": "How sharp is the after image?"},
        "identity_kept": {"min": 0, "max": 1, "question": "Same person?"},
    }
    scorer = {"backend": "transformers", "model": str(model), "rubric": rubric}
    params = _params_file(tmp_path, synthesis={"scorer": {**scorer, "max_new_tokens": 8}})
    command = [str(BIN / "facelora"), "--params", str(params), "score", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_manifest(folder / "manifest.jsonl") if r["status"] == "ok"]
    assert rows and all(set(r["scores"]) >= {"vlm_sharpness", "vlm_identity_kept"} for r in rows)
    assert all(1 <= r["scores"]["vlm_sharpness"] <= 5 for r in rows)
    assert all(0 <= r["scores"]["vlm_identity_kept"] <= 1 for r in rows)
    first = (folder / "manifest.jsonl").read_text()
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and "cached" in again.stderr
    assert (folder / "manifest.jsonl").read_text() == first


def test_plain_photos_get_phase_datasets_by_one_setting(sample_raw, tmp_path):
    """A folder of ordinary photos (no pairs): with synthesis.kinds: [restoration] every
    phase gets training pairs, captioned with the fix."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, photo in enumerate(sorted((sample_raw / "kontext").glob("*_start.jpg"))):
        (raw / f"photo{i}.jpg").write_bytes(photo.read_bytes())
    phases = [{"name": "broad", "steps": 2}, {"name": "best", "steps": 2, "init_from": "best"}]
    phases[1]["top"] = {"by": "quality", "fraction": 0.5}
    params = validate_params({"synthesis": {"kinds": ["restoration"]}, "phases": phases})
    L = Layout(str(run_data_half(raw, tmp_path / "results", params)))
    for name in ("broad", "best"):
        info = json.loads((Path(L.phase_dir(name)) / "phase.json").read_text())
        assert info["selected"] >= 1 and not info["empty"]
    captions = (Path(L.phase_dir("broad")) / "manifest.jsonl").read_text()
    assert "EDITFACE restore the" in captions

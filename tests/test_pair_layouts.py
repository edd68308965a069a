"""Reading before/after pairs in every layout, with every unpaired file given a reason."""

import json

import numpy as np
import pytest
from PIL import Image

from facelora.config import PairSource
from facelora.prepare.pairs.layouts import discover

EXT = [".jpg", ".jpeg", ".png", ".webp"]


def img(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def reasons(found):
    return {r["image"]: r["reason"] for r in found.rejected}


def test_kontext_layout(tmp_path):
    for name in [
        "01_start.png",
        "01_start2.png",
        "01_start3.jpg",
        "01_end.png",
        "sub/02_start.jpg",
        "sub/02_end.jpg",
        "03_start.png",
        "04_end.png",
        "05_start5.png",
        "05_start.png",
        "05_end.png",
        "06_start.png",
        "06_start.jpg",
        "06_end.png",
        "plain.png",
    ]:
        img(tmp_path / name)
    (tmp_path / "01.txt").write_text("EDITFACE open the eyes wider\n")
    found = discover(tmp_path, [PairSource(layout="kontext")], EXT)
    pairs = {c.start: c for c in found.candidates}
    assert set(pairs) == {"01_start.png", "sub/02_start.jpg"}
    first = pairs["01_start.png"]
    assert first.end == "01_end.png"
    assert first.references == ["01_start2.png", "01_start3.jpg"]
    assert first.caption == "EDITFACE open the eyes wider"
    assert first.caption_source == "sidecar:01.txt"
    assert pairs["sub/02_start.jpg"].caption is None  # missing caption: decided later
    why = reasons(found)
    assert why["03_start.png"] == "unpaired: no 03_end image beside it"
    assert why["04_end.png"] == "unpaired: no 04_start image beside it"
    assert why["05_start5.png"].startswith("unknown role(s) start5")
    assert why["06_start.jpg"].startswith("ambiguous pair 06")
    assert "plain.png" not in why  # not Kontext-named: left for the identity pairing


def test_folders_layout(tmp_path):
    for name in [
        "ds/target/a.png",
        "ds/control/a.jpg",
        "ds/control2/a.png",
        "ds/target/b.png",
        "ds/control/b.png",
        "ds/target/only_target.png",
        "ds/control/only_control.png",
        "ds/control2/stray_ref.png",
    ]:
        img(tmp_path / name)
    (tmp_path / "ds/target/a.txt").write_text("EDITFACE smile")
    (tmp_path / "ds/b.txt").write_text("EDITFACE frown")
    source = PairSource(layout="folders", path="ds", controls=["control", "control2"])
    found = discover(tmp_path, [source], EXT)
    pairs = {c.end: c for c in found.candidates}
    assert pairs["ds/target/a.png"].start == "ds/control/a.jpg"
    assert pairs["ds/target/a.png"].references == ["ds/control2/a.png"]
    assert pairs["ds/target/a.png"].caption == "EDITFACE smile"
    assert pairs["ds/target/b.png"].caption == "EDITFACE frown"
    assert pairs["ds/target/b.png"].references == []
    why = reasons(found)
    assert why["ds/target/only_target.png"] == "unpaired: no image named only_target in control/"
    assert why["ds/control/only_control.png"] == "unpaired: no image named only_control in target/"
    assert why["ds/control2/stray_ref.png"] == "unpaired: no image named stray_ref in target/"


def test_folders_layout_without_target_folder(tmp_path):
    img(tmp_path / "ds/control/a.png")
    found = discover(tmp_path, [PairSource(layout="folders", path="ds")], EXT)
    assert not found.candidates
    assert "target/ not found" in found.rejected[0]["reason"]


def test_jsonl_manifest(tmp_path):
    for name in ["m/in/a.png", "m/out/a.png", "m/ref/a.png", "m/in/b.png", "m/out/b.png"]:
        img(tmp_path / name)
    img(tmp_path.parent / "outside.png")
    rows = [
        {
            "start": "in/a.png",
            "end": "out/a.png",
            "references": ["ref/a.png"],
            "caption": "EDITFACE  add   glasses",
        },
        {"start": "in/b.png", "end": "out/b.png"},
        {"start": "in/missing.png", "end": "out/a.png"},
        {"start": "../../outside.png", "end": "out/a.png"},
        {"end": "out/a.png"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "m/pairs.jsonl").write_text("\n".join(lines) + "\n")
    found = discover(tmp_path, [PairSource(layout="manifest", path="m/pairs.jsonl")], EXT)
    assert [(c.start, c.end) for c in found.candidates] == [
        ("m/in/a.png", "m/out/a.png"),
        ("m/in/b.png", "m/out/b.png"),
    ]
    first = found.candidates[0]
    assert first.references == ["m/ref/a.png"]
    assert first.caption == "EDITFACE add glasses" and first.caption_source == "manifest"
    why = reasons(found)
    assert why["manifest:m/pairs.jsonl:3"].startswith("start file not found")
    assert why["manifest:m/pairs.jsonl:4"] == "start ../../outside.png is outside the raw folder"
    assert why["manifest:m/pairs.jsonl:5"] == "no start given"
    assert why["manifest:m/pairs.jsonl:6"].startswith("line 6 is not valid JSON")


def test_csv_manifest_with_references(tmp_path):
    for name in ["a.png", "b.png", "r1.png", "r2.png"]:
        img(tmp_path / name)
    (tmp_path / "pairs.csv").write_text(
        "start,end,references,caption\na.png,b.png,r1.png|r2.png,EDITFACE smile\n"
    )
    found = discover(tmp_path, [PairSource(layout="manifest", path="pairs.csv")], EXT)
    (pair,) = found.candidates
    assert pair.references == ["r1.png", "r2.png"] and pair.caption == "EDITFACE smile"


def test_missing_manifest_file(tmp_path):
    found = discover(tmp_path, [PairSource(layout="manifest", path="nope.csv")], EXT)
    assert found.rejected == [{"image": "nope.csv", "reason": "manifest file not found"}]


def test_auto_finds_all_layouts_at_once(tmp_path):
    img(tmp_path / "k/x_start.png")
    img(tmp_path / "k/x_end.png")
    img(tmp_path / "f/target/y.png")
    img(tmp_path / "f/control/y.png")
    img(tmp_path / "f/target/z_start.png")  # inside a folder set: not a Kontext file
    img(tmp_path / "f/control/z_start.png")
    img(tmp_path / "m/a.png")
    img(tmp_path / "m/b.png")
    (tmp_path / "m/pairs.csv").write_text("start,end\na.png,b.png\n")
    (tmp_path / "notes.csv").write_text("name,value\nx,1\n")  # not a manifest
    found = discover(tmp_path, [PairSource()], EXT)
    layouts = sorted((c.layout, c.start) for c in found.candidates)
    assert layouts == [
        ("folders", "f/control/y.png"),
        ("folders", "f/control/z_start.png"),
        ("kontext", "k/x_start.png"),
        ("manifest", "m/a.png"),
    ]
    assert not found.rejected


@pytest.mark.parametrize("name", ["Zoë 01", "with space", "日本"])
def test_odd_names_in_kontext(tmp_path, name):
    img(tmp_path / f"{name}_start.png")
    img(tmp_path / f"{name}_end.png")
    (tmp_path / f"{name}.txt").write_text("EDITFACE smile")
    (pair,) = discover(tmp_path, [PairSource(layout="kontext")], EXT).candidates
    assert pair.start == f"{name}_start.png" and pair.caption == "EDITFACE smile"

"""The per-shard listings of paths.raw: every file in exactly one shard, in scan order, and a
listing rewritten only when one of its own files changed (what reruns that shard's jobs)."""

import json
import os

import pytest

from facelora.config import Params
from facelora.errors import MissingInput
from facelora.io.sharding import shard_of
from facelora.prepare import listing as listing_module
from facelora.prepare.faces.detect import detect_shard
from facelora.prepare.images import scan_images
from facelora.prepare.listing import read_listing, write_listings

IMAGES = Params().images


def make_raw(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    return root


NAMES = [f"people/{i:03d}.jpg" for i in range(40)] + ["odd/scan.tiff", "odd/a.png"]


def listings(tmp_path, raw, shards):
    folder = tmp_path / "listing"
    stats = write_listings(
        raw, IMAGES, shards, lambda i: folder / f"{i}.jsonl", folder / "sidecars.jsonl"
    )
    return folder, stats


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jsonl")}


def test_every_file_is_listed_once_in_its_shard_in_scan_order(tmp_path):
    raw = make_raw(tmp_path / "raw", [*NAMES, "people/000.txt", ".git/x.jpg"])
    folder, stats = listings(tmp_path, raw, 4)
    scanned = [(rel, str(path), reason) for rel, path, reason in scan_images(raw, IMAGES)]
    got = []
    for shard in range(4):
        rows = read_listing(folder / f"{shard}.jsonl", raw)
        assert all(shard_of(rel, 4) == shard for rel, _, _ in rows)
        assert rows == [s for s in scanned if shard_of(s[0], 4) == shard]
        got += rows
    assert sorted(got) == sorted(scanned) and stats.photos == len(scanned) == 42
    reasons = {rel: reason for rel, _, reason in got}
    assert reasons["odd/scan.tiff"].startswith("unsupported file type .tiff")
    lines = (folder / "sidecars.jsonl").read_text(encoding="utf-8").splitlines()
    sidecars = [json.loads(line)[0] for line in lines]
    assert sidecars == ["people/000.txt"]


def test_a_listing_is_rewritten_only_when_its_own_photos_change(tmp_path):
    raw = make_raw(tmp_path / "raw", NAMES)
    folder, first = listings(tmp_path, raw, 4)
    assert first.rewritten == 4
    before = mtimes(folder)
    _, again = listings(tmp_path, raw, 4)
    assert again.rewritten == 0 and mtimes(folder) == before

    changed = raw / "people/007.jpg"
    changed.write_bytes(b"a new picture, longer than before")
    _, after = listings(tmp_path, raw, 4)
    now = mtimes(folder)
    moved = {name for name in now if now[name] != before[name]}
    assert after.rewritten == 1 and moved == {f"{shard_of('people/007.jpg', 4)}.jsonl"}

    (raw / "people/007.txt").write_text("a caption")  # a sidecar: only the sidecars' listing
    listings(tmp_path, raw, 4)
    later = mtimes(folder)
    assert {name for name in later if later[name] != now[name]} == {"sidecars.jsonl"}


def test_names_that_are_not_utf8_are_listed_with_their_reason(tmp_path):
    raw = make_raw(tmp_path / "raw", NAMES[:3])
    for name in (b"caf\xe9.jpg", b"caf\xe9.txt"):
        (raw / os.fsdecode(name)).write_bytes(b"x")
    folder, stats = listings(tmp_path, raw, 1)
    rows = {rel: reason for rel, _, reason in read_listing(folder / "0.jsonl", raw)}
    assert rows["caf\\xe9.jpg"] == "file name is not valid UTF-8: rename the file"
    assert stats.photos == 4 and stats.sidecars == 1
    sidecar = (folder / "sidecars.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)[0] for line in sidecar] == ["caf\\xe9.txt"]


def test_a_touched_photo_reruns_its_shard_like_an_edited_one(tmp_path):
    raw = make_raw(tmp_path / "raw", NAMES)
    listings(tmp_path, raw, 2)
    photo = raw / "people/003.jpg"
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _, stats = listings(tmp_path, raw, 2)
    assert stats.rewritten == 1


def test_spilling_in_chunks_gives_the_same_listings(tmp_path, monkeypatch):
    raw = make_raw(tmp_path / "raw", NAMES)
    whole, _ = listings(tmp_path / "whole", raw, 3)
    monkeypatch.setattr(listing_module, "SPILL_EVERY", 5)
    chunked, _ = listings(tmp_path / "chunked", raw, 3)
    for shard in range(3):
        name = f"{shard}.jsonl"
        assert (whole / name).read_bytes() == (chunked / name).read_bytes()


def test_fewer_shards_remove_the_stale_listings(tmp_path):
    raw = make_raw(tmp_path / "raw", NAMES)
    folder, _ = listings(tmp_path, raw, 5)
    listings(tmp_path, raw, 2)
    left = sorted(p.name for p in folder.glob("*.jsonl"))
    assert left == ["0.jsonl", "1.jsonl", "sidecars.jsonl"]
    assert not list(folder.glob(".spill*"))


def test_a_missing_folder_lists_nothing_and_detect_says_where_the_photos_go(tmp_path):
    folder, stats = listings(tmp_path, tmp_path / "nowhere", 2)
    assert stats.photos == 0 and (folder / "0.jsonl").read_text() == ""
    with pytest.raises(MissingInput, match="paths.raw"):
        detect_shard(
            tmp_path / "nowhere",
            tmp_path / "f.parquet",
            tmp_path / "i.parquet",
            Params(),
            (0, 2),
            listing=folder / "0.jsonl",
        )


def test_a_cluster_job_does_not_list_the_folder_again(tmp_path):
    """A Slurm job re-reads the Snakefile only to run its rule: the planning run listed."""
    from facelora.config import validate_params
    from facelora.registry.layout import Layout
    from facelora.workflow.rules import list_raw

    raw = make_raw(tmp_path / "raw", NAMES)
    params = validate_params({"paths": {"raw": str(raw), "results": str(tmp_path / "results")}})
    layout = Layout(params.paths.results)
    list_raw(params, layout, in_job=True)
    assert not (tmp_path / "results").exists()
    list_raw(params, layout, in_job=False)
    assert len(read_listing(layout.raw_listing(0), raw)) + len(
        read_listing(layout.raw_listing(1), raw)
    ) == len(NAMES)

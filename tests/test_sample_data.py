"""The demo dataset: built from installed packages only, deterministic, all layouts."""

from facelora.prepare.sample_data import build_sample_data


def test_sample_data_is_deterministic(tmp_path, sample_raw):
    build_sample_data(tmp_path / "again")
    first = {
        p.relative_to(sample_raw): p.read_bytes() for p in sample_raw.rglob("*") if p.is_file()
    }
    second = {
        p.relative_to(tmp_path / "again"): p.read_bytes()
        for p in (tmp_path / "again").rglob("*")
        if p.is_file()
    }
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_sample_data_has_every_layout_and_bad_input(sample_raw):
    assert list((sample_raw / "kontext").glob("*_start.jpg"))
    assert list((sample_raw / "folders" / "target").glob("*.jpg"))
    assert (sample_raw / "manifest" / "pairs.jsonl").is_file()
    assert (sample_raw / "kontext" / "astronaut_warm_start2.jpg").is_file()  # a face reference
    assert (sample_raw / "bad" / "empty.jpg").stat().st_size == 0
    assert any("–" in p.name for p in sample_raw.rglob("*"))  # unicode and spaces in names

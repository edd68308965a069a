"""The facelora command: standalone use and errors a user can act on (no tracebacks)."""

import subprocess
from pathlib import Path

import pandas as pd

from helpers import BIN


def facelora(*args, cwd):
    return subprocess.run([str(BIN / "facelora"), *args], cwd=cwd, capture_output=True, text=True)


def test_help_lists_every_step(tmp_path):
    out = facelora("--help", cwd=tmp_path)
    for command in (
        "sample-data",
        "detect",
        "crop",
        "pair-index",
        "pair",
        "gather",
        "caption",
        "split",
        "select",
        "summary",
        "params",
        "apply",
    ):
        assert command in out.stdout


def test_detect_standalone_writes_the_tables_beside_the_output(tmp_path, sample_raw):
    photos = tmp_path / "photos"
    photos.mkdir()
    for rel in ("kontext/astronaut_glasses_start.jpg", "bad/empty.jpg"):
        (photos / Path(rel).name).write_bytes((sample_raw / rel).read_bytes())
    (tmp_path / "params.yaml").write_text("{}\n")
    out = facelora("detect", "photos", "--out", "out/faces.parquet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    faces = pd.read_parquet(tmp_path / "out" / "faces.parquet")
    rejected = pd.read_csv(tmp_path / "out" / "rejected.csv")
    assert list(faces["image"]) == ["astronaut_glasses_start.jpg"]
    assert list(rejected["image"]) == ["empty.jpg"]
    assert (tmp_path / "out" / "images.parquet").is_file()


def test_bad_params_give_one_message_and_exit_code_2(tmp_path):
    (tmp_path / "params.yaml").write_text("crop:\n  padding: -3\n")
    out = facelora("params", cwd=tmp_path)
    assert out.returncode == 2
    assert "crop.padding" in out.stderr and "Traceback" not in out.stderr


def test_missing_params_file(tmp_path):
    out = facelora("params", cwd=tmp_path)
    assert out.returncode == 2 and "params.yaml: not found" in out.stderr


def test_bad_shard_and_unknown_phase(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    out = facelora("detect", ".", "--out", "f.parquet", "--shard", "3/2", cwd=tmp_path)
    assert out.returncode == 2 and "0 <= INDEX < COUNT" in out.stderr
    out = facelora(
        "select",
        "nope",
        "--pairs",
        "p",
        "--captions",
        "c",
        "--split",
        "s",
        "--out-dir",
        "o",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "no phase named 'nope'" in out.stderr


def test_missing_model_names_the_setting(tmp_path):
    (tmp_path / "params.yaml").write_text(
        f"faces:\n  backend: insightface\n  insightface:\n    root: {tmp_path / 'none'}\n"
    )
    (tmp_path / "photos").mkdir()
    out = facelora("detect", "photos", "--out", "f.parquet", cwd=tmp_path)
    assert out.returncode == 2
    assert "faces.insightface" in out.stderr and "Traceback" not in out.stderr


def test_sample_data_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "mine.jpg").write_bytes(b"x")
    out = facelora("sample-data", "raw", cwd=tmp_path)
    assert out.returncode == 2 and "not empty" in out.stderr
    assert (tmp_path / "raw" / "mine.jpg").read_bytes() == b"x"


def test_plan_prints_the_lora_size_from_a_config(tmp_path):
    import json

    from facelora.models.real_configs import QWEN_IMAGE_CONFIG

    (tmp_path / "config.json").write_text(json.dumps(QWEN_IMAGE_CONFIG))
    out = facelora("plan", "config.json", "--ranks", "64", "--presets", "full", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("qwen_image_edit"))
    assert "849.6" in row and " 64 " in row and " 38.1 " in row  # frozen bf16 GiB
    fp8 = facelora("plan", "config.json", "--ranks", "64", "--quantize", "fp8", cwd=tmp_path)
    row = next(line for line in fp8.stdout.splitlines() if line.startswith("qwen_image_edit  full"))
    assert " 19.1 fp8 " in row  # the blocks' Linear weights at one byte each
    bad = facelora("plan", "config.json", "--ranks", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "--ranks" in bad.stderr

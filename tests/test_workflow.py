"""End to end: the Snakemake workflow and the DVC stage on the sample data, for real."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from facelora.config import validate_params

from conftest import ROOT, run_data_half

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
OUTPUTS = ["faces", "crops", "pairs", "captions", "split", "validation", "phases", "summary"]
TRAINED = [
    "train/broad/checkpoints",
    "train/skin_match/checkpoints",
    "train/best_quality/checkpoints",
]


def run(cmd, cwd, check=True, **kw):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# the demo's settings with short training phases, so the whole workflow runs in a test
SHORT_PHASES = [
    {"name": "broad", "steps": 8, "init_from": "none"},
    {
        "name": "skin_match",
        "steps": 6,
        "init_from": "best",
        "filters": {"skin_delta_e": {"max": 8.0}},
        "top": {"by": "skin_delta_e", "fraction": 0.5},
    },
    {
        "name": "best_quality",
        "steps": 4,
        "init_from": "best",
        "top": {"by": "quality", "fraction": 0.25},
    },
]


def make_project(dest: Path, raw: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ["Snakefile", "dvc.yaml", "environment.yml"]:
        shutil.copy(ROOT / name, dest / name)
    settings = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings["phases"] = SHORT_PHASES
    settings["lora"]["rank"] = 4
    settings["train"]["save_every"] = 4
    (dest / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    shutil.copytree(ROOT / "rules", dest / "rules")
    shutil.copytree(
        ROOT / "src" / "facelora",
        dest / "src" / "facelora",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(raw, dest / "data" / "raw")
    return dest


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_same_outputs(a: Path, b: Path, names=OUTPUTS) -> None:
    for name in names:
        left, right = tree(a / name), tree(b / name)
        assert set(left) == set(right), name
        different = [k for k in left if left[k] != right[k]]
        assert not different, f"{name}: {different[:5]}"


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory, sample_raw):
    project = make_project(tmp_path_factory.mktemp("sm") / "project", sample_raw)
    run([str(BIN / "snakemake"), "--cores", "2"], project)
    return project


def test_snakemake_runs_the_data_half(snakemake_project):
    results = snakemake_project / "results"
    for name in [
        "faces/faces.parquet",
        "faces/rejected.csv",
        "crops/crops.parquet",
        "pairs/pairs.parquet",
        "captions/captions.parquet",
        "split/split.parquet",
        "summary/summary.json",
        "summary/funnel.png",
        "summary/scores.png",
    ]:
        assert (results / name).is_file(), name
    for phase in ("broad", "skin_match", "best_quality"):
        assert (results / "phases" / phase / "manifest.jsonl").is_file()
        summary = json.loads((results / "train" / phase / "train.json").read_text())
        steps = {"broad": 8, "skin_match": 6, "best_quality": 4}[phase]
        assert summary["steps"] == steps and summary["checkpoints"]
        assert (results / "train" / phase / "loss.png").is_file()
    second = json.loads((results / "train" / "skin_match" / "train.json").read_text())
    assert second["init_lora"].endswith(
        "broad/checkpoints/step-000008/pytorch_lora_weights.safetensors"
    )
    # shard tables stay (a changed photo reruns only its shard), inside the DVC-tracked folders
    assert len(list((results / "faces" / "shards").glob("*.faces.parquet"))) == 2
    logs = snakemake_project / "logs"
    assert (logs / "detect" / "0.log").is_file() and (logs / "select" / "broad.log").is_file()


def test_a_second_run_has_nothing_to_do(snakemake_project):
    out = run([str(BIN / "snakemake"), "--cores", "2", "-n"], snakemake_project)
    assert "Nothing to be done" in out.stdout + out.stderr


def test_changing_one_photo_reruns_only_its_shard(snakemake_project):
    raw = snakemake_project / "data" / "raw"
    photo = raw / "manifest" / "after" / "t1_person4_lips.jpg"
    photo.write_bytes(photo.read_bytes() + b"\0")  # new content, same picture
    out = run([str(BIN / "snakemake"), "--cores", "2", "-n", "--quiet", "rules"], snakemake_project)
    counts = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts.get("detect") == 1, out.stdout
    assert counts.get("gather_faces") == 1


def test_config_overrides_are_refused(snakemake_project):
    out = run([str(BIN / "snakemake"), "-n", "--config", "lr=0.1"], snakemake_project, check=False)
    assert out.returncode != 0
    assert "edit it there (or use dvc exp run -S key=value)" in out.stdout + out.stderr


def test_dvc_repro_gives_the_same_outputs(tmp_path, sample_raw, snakemake_project):
    project = make_project(tmp_path / "dvc", sample_raw)
    (project / ".gitignore").write_text("/data/raw\n/results\n/logs\n.snakemake/\n")
    run(["git", "init", "-q"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)
    run([str(BIN / "dvc"), "init", "-q"], project)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], project)
    run([str(BIN / "dvc"), "repro"], project)
    # the model the demo trains is made by the workflow itself (a tiny random model)
    assert (project / "results" / "models" / "tiny-qwen_image_edit" / "model_index.json").is_file()
    # compare with a clean Snakemake run (the shared project had a photo changed since)
    fresh = make_project(tmp_path / "sm", sample_raw)
    run([str(BIN / "snakemake"), "--cores", "2"], fresh)
    assert_same_outputs(project / "results", fresh / "results", OUTPUTS + TRAINED)
    status = run([str(BIN / "dvc"), "status"], project)
    assert "up to date" in status.stdout
    # lr is a training setting: an experiment retrains, the data half stays put
    exp = run([str(BIN / "dvc"), "exp", "run", "-S", "lr=5e-5"], project)
    text = exp.stdout + exp.stderr
    assert "Stage 'prepare' didn't change" in text and "Running stage 'train'" in text
    metrics = run([str(BIN / "dvc"), "metrics", "show"], project)
    assert "funnel.pairs_usable" in metrics.stdout


def test_sharded_and_unsharded_runs_are_identical(tmp_path, sample_raw):
    one = run_data_half(sample_raw, tmp_path / "one", validate_params({}), shards=1)
    three = run_data_half(sample_raw, tmp_path / "three", validate_params({}), shards=3)
    assert_same_outputs(one, three, OUTPUTS[:-1])


def test_snakemake_lint_is_clean():
    out = run([str(BIN / "snakemake"), "--lint"], ROOT, check=False)
    text = out.stdout + out.stderr
    assert "Lints for" not in text, text
    assert out.returncode == 0, text


def test_snakefmt_is_clean():
    out = run([str(BIN / "snakefmt"), "--check", "Snakefile", "rules"], ROOT, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_funnel_counts_agree_with_the_tables(snakemake_project):
    results = snakemake_project / "results"
    import json

    summary = json.loads((results / "summary" / "summary.json").read_text())
    pairs = pd.read_parquet(results / "pairs" / "pairs.parquet")
    assert summary["funnel"]["pairs_usable"] == int((pairs["status"] == "ok").sum())
    assert summary["rejected"]["images"]
    assert filecmp.cmp(results / "summary" / "summary.json", results / "summary" / "summary.json")

"""A workflow killed with SIGKILL mid-run recovers with one command and keeps finished work."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import BIN, make_project

pytestmark = pytest.mark.slow


def facelora_snakemake(project: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(
        [str(BIN / "facelora"), "snakemake"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes every child with it
        **kw,
    )


def kill_when(process: subprocess.Popen, ready, timeout: float = 900) -> None:
    """SIGKILL the run's whole process group as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def recover(project: Path) -> str:
    again = facelora_snakemake(project)
    log = again.communicate(timeout=1800)[0]
    assert again.returncode == 0, log[-5000:]
    assert "removing the locks of a killed run" in log
    assert (project / "results" / "final" / "pytorch_lora_weights.safetensors").is_file()
    return log


def short_project(tmp_path: Path, sample_raw: Path, steps: int, save_every: int = 4) -> Path:
    project = make_project(tmp_path / "project", sample_raw)
    settings = yaml.safe_load((project / "params.yaml").read_text())
    settings["phases"] = settings["phases"][:1]
    settings["phases"][0]["steps"] = steps
    settings["train"]["save_every"] = save_every
    (project / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return project


def test_sigkill_during_the_data_steps_recovers_with_one_command(tmp_path, sample_raw):
    project = short_project(tmp_path, sample_raw, steps=4)
    faces = project / "results" / "faces" / "faces.parquet"
    first = facelora_snakemake(project)
    # pairing has started, so Snakemake has recorded detect and crop as finished
    kill_when(first, (project / "logs" / "pair_index.log").is_file)
    finished = faces.stat().st_mtime_ns
    assert not (project / "results" / "summary" / "summary.json").exists()
    recover(project)
    assert faces.stat().st_mtime_ns == finished  # the finished gather is not redone


def test_sigkill_during_training_recovers_with_one_command(tmp_path, sample_raw):
    # long enough to be killed mid-way; few checkpoints to evaluate afterwards
    project = short_project(tmp_path, sample_raw, steps=400, save_every=100)
    checkpoints = project / "results" / "train" / "broad" / "checkpoints"
    first = facelora_snakemake(project)
    kill_when(first, lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*")))
    assert any((project / ".snakemake" / "locks").iterdir())  # Snakemake's lock is left behind
    assert not (project / "results" / "train" / "broad" / "train.json").exists()
    faces = project / "results" / "faces" / "faces.parquet"
    finished = faces.stat().st_mtime_ns
    recover(project)
    assert faces.stat().st_mtime_ns == finished  # finished jobs are not redone
    summary = json.loads((project / "results" / "train" / "broad" / "train.json").read_text())
    assert summary["resumed"] and summary["steps"] == 400

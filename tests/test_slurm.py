"""The demo workflow through `snakemake --profile slurm` against a real Slurm scheduler.

Needs a running cluster: `scripts/slurm_local.sh start` (root) sets up a single-node one on
localhost; `.ci/run` does that and sets FACELORA_REQUIRE_SLURM=1, so in CI a missing cluster
fails this test instead of skipping it. What every job asked for is read back from Slurm
itself (`scontrol show job`, which keeps finished jobs for the cluster's MinJobAge).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import BIN, make_project

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DATA_RULES = {"detect", "gather_faces", "crop", "gather_crops", "pair_index", "pair"}
DATA_RULES |= {"gather_pairs", "caption", "split", "select_phase", "summary", "make_tiny_model"}
DATA_RULES |= {"synthesize", "gather_synthesis", "synthesis"}  # the demo's restoration pairs
CPU_RULES = DATA_RULES | {"choose", "choose_base", "eval_report", "final", "report_pages"}
GPU_RULES = {"train", "evaluate", "evaluate_base"}


def cluster_up() -> str | None:
    """None when a Slurm controller answers, else why not."""
    if shutil.which("sinfo") is None:
        return "no Slurm client here (scripts/slurm_local.sh start installs and starts one)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"no Slurm controller answers ({probe.stderr.strip()}): scripts/slurm_local.sh start"
    return None


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, sample_raw):
    why = cluster_up()
    if why:
        if os.environ.get("FACELORA_REQUIRE_SLURM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    project = make_project(tmp_path_factory.mktemp("slurm") / "project", sample_raw)
    settings = yaml.safe_load((project / "params.yaml").read_text())
    small = {"cpus": 1, "runtime": 30}  # fits a 2-core CI machine
    settings["resources"]["data"] = {**small, "gpus": 0, "mem_mb": 1500}
    settings["resources"]["train"] = {**small, "gpus": 1, "mem_mb": 3000, "nodes": 1}
    settings["resources"]["eval"] = {**small, "gpus": 1, "mem_mb": 2500}
    # scripts/slurm_local.sh makes two partitions on its one node: debug (default) and gpu
    settings["cluster"] = {"partition": "debug", "gpu_partition": "gpu"}
    (project / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--profile",
            "slurm",
            "--jobs",
            "4",
            "--slurm-init-seconds-before-status-checks",
            "1",
            "--seconds-between-status-checks",
            "2",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return project, settings


def slurm_jobs(workdir: Path) -> list[dict]:
    """Every job Slurm ran from `workdir` (finished ones included), as key=value fields."""
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, check=True
    ).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("WorkDir") == str(workdir):
            jobs.append(fields)
    return jobs


def test_every_rule_ran_as_a_slurm_job_with_its_resources(slurm_run):
    project, settings = slurm_run
    jobs = slurm_jobs(project)
    assert jobs, "Slurm has no record of this workflow's jobs"
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        rule = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        by_rule.setdefault(rule, []).append(job)
    assert set(by_rule) == CPU_RULES | GPU_RULES, sorted(by_rule)
    assert all(j["JobState"] == "COMPLETED" for j in jobs), [
        (j["Comment"], j["JobState"]) for j in jobs if j["JobState"] != "COMPLETED"
    ]
    assert len(by_rule["train"]) == len(settings["phases"]) == 3
    assert len(by_rule["detect"]) == settings["workflow"]["shards"]
    for rule, rule_jobs in by_rule.items():
        kind = "train" if rule == "train" else "eval" if rule in GPU_RULES else "data"
        for job in rule_jobs:
            gpu = "gres:gpu:1" in job.get("TresPerJob", "") or "gpu:1" in job.get("TresPerNode", "")
            assert gpu == (rule in GPU_RULES), (rule, job.get("TresPerJob"))
            assert job["Partition"] == ("gpu" if rule in GPU_RULES else "debug"), rule
            assert job["MinMemoryNode"] == f"{settings['resources'][kind]['mem_mb']}M", rule
            assert job["TimeLimit"] == "00:30:00", rule
            log = Path(job["StdOut"])
            assert log.is_file() and log.is_relative_to(project / ".snakemake" / "slurm_logs")


def test_the_slurm_run_made_the_whole_workflow(slurm_run):
    project, _ = slurm_run
    results = project / "results"
    for name in (
        "summary/summary.json",
        "eval/summary.json",
        "eval/phases/best_quality/best.json",
        "final/pytorch_lora_weights.safetensors",
        "final/README.md",
    ):
        assert (results / name).is_file(), name
    out = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "1", "-n"], cwd=project, capture_output=True, text=True
    )
    assert "Nothing to be done" in out.stdout + out.stderr


def test_dvc_repro_submits_through_slurm_by_a_setting(slurm_run, tmp_path, sample_raw):
    """workflow.profile: slurm makes `dvc repro`'s stages submit their jobs to Slurm."""
    _, settings = slurm_run  # the cluster is up (else skipped/failed there)
    project = make_project(tmp_path / "project", sample_raw)
    (project / "params.yaml").write_text(
        yaml.safe_dump({**settings, "workflow": {**settings["workflow"], "profile": "slurm"}})
    )
    with open(project / "slurm" / "config.yaml", "a") as profile:  # poll faster on localhost
        profile.write(
            "slurm-init-seconds-before-status-checks: 1\nseconds-between-status-checks: 2\n"
        )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
        return proc

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "repro", "prepare")
    rules = {
        j["Comment"].removeprefix("rule_").split("_wildcards_")[0] for j in slurm_jobs(project)
    }
    assert rules == DATA_RULES - {"make_tiny_model"}, sorted(rules)
    assert (project / "results" / "phases" / "broad" / "manifest.jsonl").is_file()

"""What Slurm jobs ask for, and how training starts on one or several nodes."""

import re
import sys
from types import SimpleNamespace

import pytest

from facelora.config import ParamsError, validate_params
from facelora.train.launch import first_host, launcher_argv, without_launch_options
from facelora.workflow.rules import job_resources, train_processes

PHASES = [
    {"name": "broad", "steps": 4},
    {"name": "fine", "steps": 2, "init_from": "best", "gpus": 4},
]


def evaluated(resources: dict, phase: str = "broad", attempt: int = 1) -> dict:
    """A rule's resources as Snakemake evaluates them for one job."""
    wildcards = SimpleNamespace(phase=phase)
    out = {}
    for key, value in resources.items():
        if callable(value):
            args = value.__code__.co_varnames[: value.__code__.co_argcount]
            value = value(wildcards, attempt) if "attempt" in args else value(wildcards)
        out[key] = value
    return out


def test_jobs_ask_for_gpus_per_phase_and_more_memory_on_each_retry():
    params = validate_params(
        {
            "phases": PHASES,
            "resources": {
                "train": {"gpus": 2, "mem_mb": 10000, "runtime": 100},
                "retry_growth": 2.0,
            },
        }
    )
    train = job_resources(params, "train")
    assert evaluated(train, "broad") == {"mem_mb": 10000, "runtime": 100, "gpu": 2}
    assert evaluated(train, "fine", attempt=3) == {"mem_mb": 40000, "runtime": 400, "gpu": 4}
    assert train_processes(params)(SimpleNamespace(phase="fine")) == 4
    data = evaluated(job_resources(params, "data"))
    assert "gpu" not in data and data["mem_mb"] == params.resources.data.mem_mb
    assert evaluated(job_resources(params, "eval"))["gpu"] == 1
    # nothing about partitions/accounts unless set: the cluster's defaults apply
    assert not {"slurm_partition", "slurm_account", "qos"} & set(train)


def test_partition_account_and_qos_come_from_params():
    params = validate_params(
        {
            "cluster": {"partition": "cpu", "gpu_partition": "a100", "account": "lab", "qos": "hi"},
            "resources": {"train": {"nodes": 2}},
        }
    )
    train, data = job_resources(params, "train"), job_resources(params, "data")
    assert train["slurm_partition"] == "a100" and data["slurm_partition"] == "cpu"
    assert job_resources(params, "eval")["slurm_partition"] == "a100"
    assert train["slurm_account"] == data["slurm_account"] == "lab" and data["qos"] == "hi"
    assert train["nodes"] == 2 and "nodes" not in data
    only_cpu = validate_params({"cluster": {"partition": "shared"}})
    assert job_resources(only_cpu, "train")["slurm_partition"] == "shared"
    with pytest.raises(ParamsError, match=r"resources.eval.nodes"):
        validate_params({"resources": {"eval": {"nodes": 2}}})


def test_phases_come_after_the_previous_one():
    params = validate_params({"phases": PHASES})
    assert [p.after for p in params.phases] == ["base", "broad"]
    with pytest.raises(ParamsError, match="base is reserved"):
        validate_params({"phases": [{"name": "base", "steps": 1}]})
    with pytest.raises(ParamsError, match=r"phases\[1\].after: 'base'.*must be 'broad'"):
        validate_params({"phases": [PHASES[0], {**PHASES[1], "after": "base"}]})


TRAIN = ["train", "broad", "--data", "d", "--processes", "4", "--nodes", "2", "--out", "o"]


def test_one_node_launches_accelerate_on_gpus_and_torchrun_on_cpus():
    assert without_launch_options(TRAIN) == ["train", "broad", "--data", "d", "--out", "o"]
    gpus = launcher_argv(4, 1, {}, True, TRAIN)
    assert gpus[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert gpus[gpus.index("--num_processes") + 1] == "4" and "--num_machines" not in gpus
    assert gpus[-6:] == ["train", "broad", "--data", "d", "--out", "o"]
    cpus = launcher_argv(2, 1, {}, False, TRAIN)
    assert cpus[2] == "torch.distributed.run" and "--standalone" in cpus


def test_several_nodes_start_one_launcher_per_node_with_slurm_rendezvous():
    with pytest.raises(RuntimeError, match="need a Slurm job"):
        launcher_argv(4, 2, {}, True, TRAIN)
    job = {"SLURM_JOB_ID": "123456", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    # the batch script: srun runs this same command once per node
    batch = launcher_argv(4, 2, job, True, TRAIN)
    assert batch[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert batch[-len(TRAIN) :] == TRAIN
    # inside the step, node 1: accelerate with 8 processes in all, meeting at the first node
    step = launcher_argv(4, 2, {**job, "SLURM_STEP_ID": "0", "SLURM_NODEID": "1"}, True, TRAIN)
    options = dict(zip(step[4:14:2], step[5:15:2], strict=True))
    assert options == {
        "--num_machines": "2",
        "--machine_rank": "1",
        "--num_processes": "8",
        "--main_process_ip": "gpu07",
        "--main_process_port": str(29500 + 456),
    }
    assert "--processes" not in step and step[-6:] == without_launch_options(TRAIN)
    assert first_host("node3,node4") == "node3"


def test_the_edit_kind_with_a_local_generator_is_a_gpu_job(tmp_path, sample_raw):
    """synthesize jobs: restoration on CPUs (resources.data), the edit kind with a diffusers
    generator on GPUs (resources.synthesis); with an API generator it is a CPU job too."""
    import subprocess

    import yaml

    from helpers import BIN, make_project

    project = make_project(tmp_path / "project", sample_raw)
    settings = yaml.safe_load((project / "params.yaml").read_text())
    settings["synthesis"].update(
        kinds=["restoration", "edit"],
        instructions=["make the person smile"],
        generator={"backend": "diffusers", "model": "/models/edit-pipeline"},
    )
    settings["resources"]["synthesis"] = {"gpus": 2, "cpus": 4, "mem_mb": 4321, "runtime": 60}

    def planned() -> str:
        (project / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        command = [str(BIN / "snakemake"), "-n", "--forceall", "synthesis", "--cores", "2"]
        done = subprocess.run(command, cwd=project, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    blocks = re.split(r"\n(?=\[|rule |localrule )", planned())
    jobs = [block for block in blocks if block.startswith("rule synthesize")]
    gpu = [b for b in jobs if "rule synthesize_on_gpu" in b]
    cpu = [b for b in jobs if "rule synthesize:" in b]
    assert gpu and all("kind=edit" in b and "gpu=2" in b and "mem_mb=4321" in b for b in gpu)
    assert cpu and all("kind=restoration" in b and "gpu=" not in b for b in cpu)
    settings["synthesis"]["generator"] = {"backend": "openai", "model": "gpt-image-1"}
    assert "synthesize_on_gpu" not in planned()

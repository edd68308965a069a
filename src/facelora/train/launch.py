"""How `facelora train --processes N [--nodes M]` starts its processes.

* one node, GPUs: `accelerate launch --multi_gpu --num_processes N` (the Trainer then wraps
  the model for DDP, or shards it with FSDP2 for train.distributed: fsdp);
* one node, no GPU: `torchrun --standalone --nproc_per_node N` with gloo (what the tests run);
* several nodes (a Slurm job with --nodes M): the batch script's process runs
  `srun --nodes M --ntasks-per-node 1` of this same command; on each node that task starts
  `accelerate launch --num_machines M --machine_rank $SLURM_NODEID` with N processes per node,
  rendezvousing at the job's first node (from SLURM_JOB_NODELIST) on a port derived from the
  job id, so two jobs sharing a node do not collide.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from facelora.errors import EnvironmentProblem

RENDEZVOUS_PORT_BASE = 29500


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`gpu[01-04],cpu7` -> `gpu01`)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # no scontrol here: expand the first entry by hand
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, ranges = head.split("[", 1)
        first = ranges.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def rendezvous_port(env: Mapping[str, str]) -> int:
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return RENDEZVOUS_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 1000


def without_launch_options(argv: list[str]) -> list[str]:
    """facelora's arguments minus --processes/--nodes (what each started process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--processes", "--nodes"):
            skip = True
        elif not arg.startswith(("--processes=", "--nodes=")):
            out.append(arg)
    return out


def launcher_argv(
    processes: int, nodes: int, env: Mapping[str, str], cuda: bool, argv: list[str]
) -> list[str]:
    """The argv that runs facelora's `argv` (as given, with --processes/--nodes) in every
    process: `processes` per node on `nodes` nodes."""
    python = [sys.executable, "-m"]
    command = without_launch_options(argv)
    if nodes > 1:
        if "SLURM_NODEID" not in env or "SLURM_JOB_NODELIST" not in env:
            raise EnvironmentProblem(
                f"resources.train.nodes = {nodes}: several nodes need a Slurm job "
                "(snakemake --profile slurm); run this step inside one, or set nodes: 1"
            )
        if "SLURM_STEP_ID" not in env or env.get("SLURM_STEP_ID") == "4294967294":
            # the batch script itself: start one task per node, each runs this again
            return [
                "srun",
                "--nodes",
                str(nodes),
                "--ntasks-per-node",
                "1",
                "--kill-on-bad-exit=1",
                *python,
                "facelora",
                *argv,
            ]
        return [
            *python,
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            str(nodes),
            "--machine_rank",
            env["SLURM_NODEID"],
            "--num_processes",
            str(processes * nodes),
            "--main_process_ip",
            first_host(env["SLURM_JOB_NODELIST"]),
            "--main_process_port",
            str(rendezvous_port(env)),
            "--module",
            "facelora",
            *command,
        ]
    if cuda:
        return [
            *python,
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--module",
            "facelora",
            *command,
        ]
    return [
        *python,
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "--module",
        "facelora",
        *command,
    ]

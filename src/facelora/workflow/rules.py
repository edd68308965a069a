"""Helpers the Snakefile uses: validated settings, the raw folder's listings, the CLI path.

Each detect shard depends on its listing of paths.raw (facelora.prepare.listing), rewritten
only when one of its photos changed, so changing one photo reruns one detect shard (and what
depends on it), not the whole data half, and planning does not grow with the photos.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from facelora.config import Params, ParamsError, load_params
from facelora.errors import EnvironmentProblem
from facelora.registry.layout import Layout
from facelora.workflow.declared import PHASE

PARAMS_FILE = "params.yaml"


def load_workflow_params(config: dict[str, Any], path: str = PARAMS_FILE) -> Params:
    """Validate params.yaml; refuse `snakemake --config` overrides the commands would not see."""
    params = load_params(path)
    on_disk = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if config != on_disk:
        changed = sorted(k for k in set(config) | set(on_disk) if config.get(k) != on_disk.get(k))
        raise ParamsError(
            f"snakemake --config/--configfile changed {', '.join(changed)}: every facelora "
            f"command reads {path}, so edit it there (or use dvc exp run -S key=value)"
        )
    return params


def put_cli_on_path() -> None:
    """Let rules call `facelora` from the environment running Snakemake, even when that
    virtualenv is not activated (`.venv/bin/snakemake ...`); jobs inherit PATH."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    if shutil.which("facelora") is None:
        raise EnvironmentProblem(
            f"the facelora command is not installed in {bin_dir}: pip install -e ."
        )


def list_raw(params: Params, layout: Layout, in_job: bool) -> None:
    """Bring the per-shard listings of paths.raw up to date (each planning run reads the
    folder once; facelora.prepare.listing). Not inside a cluster job, which re-reads the
    Snakefile only to run its own rule: the planning run listed the folder already."""
    if in_job:
        return
    from facelora.prepare.listing import write_listings

    write_listings(
        params.paths.raw,
        params.images,
        params.workflow.shards,
        layout.raw_listing,
        layout.raw_sidecars_listing(),
    )


def _setting(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def command_settings(params: Params, command: str):
    """A rule param: the settings `facelora COMMAND` declares it reads, as plain data, so that
    changing one of them reruns the rule (and only those). A `phase` key is the job's phase
    entry with the phase order (the whole list in a rule without a phase wildcard)."""
    from facelora.workflow.cli import reads_of

    keys = reads_of(command) or ()
    data = params.model_dump(mode="json")

    def value(wildcards) -> dict[str, Any]:
        out = {}
        for key in keys:
            if key == PHASE and hasattr(wildcards, "phase"):
                out[key] = {
                    "entry": params.phase(wildcards.phase).model_dump(mode="json"),
                    "order": params.phase_names,
                }
            elif key == PHASE:
                out[key] = data["phases"]
            else:
                out[key] = _setting(data, key)
        return out

    return value


def raw_folder(params: Params):
    """A rule param: the raw photos folder (the commands walk it themselves)."""
    return lambda wildcards: params.paths.raw


def previous_training(params: Params, layout: Layout):
    """A rule input: what this phase starts from: the previous phase's training, and its
    evaluated choice when init_from is best."""

    def inputs(wildcards) -> list[str]:
        phase = params.phase(wildcards.phase)
        names = params.phase_names
        position = names.index(phase.name)
        if position == 0 or phase.init_from not in ("best", "last"):
            return []
        previous = names[position - 1]
        found = [layout.train_summary(previous)]
        if phase.init_from == "best":
            found.append(layout.best(previous))
        return found

    return inputs


def eval_group_outputs(params: Params, layout: Layout):
    """A rule input: every evaluation job's table of one phase."""

    def inputs(wildcards) -> list[str]:
        groups = params.eval_groups(wildcards.phase)
        return [layout.eval_group_metrics(wildcards.phase, g) for g in range(len(groups))]

    return inputs


def all_eval_group_outputs(params: Params, layout: Layout) -> list[str]:
    """Every evaluation job's table of every phase (the report's inputs)."""
    return [
        layout.eval_group_metrics(phase, g)
        for phase in params.phase_names
        for g in range(len(params.eval_groups(phase)))
    ]


def job_resources(params: Params, kind: str) -> dict[str, Any]:
    """A rule's `resources` (unpacked with **): what its Slurm job asks for, from params.yaml
    `resources.<kind>` and `cluster`. Memory and runtime grow with each retry; train jobs ask
    for their phase's GPUs; partition, account and qos appear only when set."""
    job = getattr(params.resources, kind)
    growth = params.resources.retry_growth

    def grown(value: int):
        return lambda wildcards, attempt: round(value * growth ** (attempt - 1))

    out: dict[str, Any] = {"mem_mb": grown(job.mem_mb), "runtime": grown(job.runtime)}
    if kind == "train":
        out["gpu"] = lambda wildcards: params.train_gpus(wildcards.phase)
        if job.nodes > 1:
            out["nodes"] = job.nodes
    elif job.gpus:
        out["gpu"] = job.gpus
    cluster = params.cluster
    gpu_job = kind == "train" or job.gpus > 0
    partition = (cluster.gpu_partition or cluster.partition) if gpu_job else cluster.partition
    if partition:
        out["slurm_partition"] = partition
    if cluster.account:
        out["slurm_account"] = cluster.account
    if cluster.qos:
        out["qos"] = cluster.qos
    return out


def synthesis_kinds(params: Params, on_gpu: bool) -> str:
    """The `kind` wildcard's pattern for the synthesize jobs on GPUs (the edit kind with a
    local generator: resources.synthesis) or on CPUs (the rest: resources.data)."""
    local = params.synthesis.generator.backend == "diffusers"
    kinds = [k for k in params.synthesis.kinds if (k == "edit" and local) == on_gpu]
    return "|".join(kinds) or "-"  # "-" matches no kind


def train_processes(params: Params):
    """`facelora train --processes`: one per GPU of the phase's job (at least one)."""
    return lambda wildcards: max(1, params.train_gpus(wildcards.phase))


def folder(path: str):
    """A rule param: a results-layout folder the command writes into or reads from (passed as
    a function: the folder is the layout's, not a prefix derived from one of the rule's files)."""
    return lambda wildcards: path


def existing(path: str) -> list[str]:
    """`path` as an input when it exists, else none: the command then says what to put there
    (clearer than Snakemake's missing-input error)."""
    return [path] if os.path.exists(path) else []

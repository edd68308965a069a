"""Helpers the Snakefile uses: validated settings, per-shard input lists, the CLI path.

Snakemake tracks every raw file as an input of the shard that handles it, so changing one
photo reruns one detect shard (and what depends on it), not the whole data half.
"""

from __future__ import annotations

import os
import shutil
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from facelora.config import Params, ParamsError, load_params
from facelora.io.sharding import shard_of
from facelora.prepare.images import scan_images
from facelora.prepare.pairs.layouts import MANIFEST_SUFFIXES

PARAMS_FILE = "params.yaml"
SIDECAR_SUFFIXES = {".txt", *MANIFEST_SUFFIXES}


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
        raise RuntimeError(f"the facelora command is not installed in {bin_dir}: pip install -e .")


@cache
def _inventory(raw: str, extensions: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    from facelora.config import ImagesParams

    if not Path(raw).is_dir():
        return ()
    params = ImagesParams(extensions=list(extensions))
    return tuple((rel, str(path)) for rel, path, _ in scan_images(raw, params))


def raw_images(params: Params, shard: int | None = None) -> list[str]:
    """Image files under paths.raw (all, or those of one detect/crop shard)."""
    files = _inventory(params.paths.raw, tuple(params.images.extensions))
    count = params.workflow.shards
    return [p for rel, p in files if shard is None or shard_of(rel, count) == shard]


def raw_sidecars(params: Params) -> list[str]:
    """Caption and manifest files under paths.raw (inputs of the pair index)."""
    raw = Path(params.paths.raw)
    if not raw.is_dir():
        return []
    return sorted(
        str(p)
        for p in raw.rglob("*")
        if p.suffix.lower() in SIDECAR_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(raw).parts)
    )


def settings(params: Params, *sections: str) -> dict[str, Any]:
    """The named params sections as plain data (rule params: a change reruns the rule)."""
    data = params.model_dump(mode="json")
    return {name: data[name] for name in sections}


def output_parent(key: str, levels: int = 1):
    """A rule param: the folder `levels` above the rule's output `key`."""
    return lambda wildcards, output: str(Path(output[key]).parents[levels - 1])


def raw_folder(params: Params):
    """A rule param: the raw photos folder (the commands walk it themselves)."""
    return lambda wildcards: params.paths.raw


def previous_training(params: Params, results: str):
    """A rule input: what this phase starts from: the previous phase's training, and its
    evaluated choice when init_from is best."""

    def inputs(wildcards) -> list[str]:
        phase = params.phase(wildcards.phase)
        names = params.phase_names
        position = names.index(phase.name)
        if position == 0 or phase.init_from not in ("best", "last"):
            return []
        previous = names[position - 1]
        found = [f"{results}/train/{previous}/train.json"]
        if phase.init_from == "best":
            found.append(f"{results}/eval/phases/{previous}/best.json")
        return found

    return inputs


def eval_group_outputs(params: Params, results: str):
    """A rule input: every evaluation job's table of one phase."""

    def inputs(wildcards) -> list[str]:
        groups = params.eval_groups(wildcards.phase)
        return [
            f"{results}/eval/phases/{wildcards.phase}/group-{g}/metrics.csv"
            for g in range(len(groups))
        ]

    return inputs


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


def train_processes(params: Params):
    """`facelora train --processes`: one per GPU of the phase's job (at least one)."""
    return lambda wildcards: max(1, params.train_gpus(wildcards.phase))

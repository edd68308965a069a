"""Benchmark: how long Snakemake and DVC take to plan the data half as the photos grow.

For each N it builds a project (this repository's Snakefile, rules and params.yaml) whose
data/raw holds the demo sample data plus N small distinct synthetic JPEGs (no faces: this
measures the workflow, not detection), then prints:

* plan, cold  - `snakemake -n prepare` before anything has run (every job to do);
* data run    - `snakemake --cores C prepare` (the data half; the synthetic photos end as
                "no face found" in faces/rejected.csv, the sample data's faces go on);
* plan, no-op - `snakemake -n prepare` once that is done (nothing to do; the best of two);
* dvc add     - `dvc add data/raw` (hashes every photo once);
* dvc status  - `dvc status` as a no-op, its state warm (the best of two).

and, per data step, the jobs' peak memory (the largest max RSS among its jobs, from the
`benchmark:` files Snakemake writes under logs/benchmarks/) and their seconds in all, and the
size per photo of the listings and of the images table. Run it:

    .venv/bin/python benchmarks/bench_dag.py --photos 1000 --photos 10000 --photos 100000

Goal: no-op planning under 5 s at 100,000 photos, flat in N once the listings are warm; the
1,000,000-photo figures are extrapolated from the slope between the last two sizes. It prints
figures only; nothing is asserted. The projects are made under --workdir (default: a
temporary folder, removed afterwards unless --keep). Detection throughput on real faces is
bench_data_throughput.py's.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = ["Snakefile", "dvc.yaml", "environment.yml", "params.yaml"]
COPIED_DIRS = ["rules", "report", "profiles", "slurm"]


def make_project(dest: Path, photos: int, shards: int) -> Path:
    import yaml

    from facelora.prepare.sample_data import build_sample_data

    dest.mkdir(parents=True)
    for name in COPIED:
        shutil.copy(ROOT / name, dest / name)
    settings = yaml.safe_load((dest / "params.yaml").read_text())
    settings["workflow"]["shards"] = shards
    (dest / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    for name in COPIED_DIRS:
        shutil.copytree(ROOT / name, dest / name)
    (dest / "results").mkdir()
    shutil.copy(ROOT / "results" / ".gitignore", dest / "results" / ".gitignore")
    raw = dest / "data" / "raw"
    build_sample_data(raw)
    rng = np.random.default_rng(0)
    for i in range(photos):  # 1,000 per folder, as a scraper would leave them
        folder = raw / "bulk" / f"{i // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:07d}.jpg", quality=80)
    return dest


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout + proc.stderr


def measure(project: Path, cores: int) -> dict[str, float]:
    snakemake = str(BIN / "snakemake")
    out = {}
    out["plan, cold"], _ = timed([snakemake, "-n", "--cores", str(cores), "prepare"], project)
    out["data run"], _ = timed([snakemake, "--cores", str(cores), "prepare"], project)
    noop = [timed([snakemake, "-n", "--cores", "1", "prepare"], project) for _ in range(2)]
    out["plan, no-op"] = min(seconds for seconds, _ in noop)
    assert "Nothing to be done" in noop[-1][1], noop[-1][1][-500:]
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    timed([*git, "init", "-q"], project)
    dvc = str(BIN / "dvc")
    timed([dvc, "init", "-q"], project)
    timed([dvc, "config", "core.analytics", "false"], project)
    out["dvc add"], _ = timed([dvc, "add", "-q", "data/raw"], project)
    out["dvc status"] = min(timed([dvc, "status"], project)[0] for _ in range(2))
    return out


def step_figures(project: Path) -> dict[str, tuple[int, float, float]]:
    """{step: (jobs, largest max RSS in MB, seconds of all its jobs)} from logs/benchmarks."""
    steps: dict[str, list[tuple[float, float]]] = {}
    root = project / "logs" / "benchmarks"
    for path in sorted(root.rglob("*.tsv")):
        step = path.relative_to(root).parts[0].removesuffix(".tsv")
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                rss = float(row["max_rss"]) if row["max_rss"] not in ("", "NA") else 0.0
                steps.setdefault(step, []).append((rss, float(row["s"])))
    return {k: (len(v), max(r for r, _ in v), sum(t for _, t in v)) for k, v in steps.items()}


def bytes_per_photo(project: Path, files: int) -> dict[str, float]:
    from facelora.registry.layout import Layout

    layout = Layout(str(project / "results"))
    listing = Path(layout.raw_listing(0)).parent
    return {
        "listings": sum(p.stat().st_size for p in listing.glob("*.jsonl")) / files,
        "images.parquet": Path(layout.images()).stat().st_size / files,
    }


def plan_with_shards(project: Path, shards: int) -> tuple[float, int]:
    """Seconds and jobs of `snakemake -n prepare` with workflow.shards = `shards` (every job
    to do: a new count reshuffles the photos)."""
    import yaml

    path = project / "params.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["workflow"]["shards"] = shards
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    snakemake = str(BIN / "snakemake")
    seconds, log = timed([snakemake, "prepare", "-n", "--cores", "1", "--quiet", "rules"], project)
    jobs = next(int(line.split()[1]) for line in log.splitlines() if line.startswith("total"))
    return seconds, jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, action="append", help="N (repeatable)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2, help="workflow.shards")
    parser.add_argument(
        "--plan-shards",
        type=int,
        action="append",
        default=[],
        help="also time the cold plan of the largest N with this many shards (repeatable)",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the projects")
    args = parser.parse_args()
    sizes = args.photos or [1000, 10_000, 100_000]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dag_"))
    rows, steps, sizes_per_photo = [], {}, {}
    try:
        for n in sizes:
            project = make_project(work / f"n{n}", n, args.shards)
            files = sum(1 for p in (project / "data" / "raw").rglob("*") if p.is_file())
            figures = measure(project, args.cores)
            rows.append((n, files, figures))
            steps[n] = step_figures(project)
            sizes_per_photo[n] = bytes_per_photo(project, files)
            print(
                f"N={n} ({files} files): "
                + ", ".join(f"{k} {v:.1f} s" for k, v in figures.items()),
                flush=True,
            )
        for shards in args.plan_shards:  # the DAG's size follows the shards
            seconds, jobs = plan_with_shards(project, shards)
            print(f"N={sizes[-1]}, {shards} shards: plan, cold {seconds:.1f} s, {jobs} jobs")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    names = list(rows[0][2])
    print("\n| photos | files | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for n, files, figures in rows:
        print(f"| {n:,} | {files:,} | " + " | ".join(f"{figures[k]:.1f} s" for k in names) + " |")
    print("\n| step | " + " | ".join(f"{n:,}: jobs, peak MB, s" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for step in steps[sizes[-1]]:
        cells = []
        for n in steps:
            jobs, rss, seconds = steps[n].get(step, (0, 0.0, 0.0))
            cells.append(f"{jobs}, {rss:.0f}, {seconds:.1f}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    for n, per in sizes_per_photo.items():
        print(f"bytes per photo at {n:,}: " + ", ".join(f"{k} {v:.0f}" for k, v in per.items()))
    if len(rows) >= 2:  # the slope between the last two sizes, extrapolated
        (n0, _, a), (n1, _, b) = rows[-2], rows[-1]
        for name in ("plan, cold", "plan, no-op", "dvc status"):
            slope = max(0.0, (b[name] - a[name]) / (n1 - n0))
            guesses = ", ".join(
                f"{n:,} photos {b[name] + slope * (n - n1):.0f} s"
                for n in (100_000, 1_000_000)
                if n > n1
            )
            print(
                f"{name}, extrapolated from the slope ({slope * 1000:.2f} s per 1,000): {guesses}"
            )


if __name__ == "__main__":
    main()

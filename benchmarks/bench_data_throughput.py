"""Benchmark: the data half's face steps per core, as workflow.workers and workflow.shards grow.

It builds the demo sample data and makes --copies distinct copies of each of its JPEG photos
(a few bytes after the image's end: the same pixels, a different file, so nothing is reused
as a duplicate). On that folder it times:

* loop     - the plain full-resolution dlib loop of bench_detect_crop.py (HOG detector,
             68-point landmarks and the ResNet descriptor per face), one process;
* facelora - `snakemake --cores C` up to the gathered crops table (detect, gather, crop,
             gather: what a cluster runs per shard, model loading and Snakemake included)
             for each (workflow.shards, workflow.workers) of --configs, with C = shards x
             workers cores.

It prints photos per second, per second per core, and each step's largest job's peak memory
(max RSS, from the benchmark files under logs/benchmarks/). Run it:

    .venv/bin/python benchmarks/bench_data_throughput.py [--copies 4] [--configs 1x1,1x2,2x1]

It prints figures only; nothing is asserted.
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

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
COPIED = ["Snakefile", "dvc.yaml", "environment.yml", "params.yaml"]
COPIED_DIRS = ["rules", "report", "profiles", "slurm"]


def photos_with_copies(sample: Path, raw: Path, copies: int) -> int:
    """JPEGs of the sample data, `copies` distinct files each, under raw; returns the count."""
    from PIL import Image

    count = 0
    for path in sorted(sample.rglob("*.jpg")):
        try:
            with Image.open(path) as im:
                im.convert("RGB")
        except Exception:  # the sample data's deliberately bad files
            continue
        data = path.read_bytes()
        rel = path.relative_to(sample)
        for copy in range(copies):
            dest = raw / f"copy{copy}" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data + f"copy {copy}".encode())
            count += 1
    return count


def loop_seconds(raw: Path) -> float:
    sys.path.insert(0, str(HERE))
    from bench_detect_crop import Baseline

    loop = Baseline()
    files = sorted(raw.rglob("*.jpg"))
    start = time.perf_counter()
    for path in files:
        loop.image(path)
    return time.perf_counter() - start


def make_project(dest: Path, raw: Path, shards: int, workers: int) -> Path:
    dest.mkdir(parents=True)
    for name in COPIED:
        shutil.copy(ROOT / name, dest / name)
    for name in COPIED_DIRS:
        shutil.copytree(ROOT / name, dest / name)
    settings = yaml.safe_load((dest / "params.yaml").read_text())
    settings["workflow"].update(shards=shards, workers=workers)
    (dest / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (dest / "data").mkdir()
    (dest / "data" / "raw").symlink_to(raw)
    return dest


def peak_mb(project: Path, step: str) -> float:
    peaks = [0.0]
    for path in (project / "logs" / "benchmarks").glob(f"{step}*"):
        for tsv in [path] if path.is_file() else path.glob("*.tsv"):
            with open(tsv, newline="") as f:
                for row in csv.DictReader(f, delimiter="\t"):
                    if row["max_rss"] not in ("", "NA"):
                        peaks.append(float(row["max_rss"]))
    return max(peaks)


def run_workflow(project: Path, cores: int) -> float:
    from facelora.registry.layout import Layout

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    target = Layout().crops()
    start = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--cores", str(cores), target],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4, help="distinct copies of each photo")
    parser.add_argument("--configs", default="1x1,1x2,2x1", help="SHARDSxWORKERS, comma-separated")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    from facelora.prepare.sample_data import build_sample_data

    with tempfile.TemporaryDirectory(prefix="bench_data_throughput_") as tmp:
        work = Path(tmp)
        build_sample_data(work / "sample")
        raw = work / "raw"
        n = photos_with_copies(work / "sample", raw, args.copies)
        print(f"{n} photos ({args.copies} distinct copies of each sample JPEG)", flush=True)
        loop = loop_seconds(raw)
        print(f"loop: {loop:.1f} s, {n / loop:.2f} photos/s on one core", flush=True)
        rows = [("plain dlib loop", 1, loop, None, None)]
        for shards, workers in configs:
            project = make_project(work / f"s{shards}w{workers}", raw, shards, workers)
            cores = shards * workers
            seconds = run_workflow(project, cores)
            detect, crop = peak_mb(project, "detect"), peak_mb(project, "crop")
            name = f"shards {shards}, workers {workers}"
            print(f"{name}: {seconds:.1f} s on {cores} cores", flush=True)
            rows.append((name, cores, seconds, detect, crop))
    print("\n| run | cores | seconds | photos/s | per core | detect job peak | crop job peak |")
    print("|---|---|---|---|---|---|---|")
    for name, cores, seconds, detect, crop in rows:
        rate = n / seconds
        peaks = "- | -" if detect is None else f"{detect:.0f} MB | {crop:.0f} MB"
        print(f"| {name} | {cores} | {seconds:.1f} | {rate:.2f} | {rate / cores:.2f} | {peaks} |")
    print(
        f"per 10,000 photos per core: loop {10_000 / (n / loop) / 60:.0f} min; facelora "
        + ", ".join(
            f"{name} {10_000 / (n / seconds / cores) / 60:.0f} min"
            for name, cores, seconds, _, _ in rows[1:]
        )
    )


if __name__ == "__main__":
    main()

"""Check that the data steps stay memory-bounded as the number of photos grows.

Builds N synthetic Kontext pairs (the sample portraits, re-framed, resized and re-coloured
so no two files are identical), runs each data step as its own `facelora` process and prints
its wall time and peak memory (max RSS of that process). Run it for two sizes: peak memory
should stay nearly flat while time grows linearly.

    .venv/bin/python scripts/scale_check.py --pairs 200 --pairs 1000 [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from facelora.registry.layout import Layout

CLI = str(Path(sys.executable).with_name("facelora"))


def build(dest: Path, n_pairs: int, side: int = 900) -> None:
    """n_pairs Kontext pairs of about `side` px, each a distinct re-framing of a portrait."""
    from facelora.prepare.sample_data import EDITS, _Landmarker, portraits, source_photos

    rng = np.random.default_rng(0)
    people = portraits(source_photos(), _Landmarker())
    dest.mkdir(parents=True)
    for i in range(n_pairs):
        person = people[i % len(people)]
        edit = EDITS[(i // len(people)) % len(EDITS)]
        start, end = edit.apply(person.rgb, person.landmarks)
        h, w = start.shape[:2]
        dx, dy = rng.integers(0, max(1, w // 12)), rng.integers(0, max(1, h // 12))
        gain = rng.uniform(0.9, 1.1)
        for role, rgb in (("start", start), ("end", end)):
            crop = rgb[dy : h - dy // 2, dx : w - dx // 2].astype(np.float32) * gain
            img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
            img.thumbnail((side, side))
            img.save(dest / f"{i:06d}_{role}.jpg", quality=88)
        (dest / f"{i:06d}.txt").write_text(edit.caption + "\n")


def step(name: str, args: list[str], cwd: Path) -> tuple[float, float]:
    """Run one facelora command; return (seconds, peak RSS in MB) of that process alone."""
    start = time.perf_counter()
    with open(cwd / f"{name}.log", "w") as log:
        proc = subprocess.Popen([CLI, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: see {cwd / f'{name}.log'}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def run(n_pairs: int, work: Path) -> list[tuple[str, float, float]]:
    raw = work / "raw"
    # build in a child process: a child's peak RSS starts at its parent's size when forked,
    # so this process must stay small for the per-step figures to mean anything
    script = Path(__file__).resolve()
    subprocess.run([sys.executable, str(script), "--build", str(raw), str(n_pairs)], check=True)
    (work / "params.yaml").write_text("crop:\n  min_side: 256\n")
    L = Layout("results")
    faces, images, crops, index = L.faces(), L.images(), L.crops(), L.pair_index()
    steps = [
        ("detect", ["detect", "raw", "--out", faces, "--images-out", images,
                    "--rejected-out", L.faces_rejected()]),
        ("crop", ["crop", "--raw", "raw", "--faces", faces, "--images", images,
                  "--out-dir", L.crops_dir(), "--table-out", crops,
                  "--rejected-out", L.crops_rejected()]),
        ("pair-index", ["pair-index", "--raw", "raw", "--images", images, "--faces", faces,
                        "--crops", crops, "--out", index,
                        "--rejected-out", L.pair_index_rejected()]),
        ("pair", ["pair", "--index", index, "--raw", "raw", "--images", images, "--faces",
                  faces, "--crops", crops, "--crops-dir", L.crops_dir(),
                  "--out-dir", L.pairs_dir(),
                  "--index-rejected", L.pair_index_rejected(), "--table-out", L.pairs(),
                  "--rejected-out", L.pairs_rejected()]),
    ]  # fmt: skip
    return [(name, *step(name, args, work)) for name, args in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, action="append", help="pairs to build (repeat)")
    parser.add_argument("--keep", type=Path, help="keep the data and results here")
    parser.add_argument("--build", nargs=2, metavar=("DIR", "PAIRS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(Path(args.build[0]), int(args.build[1]))
        return
    sizes = args.pairs or [100, 400]
    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"facelora-scale-{n}-"))
        try:
            for name, seconds, rss in run(n, work):
                rows.append((n, name, seconds, rss))
                print(f"{n:>7} pairs  {name:<10} {seconds:8.1f} s  {2 * n / seconds:7.1f} img/s"
                      f"  peak RSS {rss:7.0f} MB", flush=True)  # fmt: skip
        finally:
            if args.keep:
                shutil.copytree(work, args.keep / f"{n}", dirs_exist_ok=True)
            shutil.rmtree(work, ignore_errors=True)
    if len(sizes) > 1:
        print("\npeak RSS growth from the smallest to the largest run, per step:")
        for name in dict.fromkeys(r[1] for r in rows):
            small = next(r for r in rows if r[0] == sizes[0] and r[1] == name)
            large = next(r for r in rows if r[0] == sizes[-1] and r[1] == name)
            print(f"  {name:<10} {small[3]:6.0f} MB -> {large[3]:6.0f} MB "
                  f"({sizes[-1] / sizes[0]:.0f}x the photos)")  # fmt: skip


if __name__ == "__main__":
    main()

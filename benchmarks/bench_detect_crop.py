"""Benchmark: facelora's detect + crop steps against an I/O floor and a plain dlib loop.

What it measures, on the same set of images (every file under the folder that PIL decodes):

* floor     - decode each image at full resolution (PIL, RGB, EXIF ignored) and encode it
              as PNG (OpenCV, compression 1): the least any per-image step can cost.
* baseline  - the straightforward full-resolution dlib loop: HOG detector (upsample 0) on
              the full image, 68-point landmarks and the 128-D ResNet descriptor per face.
* facelora  - the real package steps, timed together: detect_shard + gather_detections +
              crop_shard + gather_crops with default Params (reduced-size JPEG decoding,
              detection on a copy of at most faces.max_side px, landmarks, embeddings, head
              pose, aligned PNG crops), with 1 worker and with --workers N when N > 1.

Run it:

    .venv/bin/python benchmarks/bench_detect_crop.py [--images DIR] [--repeat N] [--workers N]

Without --images it builds the demo sample data (facelora.prepare.sample_data, about 7 s) in a
temporary folder (in a child process), then measures in a second child process so the
build's memory stays out of the peak RSS figures. Models are loaded before the timed runs
where the API allows it (the output says where it does not). Each timing is repeated
--repeat times and the best is reported. It prints figures only; nothing is asserted.

Goal: facelora's detect + crop at least 2x faster than the full-resolution baseline loop,
at the same detection rate (the same faces found on the same images).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

# The progress bars of the package steps would interleave with the table; tqdm reads its
# TQDM_* settings when it is imported, and spawned workers inherit the environment.
os.environ.setdefault("TQDM_DISABLE", "1")

import cv2
import dlib
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from facelora.config import Params
from facelora.prepare.faces.backends import make_backend
from facelora.prepare.faces.crop import crop_shard, gather_crops
from facelora.prepare.faces.detect import DetectOutputs, detect_shard, gather_detections

PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
T = TypeVar("T")


@dataclass
class Result:
    name: str
    seconds: float  # best of --repeat
    n_images: int
    faces: dict[str, int]  # image (relative name) -> faces found
    crops: int | None = None
    rss_mb: float = 0.0  # this process's peak RSS after the stage
    child_rss_mb: float | None = None  # RUSAGE_CHILDREN after the stage (worker runs)
    worker_hwm_mb: float | None = None  # largest worker VmHWM, polled (worker runs)
    notes: list[str] = field(default_factory=list)

    @property
    def total_faces(self) -> int:
        return sum(self.faces.values())


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale / 2**20


def best_of(repeat: int, run: Callable[[int], T]) -> tuple[float, T]:
    """Run `run(i)` `repeat` times; return the best wall time and the last run's result."""
    times, outs = [], []
    for i in range(max(1, repeat)):
        start = time.perf_counter()
        outs.append(run(i))
        times.append(time.perf_counter() - start)
    return min(times), outs[-1]


class WorkerPeak:
    """Largest VmHWM (peak RSS) of this process's descendants, polled from /proc (Linux).

    RUSAGE_CHILDREN alone overstates workers: Linux carries ru_maxrss across fork + exec,
    so a spawned worker starts at its parent's peak. VmHWM belongs to the worker's own
    address space and starts at 0 on exec.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> WorkerPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float | None:
        return self.peak_kib / 1024 if self.peak_kib else None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in _descendants(os.getpid()):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue  # it exited between the scan and the read
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


# --- the image set ------------------------------------------------------------------------


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.convert("RGB")  # forces the full decode: truncated files fail here
        return True
    except Exception:  # PIL raises many types for non-images, bombs and truncated data
        return False


def collect_images(
    source: Path, dest: Path, extensions: list[str], unique: bool = False
) -> tuple[list[str], int]:
    """Symlink every decodable image under source into dest (same relative names).

    All three methods then read the very same files, and facelora's scan sees no sidecar
    or broken files that the others skip. unique: keep only the first of byte-identical
    files. Returns (sorted relative names, files skipped).
    """
    names, skipped, seen = [], 0, set()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if path.suffix.lower() not in extensions:
            continue  # captions, manifests: not images
        if not decodes(path):
            skipped += 1
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if unique and digest in seen:
            skipped += 1
            continue
        seen.add(digest)
        rel = path.relative_to(source).as_posix()
        link = dest / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
        names.append(rel)
    return names, skipped


# --- the methods --------------------------------------------------------------------------


def run_floor(images_dir: Path, names: list[str]) -> float:
    """Decode + PNG-encode every image; returns the seconds spent decoding."""
    decoding = 0.0
    for rel in names:
        start = time.perf_counter()
        with Image.open(images_dir / rel) as im:
            rgb = np.asarray(im.convert("RGB"))
        decoding += time.perf_counter() - start
        ok, _ = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), PNG_PARAMS)
        if not ok:
            raise OSError(f"PNG encoding failed for {rel}")
    return decoding


class Baseline:
    """The plain dlib loop; the models are loaded once, in __init__ (not timed)."""

    def __init__(self) -> None:
        # importing face_recognition_models fails on new setuptools (pkg_resources): find
        # its folder without importing it
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("face_recognition_models is not installed")
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def image(self, path: Path) -> list[float]:
        """Detection scores of the faces found (each one landmarked and embedded)."""
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        # run(img, 0, 0.0) is detector(img, 0), plus the scores for the comparison
        rects, scores, _ = self.detector.run(rgb, 0, 0.0)
        for rect in rects:
            shape = self.predictor(rgb, rect)
            self.net.compute_face_descriptor(rgb, shape)
        return list(scores)

    def run(self, images_dir: Path, names: list[str]) -> dict[str, list[float]]:
        return {rel: self.image(images_dir / rel) for rel in names}


@dataclass
class FaceloraRun:
    faces: dict[str, int]
    crops: int
    status: dict[str, str]  # image -> "ok" or the rejection reason
    min_score: float  # faces.dlib.min_score: detections under it are dropped
    sha256: dict[str, str]  # image -> content hash (byte-identical copies share one)


def run_facelora(images_dir: Path, work: Path, params: Params, workers: int) -> FaceloraRun:
    """detect_shard + gather_detections + crop_shard + gather_crops into a fresh folder."""
    work.mkdir(parents=True)
    shard_faces, shard_images = work / "0.faces.parquet", work / "0.images.parquet"
    detected = DetectOutputs.beside(work / "detect" / "faces.parquet")
    detect_shard(images_dir, shard_faces, shard_images, params, (0, 1), workers)
    gather_detections([(shard_faces, shard_images)], detected)
    crops_dir, crop_shard_out = work / "crops", work / "0.crops.parquet"
    crop_shard(
        images_dir,
        detected.faces,
        detected.images,
        crops_dir,
        crop_shard_out,
        params,
        (0, 1),
        workers,
    )
    gather_crops(
        [crop_shard_out], crops_dir, crops_dir / "crops.parquet", crops_dir / "rejected.csv"
    )
    # faces found = rows of faces.parquet (images rejected for too many faces have none)
    columns = ["image", "status", "reason", "sha256"]
    images = pq.read_table(detected.images, columns=columns).to_pylist()
    faces = dict.fromkeys((r["image"] for r in images), 0)
    for rel in pq.read_table(detected.faces, columns=["image"]).column("image").to_pylist():
        faces[rel] += 1
    status = {r["image"]: r["reason"] if r["status"] != "ok" else "ok" for r in images}
    # crops written = PNG files left on disk (duplicate files share the first copy's PNGs)
    crops = sum(1 for _ in (crops_dir / "images").glob("*.png"))
    sha = {r["image"]: r["sha256"] for r in images if r["sha256"]}
    return FaceloraRun(faces, crops, status, params.faces.dlib.min_score, sha)


# --- report -------------------------------------------------------------------------------


def stage_done(r: Result) -> None:
    """One line per stage as it finishes, so a long run shows where it is."""
    child = ""
    if r.child_rss_mb is not None:
        child = f", RUSAGE_CHILDREN {r.child_rss_mb:.0f} MB"
    if r.worker_hwm_mb is not None:
        child += f", largest worker VmHWM {r.worker_hwm_mb:.0f} MB"
    print(f"  done {r.name}: {r.seconds:.2f} s, peak RSS {r.rss_mb:.0f} MB{child}", flush=True)


def print_table(results: list[Result]) -> None:
    print(
        f"\n{'method':<22}{'seconds':>10}{'images/s':>10}{'faces':>8}{'crops':>8}"
        f"{'RSS MB':>9}{'children':>10}{'worker':>8}"
    )
    for r in results:
        crops = "-" if r.crops is None else str(r.crops)
        child = "-" if r.child_rss_mb is None else f"{r.child_rss_mb:.0f}"
        worker = "-" if r.worker_hwm_mb is None else f"{r.worker_hwm_mb:.0f}"
        rate = r.n_images / r.seconds if r.seconds > 0 else float("inf")
        print(
            f"{r.name:<22}{r.seconds:>10.3f}{rate:>10.2f}{r.total_faces:>8}{crops:>8}"
            f"{r.rss_mb:>9.0f}{child:>10}{worker:>8}"
        )
        for note in r.notes:
            print(f"{'':<4}note: {note}")


def compare(
    floor: Result,
    baseline: Result,
    scores: dict[str, list[float]],
    fl: list[Result],
    run: FaceloraRun,
) -> None:
    print("\nratios (time ratio > 1: facelora is slower; speed-up > 1: facelora is faster)")
    for r in fl:
        print(
            f"  {r.name:<22} facelora/floor time {r.seconds / floor.seconds:6.2f}x   "
            f"baseline/facelora speed-up {baseline.seconds / r.seconds:6.2f}x"
        )
    names = sorted(baseline.faces)
    # facelora drops detections under faces.dlib.min_score; the plain loop keeps every
    # detection over 0 (dlib's default), so count both ways
    min_score = run.min_score
    b_kept = {n: sum(x >= min_score for x in scores[n]) for n in names}
    b_found = sum(1 for n in names if baseline.faces[n] > 0)
    b_found_kept = sum(1 for n in names if b_kept[n] > 0)
    f_found = sum(1 for n in names if run.faces.get(n, 0) > 0)
    print(f"\ndetection rate on the same images ({len(names)})")
    print("  baseline: dlib HOG detector(img, 0) at full resolution (dlib's threshold 0)")
    print(f"  baseline>=min: the same, counting only scores >= faces.dlib.min_score {min_score}")
    print(f"  {'':<22}{'baseline':>10}{'baseline>=min':>15}{'facelora':>10}")
    b_faces, k_faces, f_faces = baseline.total_faces, sum(b_kept.values()), fl[0].total_faces
    print(f"  {'faces found':<22}{b_faces:>10}{k_faces:>15}{f_faces:>10}")
    print(f"  {'images with a face':<22}{b_found:>10}{b_found_kept:>15}{f_found:>10}")
    disagree = [n for n in names if baseline.faces[n] != run.faces.get(n, 0)]
    disagree_kept = [n for n in names if b_kept[n] != run.faces.get(n, 0)]
    print(
        f"  images where the face counts differ: {len(disagree)} vs baseline, "
        f"{len(disagree_kept)} vs baseline>=min (marked *)"
    )
    for n in disagree + [n for n in disagree_kept if n not in disagree]:
        mark = "*" if n in disagree_kept else " "
        shown = ", ".join(f"{x:.3f}" for x in scores[n])
        why = run.status.get(n, "not in images.parquet")
        print(
            f"   {mark}{n}: baseline {baseline.faces[n]} [scores {shown}], "
            f"facelora {run.faces.get(n, 0)} ({why})"
        )
    fastest = min(fl, key=lambda r: r.seconds)
    speedup = baseline.seconds / fastest.seconds
    fast_enough = speedup >= 2
    # detection rate: images in which a face is found, and faces found, at the same threshold
    rate_ok = f_found >= b_found_kept and f_faces >= k_faces
    copies = len(names) - len(set(run.sha256.values())) if run.sha256 else 0
    print(
        f"\ngoal: >= 2x faster than the baseline at the same detection rate\n"
        f"  best speed-up {speedup:.2f}x ({fastest.name}): {'yes' if fast_enough else 'no'}\n"
        f"  detection rate (images with a face, faces found) at least the baseline's at the "
        f"same threshold: {'yes' if rate_ok else 'no'} ({f_found}/{len(names)} images, "
        f"{f_faces} faces vs {b_found_kept}/{len(names)}, {k_faces})\n"
        f"  same face count on every image: {'yes' if not disagree_kept else 'no'} "
        f"(differences listed above, with facelora's reason)\n"
        f"  byte-identical copies among the images: {copies} (facelora analyses each once "
        f"per job; the baseline loop analyses every file)\n"
        f"  -> {'met' if fast_enough and rate_ok else 'not met'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="a folder of images (default: sample data)")
    parser.add_argument("--repeat", type=int, default=1, help="timings per method; best is kept")
    parser.add_argument("--workers", type=int, default=1, help="also time facelora with N workers")
    parser.add_argument(
        "--unique", action="store_true", help="skip byte-identical copies (no reuse to gain)"
    )
    args = parser.parse_args(argv)
    params = Params()

    if args.images is None:
        # build_sample_data peaks near 800 MB of RSS, and a process inherits its parent's
        # peak through fork + exec: build in one child, measure in a second, so neither the
        # measuring process's RUSAGE_SELF nor its RUSAGE_CHILDREN includes the build
        with tempfile.TemporaryDirectory(prefix="bench_detect_crop_sample_") as tmp:
            sample = Path(tmp) / "sample"
            build = (
                "import sys; from facelora.prepare.sample_data import build_sample_data; "
                "build_sample_data(sys.argv[1])"
            )
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", build, str(sample)], check=True)
            print(
                f"sample data built in {time.perf_counter() - start:.1f} s (separate process, "
                f"not timed below)",
                flush=True,
            )
            rest = ["--repeat", str(args.repeat), "--workers", str(args.workers)]
            rest += ["--unique"] if args.unique else []
            cmd = [sys.executable, str(Path(__file__).resolve()), "--images", str(sample), *rest]
            raise SystemExit(subprocess.run(cmd, check=False).returncode)

    with tempfile.TemporaryDirectory(prefix="bench_detect_crop_") as tmp:
        tmp_dir = Path(tmp)
        source = args.images
        images_dir = tmp_dir / "images"
        images_dir.mkdir()
        names, skipped = collect_images(source, images_dir, params.images.extensions, args.unique)
        if not names:
            raise SystemExit(f"no decodable images under {source}")
        print(f"images: {len(names)} decodable under {source} ({skipped} image files skipped)")
        print(f"repeat: best of {args.repeat}; warm-up run before each method (not timed)")
        print(f"peak RSS at start: {peak_rss_mb():.0f} MB")

        # floor: one untimed pass warms the OS file cache for every method after it
        run_floor(images_dir, names)
        seconds, decoding = best_of(args.repeat, lambda _: run_floor(images_dir, names))
        floor = Result("floor", seconds, len(names), dict.fromkeys(names, 0), rss_mb=peak_rss_mb())
        floor.notes.append(
            f"decode + PNG encode only, no faces; decoding {decoding:.2f} s of it, "
            f"the rest is full-resolution PNG encoding"
        )
        stage_done(floor)

        start = time.perf_counter()
        base = Baseline()
        load_s = time.perf_counter() - start
        base.image(images_dir / names[0])  # warm-up: first dlib calls allocate buffers
        seconds, scores = best_of(args.repeat, lambda _: base.run(images_dir, names))
        found = {rel: len(s) for rel, s in scores.items()}
        baseline = Result("baseline (dlib full)", seconds, len(names), found, rss_mb=peak_rss_mb())
        baseline.notes.append(f"model loading {load_s:.2f} s, excluded")
        stage_done(baseline)

        # facelora's steps load their models inside detect_shard (not cacheable from here),
        # so time a load to show how much of each run it is
        start = time.perf_counter()
        make_backend(params.faces)
        backend_s = time.perf_counter() - start

        results = [floor, baseline]
        fl_results: list[Result] = []
        fl_runs: list[FaceloraRun] = []
        for workers in sorted({1, max(1, args.workers)}):
            # warm-up: imports, file cache, first-call allocations; the worker memory is
            # polled here, not in the timed runs, so the polling costs them nothing
            with WorkerPeak() as workers_peak:
                run_facelora(images_dir, tmp_dir / f"warm_w{workers}", params, workers)
            seconds, run = best_of(
                args.repeat,
                lambda i, w=workers: run_facelora(images_dir, tmp_dir / f"run_w{w}_{i}", params, w),
            )
            res = Result(
                f"facelora workers={workers}",
                seconds,
                len(names),
                run.faces,
                run.crops,
                rss_mb=peak_rss_mb(),
            )
            fl_runs.append(run)
            if run.faces != fl_runs[0].faces:  # workers must not change the results
                res.notes.append("face counts differ from the workers=1 run")
            if workers == 1:
                res.notes.append(
                    f"includes loading the models once inside detect_shard ({backend_s:.2f} s)"
                )
            else:
                res.notes.append(
                    f"includes starting {workers} spawned processes per step, each importing "
                    f"facelora (detect and crop) and loading the models (detect)"
                )
                # worker memory is not in RUSAGE_SELF
                res.child_rss_mb = peak_rss_mb(resource.RUSAGE_CHILDREN)
                res.worker_hwm_mb = workers_peak.mb
            fl_results.append(res)
            stage_done(res)
        results += fl_results

        print_table(results)
        print(
            "memory, all peak RSS in MB after the stage:\n"
            "  RSS MB    this process (RUSAGE_SELF); worker processes are not in it\n"
            "  children  RUSAGE_CHILDREN: the largest finished child; Linux starts a spawned\n"
            "            child's figure at its parent's peak, so it is at least RSS MB\n"
            "  worker    the largest worker's own peak (VmHWM from /proc, polled during the\n"
            "            untimed warm-up run of the same configuration)"
        )
        compare(floor, baseline, scores, fl_results, fl_runs[0])


if __name__ == "__main__":
    main()

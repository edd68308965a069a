"""Benchmark: images/s of the restoration degradations (draw_degradations + apply_degradations).

What is timed: for each crop size (512 and 1024 px by default), for each setting below, the
plan is drawn with a new seed and applied to one aligned face crop, round-robin over the
crops; decoding, detecting and cropping happen before and are not timed. One thread: OpenCV
is set to 1 thread (numpy's element-wise work is single-threaded anyway).

- default: synthesis.restoration as shipped (2 filters per pair, strength 0.6)
- second_order: the same with the second, milder chain (about twice the filters)
- every filter alone (per_pair 1, strength 0.6), to see where the time goes

Crops come from real photos: ../shared/faces/same_person (or --images DIR), else the photos
the sample data is built from (facelora.prepare.sample_data.source_photos). Faces are found
with the project's dlib detector and 68-point landmarks and cut with its crop code (upscaled
where the photo is small, so every crop has the size being measured).

Run it:

    .venv/bin/python benchmarks/bench_synthesis_restoration.py [--images DIR] [--seconds S]

It prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np

from facelora.config import DEGRADATIONS, CropParams, DlibParams, ImagesParams, RestorationParams

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "faces" / "same_person"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def photos(folder: Path | None) -> tuple[str, list[np.ndarray]]:
    from facelora.prepare.images import read_image

    folder = folder or (SHARED if SHARED.is_dir() else None)
    if folder is None:
        from facelora.prepare.sample_data import source_photos

        return "the sample data's source photos", list(source_photos().values())
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        sys.exit(f"no photos (.jpg, .png) under {folder}: pass --images DIR")
    return str(folder), [read_image(p, ImagesParams(), max_side=2048).rgb for p in files]


def face_crops(images: list[np.ndarray], sizes: list[int]) -> dict[int, list[np.ndarray]]:
    """One crop per photo with a face (the largest), at each size."""
    import dlib

    from facelora.prepare.faces.align import plan_crop, warp_crop
    from facelora.prepare.faces.dlib_backend import DlibDetector, five_from_68, model_path

    detector = DlibDetector(DlibParams())
    predictor = dlib.shape_predictor(str(model_path(DlibParams(), "landmarks_model")))
    crops: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
    for rgb in images:
        scale = min(1.0, 800 / max(rgb.shape[:2]))  # find faces on a reduced copy
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        found = [d for d in detector.detect(small) if d.score > 0.3]
        if not found:
            continue
        best = max(found, key=lambda d: d.area)
        rect = dlib.rectangle(*(round(float(v)) for v in best.box))
        landmarks = five_from_68(predictor(small, rect)) / scale
        for size in sizes:
            params = CropParams(min_side=64, output_side=size, allow_upscale=True)
            box, _ = plan_crop(landmarks, rgb.shape[1], rgb.shape[0], params)
            crops[size].append(warp_crop(rgb, box, size))
    return crops


def images_per_second(crops: list[np.ndarray], settings: RestorationParams, seconds: float):
    from facelora.prepare.synthesis.degrade import apply_degradations, draw_degradations

    side = crops[0].shape[0]
    apply_degradations(crops[0], draw_degradations(0, settings, side=side))  # warm up
    done, start = 0, time.perf_counter()
    while done < len(crops) or time.perf_counter() - start < seconds:
        plan = draw_degradations(done + 1, settings, side=side)
        apply_degradations(crops[done % len(crops)], plan)
        done += 1
    return done / (time.perf_counter() - start), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, help="a folder of photos (default: shared faces)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--seconds", type=float, default=3.0, help="per figure, at least")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    where, images = photos(args.images)
    crops = face_crops(images, args.sizes)
    if not crops[args.sizes[0]]:
        sys.exit(f"no face found in {where}")
    print(f"{len(crops[args.sizes[0]])} face crops from {where}; 1 thread\n")
    shipped = RestorationParams()
    settings = {
        "default": shipped,
        "second_order": shipped.model_copy(update={"second_order": True}),
        **{
            name: RestorationParams(degradations=[name], per_pair=1, strength=shipped.strength)
            for name in DEGRADATIONS
        },
    }
    print(f"{'setting':<14}" + "".join(f"{f'{s} px img/s':>16}{'ms':>8}" for s in args.sizes))
    for label, setting in settings.items():
        row = f"{label:<14}"
        for size in args.sizes:
            rate, _ = images_per_second(crops[size], setting, args.seconds)
            row += f"{rate:>16.1f}{1000 / rate:>8.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()

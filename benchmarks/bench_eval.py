"""Benchmark: seconds per evaluated checkpoint, and how evaluation grows with checkpoints x pairs.

On the tiny random model that `facelora make-tiny-model` builds offline (--family), a phase
is trained for max(--checkpoints) steps with a checkpoint every step, and validation pairs are
cut around the face of skimage's astronaut photo (so the face detector finds a face and the
identity metric runs). Then, for every (checkpoints, pairs) cell of the grid, facelora's
`evaluate_group` judges that many checkpoints on that many pairs with ONE `Evaluator` (the
pipeline and the metric models loaded once, the LoRA swapped per checkpoint: what one
evaluate job does), and its wall time is printed.

Printed figures:
* load        - building the Evaluator: the pipeline through from_pretrained plus the metric
                models (face detector/embedder; LPIPS/CLIP when configured, else unavailable).
* per cell    - total seconds, seconds per checkpoint, seconds per (checkpoint x pair).
* fit         - a least-squares fit  seconds = a + b*checkpoints + c*checkpoints*pairs  over the
                grid: a is the fixed cost per job, b the cost of a LoRA swap, c the cost of one
                generated and scored image.
* reload cost - what loading the pipeline per checkpoint would add (load x checkpoints), the
                reason one job holds several checkpoints (`eval.checkpoints_per_job`).
* strengths   - the largest cell again with 1, 2, 4 LoRA strengths (`eval.lora_scales`): the
                seconds per extra strength (its images plus a re-weight, no LoRA load) against
                the LoRA swap's b.

Run it:

    .venv/bin/python benchmarks/bench_eval.py [--family qwen_image_edit] [--checkpoints 1 2 4]
        [--pairs 1 2 4] [--resolution 64] [--steps 8] [--threads 1]

It prints figures only; nothing is asserted. The model is random: the figures measure
facelora's evaluation overheads (generation loop, LoRA swapping, metrics), not real model speed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

CAPTION = "EDITFACE paint a yellow square"


def validation_pairs(folder: Path, count: int) -> Path:
    """Pairs cut around the astronaut's face at 256 px, the end with a yellow square, written by
    facelora's own writer."""
    from skimage import data

    from facelora.io.datasets import write_kontext_images

    photo = data.astronaut()
    pairs = []
    for i in range(count):
        x0 = 100 + 8 * i
        crop = photo[10:266, x0 : x0 + 256]
        end = crop.copy()
        end[100:140, 100:140] = (250, 240, 40)
        pairs.append({"pair_id": f"v{i:012d}", "start_crop": crop, "end_crop": end})
    write_kontext_images(folder, [{**pair, "caption": CAPTION} for pair in pairs])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="qwen_image_edit")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="inference steps per image")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the table

    import numpy as np
    import torch

    from facelora.config import validate_params
    from facelora.evaluate.run import Evaluator, evaluate_group
    from facelora.models.tiny import make_tiny_model
    from facelora.train.loop import train_phase

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(args.family, root / "model")
        most_checkpoints = max(args.checkpoints)
        params = validate_params(
            {
                "seed": 1,
                "model": {"family": args.family, "path": str(model)},
                "lora": {"rank": 4},
                "train": {"resolution": args.resolution, "save_every": 1},
                "eval": {
                    "resolution": args.resolution,
                    "steps": args.steps,
                    "checkpoints_per_job": most_checkpoints,
                },
                "phases": [{"name": "bench", "steps": most_checkpoints}],
            }
        )
        train_data = validation_pairs(root / "train_data", 2)
        train_phase(
            "bench",
            train_data,
            root / "train",
            params,
            cache_dir=root / "cache",
            show_progress=False,
        )
        validation = {n: validation_pairs(root / f"validation-{n}", n) for n in args.pairs}

        t0 = time.perf_counter()
        evaluator = Evaluator(params)
        load = time.perf_counter() - t0
        backends = evaluator.metrics.describe()
        print(
            f"family {args.family}, {args.resolution} px, {args.steps} inference steps, "
            f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}"
        )
        print("metrics: " + json.dumps({k: v["backend"] for k, v in backends.items()}))
        print(f"load (pipeline + metric models): {load:.2f} s\n")
        # warm-up: the first generation pays one-off costs (kernels, allocator)
        evaluate_group(
            params,
            "bench",
            [1],
            validation[min(args.pairs)],
            root / "train",
            root / "warmup",
            evaluator=evaluator,
        )

        header = f"{'ckpts':>5} {'pairs':>5} {'total s':>8} {'s/ckpt':>7} {'s/image':>8}"
        print(header)
        cells = []
        for checkpoints in args.checkpoints:
            for pairs in args.pairs:
                t0 = time.perf_counter()
                frame = evaluate_group(
                    params,
                    "bench",
                    list(range(1, checkpoints + 1)),
                    validation[pairs],
                    root / "train",
                    root / f"out-{checkpoints}-{pairs}",
                    evaluator=evaluator,
                )
                total = time.perf_counter() - t0
                assert len(frame) == checkpoints * pairs
                cells.append((checkpoints, pairs, total))
                print(
                    f"{checkpoints:>5} {pairs:>5} {total:>8.2f} {total / checkpoints:>7.2f} "
                    f"{total / (checkpoints * pairs):>8.3f}"
                )

        design = np.array([[1, c, c * p] for c, p, _ in cells], dtype=float)
        seconds = np.array([t for *_, t in cells])
        (fixed, per_swap, per_image), *_ = np.linalg.lstsq(design, seconds, rcond=None)
        print(
            f"\nfit: seconds = {fixed:.3f} + {per_swap:.3f} x checkpoints "
            f"+ {per_image:.3f} x checkpoints x pairs"
        )
        print(
            f"reloading the pipeline per checkpoint would add {load:.2f} s per checkpoint "
            f"({load / max(per_image, 1e-9):.0f} images' worth)"
        )

        # extra strengths: the same LoRA re-weighted (set_adapters), never reloaded
        checkpoints, pairs = max(args.checkpoints), max(args.pairs)
        by_count = []
        for scales in ([1.0], [1.0, 1.5], [0.5, 1.0, 1.5, 2.0]):
            evaluator.params = params.model_copy(
                update={"eval": params.eval.model_copy(update={"lora_scales": scales})}
            )
            t0 = time.perf_counter()
            frame = evaluate_group(
                evaluator.params,
                "bench",
                list(range(1, checkpoints + 1)),
                validation[pairs],
                root / "train",
                root / f"scales-{len(scales)}",
                evaluator=evaluator,
            )
            by_count.append((len(scales), time.perf_counter() - t0))
            assert len(frame) == checkpoints * pairs * len(scales)
        counts, totals = (np.array(v, dtype=float) for v in zip(*by_count, strict=True))
        per_strength = np.polyfit(counts, totals, 1)[0] / checkpoints
        print(
            f"strengths ({checkpoints} ckpts x {pairs} pairs): "
            + ", ".join(f"{n} -> {t:.2f} s" for n, t in by_count)
            + f"; an extra strength costs {per_strength:.3f} s per checkpoint "
            f"({per_strength / pairs:.3f} s per image), a LoRA swap {per_swap:.3f} s"
        )


if __name__ == "__main__":
    main()

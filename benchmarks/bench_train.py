"""Benchmark: seconds per training step of facelora's Trainer, cached and uncached encodings.

For each model family (qwen_image_edit, flux2_klein) on the tiny random models that
`facelora.models.tiny.make_tiny_model` builds offline, with a generated phase folder of
--pairs pairs (smooth random start images; the end is the start with a yellow square painted
on) at --resolution x --resolution pixels, batch size 1, LoRA rank --rank:

* cached    - `train.cache: true`: the VAE latents and prompt embeddings of every pair are
              encoded once into an on-disk cache before the loop (`EncodingCache.prepare`, its
              wall time is the one-off "cache build" figure), and each step reads them back.
* uncached  - `train.cache: false`: every step encodes its pair again with the VAE and the
              text encoder.

How steps are timed: the `Trainer` runs --warmup + --steps optimizer steps; it writes one row
per optimizer step to `log.csv`, whose `seconds` column is the wall time from `zero_grad`
to the end of that step (next batch, cache reads or encoding, forward, backward, gradient
clipping, optimizer and scheduler step). Model loading, LoRA setup, cache building, the
progress bar and checkpoint saving are outside it (checkpoints are written only after the last
step here). The first --warmup rows are dropped; the median and mean are over the other rows,
pooled over --repeat runs; steps/s is 1 / mean (the throughput). The cached/uncached speed-up
is uncached / cached seconds per step.

Each run is a fresh child process (a new model load, new temporary folders), so its peak
memory is its own: process max RSS via resource.getrusage (this parent imports only the
standard library, so what Linux carries over from it at fork + exec is a few MB, printed),
plus torch.cuda.max_memory_allocated on CUDA. Torch's intra-op threads are fixed (--threads,
also OMP_NUM_THREADS / MKL_NUM_THREADS in the children) and printed; the default, 1, keeps
the figures steady on a 2-core machine that other work shares (with 2 threads, a busy
neighbour made single steps up to 10x slower). The load average is printed at the start and
the end: compare figures only between runs on an idle, or equally busy, machine.

Optionally (--diffusers-script PATH) the same tiny Klein model, pairs, resolution, batch size,
LoRA rank and target modules, optimizer and dtype are run through diffusers' own example
trainer `examples/dreambooth/train_dreambooth_lora_flux2_klein_img2img.py` (from the diffusers
GitHub repository; not part of the pip package, so it is not shipped here), with `python SCRIPT
...` in one process, offline. That script reads img2img pairs only through
`datasets.load_dataset` (`--dataset_name` with `--cond_image_column`; its `--instance_data_dir`
path loads no condition images), so the phase folder is written as a local parquet dataset
(image = end, cond_image = start, caption); the `datasets` package must be importable
(--diffusers-pythonpath DIR adds e.g. a `pip install --no-deps --target DIR datasets dill
multiprocess xxhash` folder for that run only). Its steps are timed from the script's own
"Steps" progress bar, which it advances once per optimizer step: the intervals between its
updates (the first from the bar's creation), with the same warm-up rows dropped. Its two modes:
`--cache_latents` (latents encoded once, kept in memory) and without it (the VAE encodes every
step); in both it encodes the captions once before training (it always does when a caption
column is given), so its "uncached" re-encodes images only. Its "cache build" is its "Caching
latents" loop (captions only, without --cache_latents). No tracker is installed (`--report_to
all` finds none), so it logs nothing per step.

Real width (--width real --blocks A,B): instead of the tiny transformers, random ones of the
released models' block width and heads (facelora.models.real_configs: Qwen-Image 24 x 128,
FLUX.2 klein 9B 32 x 128, with their MLPs and modulation; only the context projection from the
tiny text encoder is narrower), A and B blocks deep (Klein: double blocks, each with three
single ones, as the 9B's 8 + 24). Their s/step and peak memory are then carried along the line
through the two depths to the released depth. --quantize and --gradient-checkpointing (on by
default at real width) set model.quantize and train.gradient_checkpointing.

Loss terms (--terms none,identity,...): each listed configuration runs as its own row, side by
side with `none` (the plain flow-matching loss), and the table ends with each one's cost per
step relative to it: `regions` (face 1, hair 0.5, background 0.1), `identity` (dlib, the face
window decoded), `identity-image` (the whole image decoded), `lpips` (VGG-16 LPIPS), and
`contrastive` (CLIP with ViT-L/14's vision tower: pairs of edits of one start image, so its
batches hold 2 samples), `all` (regions + identity + lpips + contrastive). The LPIPS and CLIP
networks are RANDOM weights of the real architectures (their cost, not their meaning); the
dlib embedder is the real one.

Run it:

    .venv/bin/python benchmarks/bench_train.py [--family all] [--steps 20] [--warmup 3]
        [--pairs 8] [--resolution 64] [--device cpu] [--dtype float32] [--repeat 1]
        [--threads 1] [--modes cached,uncached] [--width tiny|real --blocks 2,4]
        [--quantize none|fp8|int8|nf4] [--rank 4] [--regions FACE,HAIR,BACKGROUND]
        [--terms none,regions,identity,identity-image,lpips,contrastive,all]
        [--diffusers-script PATH [--diffusers-pythonpath DIR]]

On a GPU machine, benchmarks/gpu_session.sh runs the real-width figures at 1024x1024.
It prints figures only; nothing is asserted. The models are random: at tiny width the figures
measure the training loop's own overheads (data, encoding, LoRA bookkeeping), at real width
the transformer's compute and memory per block, never a real model's quality.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("qwen_image_edit", "flux2_klein")
PRESETS = {"qwen_image_edit": "full", "flux2_klein": "all_blocks"}
CAPTION = "EDITFACE paint a yellow square"
SEED = 3
LR = 1e-4
WEIGHT_DECAY = 1e-5  # facelora's AdamW default, passed to the diffusers script too
TERMS = ("none", "regions", "identity", "identity-image", "lpips", "contrastive", "all")


def term_losses(term: str, nets: Path) -> dict:
    """train.losses for one --terms configuration (the networks' files under nets)."""
    regions = {"face": 1.0, "hair": 0.5, "background": 0.1}
    identity = {"weight": 0.1, "window": "face"}
    lpips = {"weight": 0.1, "net": "vgg", "backbone": str(nets / "vgg16_random.pth")}
    contrastive = {"weight": 0.05, "clip_model": str(nets / "clip_vit_l14_random")}
    return {
        "none": {},
        "regions": {"regions": regions},
        "identity": {"identity": identity},
        "identity-image": {"identity": {**identity, "window": "image"}},
        "lpips": {"lpips": lpips},
        "contrastive": {"contrastive": contrastive},
        "all": {
            "regions": regions,
            "identity": identity,
            "lpips": lpips,
            "contrastive": contrastive,
        },
    }[term]


def build_loss_networks(nets: Path) -> None:
    """Random VGG-16 (LPIPS) and a CLIP with ViT-L/14's vision tower and a tiny text side:
    the loss networks' real architectures, for timing only."""
    import torch
    import torchvision.models as tvm
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    nets.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(tvm.vgg16(weights=None).state_dict(), nets / "vgg16_random.pth")
    vocab = ["<|startoftext|>", "<|endoftext|>", "a</w>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={  # ViT-L/14 at 224 px
            "image_size": 224,
            "patch_size": 14,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        projection_dim=768,
    )
    folder = nets / "clip_vit_l14_random"
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# --- children (each measurement runs in its own process) ------------------------------------


def _torch_setup(threads: int, device: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {"torch_threads": torch.get_num_threads()}


def _cuda_peak_mb(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def child_setup(job: dict) -> dict:
    """Build the tiny models, the phase folder and (if asked) its parquet dataset copy."""
    import diffusers
    import numpy as np
    import peft
    import torch
    import transformers
    from PIL import Image

    from facelora.io.datasets import read_manifest, write_kontext_images
    from facelora.models.real_configs import REAL_CONFIGS, real_width_transformer
    from facelora.models.tiny import make_tiny_model

    root = Path(job["root"])
    built, blocks, full_units = {}, {}, {}
    for spec in job["models"]:
        family = spec["family"]
        args = real_width_transformer(family, spec["blocks"]) if spec.get("blocks") else None
        t0 = time.perf_counter()
        model = make_tiny_model(family, root / "models" / spec["name"], transformer_args=args)
        built[spec["name"]] = round(time.perf_counter() - t0, 2)
        config = json.loads((model / "transformer" / "config.json").read_text())
        depth_keys = ("num_layers", "num_single_layers")
        blocks[spec["name"]] = [config[k] for k in depth_keys if k in config]
        # the released depth in --blocks units (Klein: double blocks, 3 single ones each)
        full_units[family] = REAL_CONFIGS[family]["num_layers"]

    # the phase folder, written by facelora's own writer
    data, size = root / "data", job["resolution"]
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(job["pairs"]):
        base = rng.integers(40, 200, (8, 8, 3)).astype(np.uint8)
        start = np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC))
        end = start.copy()
        end[size // 4 : size // 2, size // 4 : size // 2] = (250, 240, 40)
        # a face's 5 landmarks in the middle (eyes, nose, mouth): --regions weighs by them
        face = np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.42, 0.6], [0.58, 0.6]]) * size
        pairs.append(
            {
                "pair_id": f"p{i:012d}",
                "start_crop": start,
                "end_crop": end,
                "end_landmarks": face.tolist(),
            }
        )
    write_kontext_images(data, [{**pair, "caption": CAPTION} for pair in pairs])
    rows = read_manifest(data)
    if job.get("terms"):  # the contrastive term's data: two edits of each start image
        paired = []
        for pair in pairs:
            other = pair["start_crop"].copy()
            other[size // 2 : 3 * size // 4, size // 2 : 3 * size // 4] = (30, 60, 230)
            paired += [pair, {**pair, "pair_id": pair["pair_id"] + "b", "end_crop": other}]
        write_kontext_images(root / "data_paired", [{**p, "caption": CAPTION} for p in paired])
        if set(job["terms"]) & {"lpips", "contrastive", "all"}:
            build_loss_networks(root / "nets")

    if job["parquet"]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def image(name: str) -> dict:
            return {"bytes": (data / name).read_bytes(), "path": name}

        features = {
            "image": {"_type": "Image"},
            "cond_image": {"_type": "Image"},
            "caption": {"dtype": "string", "_type": "Value"},
        }
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        schema = pa.schema(
            [("image", struct), ("cond_image", struct), ("caption", pa.string())],
            metadata={"huggingface": json.dumps({"info": {"features": features}})},
        )
        table = pa.table(
            {
                "image": [image(r["end"]) for r in rows],
                "cond_image": [image(r["start"]) for r in rows],
                "caption": [r["caption"] for r in rows],
            },
            schema=schema,
        )
        (root / "dataset").mkdir()
        pq.write_table(table, root / "dataset" / "train.parquet")
    return {
        "build_seconds": built,
        "blocks": blocks,
        "full_units": full_units,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "cuda_available": torch.cuda.is_available(),
        "cuda_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def child_facelora(job: dict) -> dict:
    """One Trainer run of warmup + steps optimizer steps; per-step seconds from log.csv."""
    info = _torch_setup(job["threads"], job["device"])

    from facelora.config import validate_params
    from facelora.train.loop import Trainer

    family, cached = job["family"], job["mode"] == "cached"
    root = Path(job["root"])
    params = validate_params(
        {
            "seed": SEED,
            "lr": LR,
            "model": {
                "family": family,
                "path": job["model"],
                "device": job["device"],
                "dtype": job["dtype"],
                "quantize": job.get("quantize", "none"),
            },
            "lora": {"rank": job["rank"], "preset": PRESETS[family]},
            "train": {
                "resolution": job["resolution"],
                "batch_size": 1,
                "save_every": 10**9,  # one checkpoint, after the last step
                "cache": cached,
                "gradient_checkpointing": job.get("gradient_checkpointing", False),
                "losses": job.get("losses") or {"regions": job.get("regions") or {}},
            },
            "phases": [{"name": "bench", "steps": job["warmup"] + job["steps"]}],
        }
    )
    t0 = time.perf_counter()
    trainer = Trainer("bench", Path(job["data"]), root / "out", params, cache_dir=root / "cache")
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = trainer.run(show_progress=False)
    run_seconds = time.perf_counter() - t0
    with (root / "out" / "log.csv").open() as fh:
        seconds = [float(row["seconds"]) for row in csv.DictReader(fh)]
    return {
        **info,
        "seconds": seconds[job["warmup"] :],
        "warmup_seconds": seconds[: job["warmup"]],
        "cache_seconds": summary["cache"]["prepare_seconds"] if cached else None,
        "cache_hits": summary["cache"]["hits"],
        "cache_misses": summary["cache"]["misses"],
        "load_seconds": load_seconds,
        "run_seconds": run_seconds,
        "trainable_params": summary["trainable_params"],
        "targets": trainer.targets,
        "rss_mb": peak_rss_mb(),
        "cuda_peak_mb": _cuda_peak_mb(job["device"]),
    }


def child_diffusers(job: dict) -> dict:
    """diffusers' example trainer in this process, its 'Steps' bar timed (see the docstring)."""
    import importlib.util
    import runpy

    if importlib.util.find_spec("datasets") is None:
        raise SystemExit(
            "the diffusers script reads img2img pairs with `datasets`, which is not importable "
            "here: install it, or pass --diffusers-pythonpath DIR"
        )
    info = _torch_setup(job["threads"], job["device"])

    import tqdm.auto

    events: list[tuple[str, str, float]] = []
    base = tqdm.auto.tqdm

    class TimedBar(base):  # what the script's `from tqdm.auto import tqdm` gets
        def __init__(self, *args, **kwargs):
            self._bench_desc = kwargs.get("desc") or ""
            events.append((self._bench_desc, "start", time.perf_counter()))
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            events.append((self._bench_desc, "update", time.perf_counter()))
            return super().update(n)

        def __iter__(self):
            yield from super().__iter__()
            events.append((self._bench_desc, "end", time.perf_counter()))

    tqdm.auto.tqdm = TimedBar
    root = Path(job["root"])
    argv = [
        job["script"],
        "--pretrained_model_name_or_path",
        job["model"],
        "--dataset_name",
        job["dataset"],
        "--cache_dir",
        str(root / "hf_cache"),
        "--image_column",
        "image",
        "--cond_image_column",
        "cond_image",
        "--caption_column",
        "caption",
        "--instance_prompt",
        CAPTION,
        "--output_dir",
        str(root / "out"),
        "--resolution",
        str(job["resolution"]),
        "--center_crop",
        "--train_batch_size",
        "1",
        "--max_train_steps",
        str(job["warmup"] + job["steps"]),
        "--rank",
        str(job["rank"]),
        "--lora_alpha",
        str(2 * job["rank"]),  # facelora's default alpha
        "--lora_layers",
        ",".join(job["targets"]),
        "--learning_rate",
        str(LR),
        "--adam_weight_decay",
        str(WEIGHT_DECAY),
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--checkpointing_steps",
        str(10**9),
        "--mixed_precision",
        {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[job["dtype"]],
        "--report_to",
        "all",
        "--seed",
        str(SEED),
        "--skip_final_inference",
    ]
    if job["mode"] == "cached":
        argv.append("--cache_latents")
    sys.argv = argv
    t0 = time.perf_counter()
    runpy.run_path(job["script"], run_name="__main__")
    run_seconds = time.perf_counter() - t0

    from safetensors.torch import load_file

    saved = root / "out" / "pytorch_lora_weights.safetensors"  # a check: the same LoRA size
    lora = load_file(saved) if saved.is_file() else {}
    starts = [t for d, k, t in events if d == "Steps" and k == "start"]
    updates = [t for d, k, t in events if d == "Steps" and k == "update"]
    stamps = starts[:1] + updates
    seconds = [b - a for a, b in itertools.pairwise(stamps)]
    cache = [t for d, _, t in events if d == "Caching latents"]
    return {
        **info,
        "seconds": seconds[job["warmup"] :],
        "warmup_seconds": seconds[: job["warmup"]],
        "cache_seconds": cache[-1] - cache[0] if len(cache) >= 2 else None,
        "run_seconds": run_seconds,
        "trainable_params": sum(t.numel() for t in lora.values()),
        "rss_mb": peak_rss_mb(),
        "cuda_peak_mb": _cuda_peak_mb(job["device"]),
    }


CHILDREN = {"setup": child_setup, "facelora": child_facelora, "diffusers": child_diffusers}


def run_child(kind: str, job: dict, workdir: Path, threads: int, extra_path: str | None = None):
    """Run one measurement in a fresh interpreter; its result (or its error) as a dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / "job.json", workdir / "result.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(workdir / "hf_home"),
        }
    )
    if job.get("device") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the diffusers script picks cuda whenever it can
        env["ACCELERATE_USE_CPU"] = "true"
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    log = workdir / "child.log"
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", kind, str(job_file), str(result_file)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    if proc.returncode != 0 or not result_file.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(result_file.read_text())


def child_main(kind: str, job_file: str, result_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = CHILDREN[kind](job)
    Path(result_file).write_text(json.dumps(result))


# --- the parent: orchestration and the printed figures ----------------------------------------


def summarise(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    seconds = [s for r in ok for s in r["seconds"]]
    if not seconds:
        return None
    mean = statistics.fmean(seconds)
    caches = [r["cache_seconds"] for r in ok if r.get("cache_seconds") is not None]
    cuda = [r["cuda_peak_mb"] for r in ok if r.get("cuda_peak_mb") is not None]
    return {
        "n": len(seconds),
        "median": statistics.median(seconds),
        "mean": mean,
        "min": min(seconds),
        "max": max(seconds),
        "steps_per_s": 1.0 / mean,
        "rss_mb": max(r["rss_mb"] for r in ok),
        "cuda_mb": max(cuda) if cuda else None,
        "cache_s": statistics.median(caches) if caches else None,
        "runs": ok,
    }


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[tuple[str, str], dict | None], cuda: bool) -> None:
    head = (
        f"{'family':<16} {'trainer / mode':<32} {'steps':>5} {'median s':>9} {'mean s':>9} "
        f"{'min s':>8} {'max s':>8} {'steps/s':>8} {'peak RSS MB':>11}"
    )
    head += f" {'CUDA MB':>8}" if cuda else ""
    head += f" {'cache build s':>13}"
    print(head)
    print("-" * len(head))
    for (family, label), s in results.items():
        if s is None:
            print(f"{family:<16} {label:<32} failed (see above)")
            continue
        line = (
            f"{family:<16} {label:<32} {s['n']:>5} {s['median']:>9.4f} {s['mean']:>9.4f} "
            f"{s['min']:>8.4f} {s['max']:>8.4f} {s['steps_per_s']:>8.2f} {s['rss_mb']:>11.0f}"
        )
        line += f" {_fmt(s['cuda_mb'], '8.0f')}" if cuda else ""
        line += f" {_fmt(s['cache_s'], '13.2f')}"
        print(line)


def print_extrapolation(models, results, full_units: dict, mode: str) -> None:
    """Per-block cost from the shallowest and deepest runs, carried to the released depth."""
    print()
    print(f"extrapolated to the released depth (facelora {mode}; a line through two depths):")
    for family, full in full_units.items():
        points = [
            (m["blocks"], results.get((m["name"], f"facelora {mode}")))
            for m in models
            if m["family"] == family
        ]
        points = [(b, s) for b, s in points if s is not None]
        if len(points) < 2:
            print(f"  {family}: needs two depths that ran (--blocks A,B)")
            continue
        (b1, s1), (b2, s2) = points[0], points[-1]
        unit = "block" if family == "qwen_image_edit" else "double + 3 single blocks"
        for key, label, spec in (("median", "s/step", ".3f"), ("cuda_mb", "CUDA MB", ".0f")):
            if s1[key] is None or s2[key] is None:
                continue
            per = (s2[key] - s1[key]) / (b2 - b1)
            at_full = s2[key] + per * (full - b2)
            print(
                f"  {family}: {label} {format(per, spec)} per {unit}; at the released "
                f"depth ({full}): {format(at_full, spec)}"
            )


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    if a is None or b is None:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument(
        "--resolution", type=int, default=64, help="pixels per side, a multiple of 16"
    )
    parser.add_argument(
        "--width",
        choices=["tiny", "real"],
        default="tiny",
        help="tiny: the test models; real: the released block width and heads, --blocks deep",
    )
    parser.add_argument(
        "--blocks",
        default="2,4",
        help="with --width real: comma-separated depths (Klein: double blocks, each with 3 "
        "single ones); two or more give a per-block line extrapolated to the full model",
    )
    parser.add_argument(
        "--modes", default="cached,uncached", help="comma-separated: cached, uncached"
    )
    parser.add_argument(
        "--quantize", choices=["none", "fp8", "int8", "nf4"], default="none", help="model.quantize"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.gradient_checkpointing (default: on for --width real, off for tiny)",
    )
    parser.add_argument(
        "--regions",
        help="FACE,HAIR,BACKGROUND: train.losses.regions weights (e.g. 1,0.5,0.1); "
        "default: all 1 (the plain loss)",
    )
    parser.add_argument(
        "--terms",
        default="none",
        help=f"comma-separated loss-term configurations to compare ({', '.join(TERMS)})",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: steadiest on a small shared machine)",
    )
    parser.add_argument(
        "--diffusers-script",
        type=Path,
        help="train_dreambooth_lora_flux2_klein_img2img.py (from the diffusers repository) "
        "to time on the same tiny Klein model and data",
    )
    parser.add_argument(
        "--diffusers-pythonpath",
        help="a folder added to PYTHONPATH for the diffusers script's run only "
        "(e.g. where `pip install --target` put `datasets`)",
    )
    parser.add_argument("--keep", type=Path, help="work here instead of a temporary folder")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.pairs < 1 or args.repeat < 1:
        parser.error("--steps, --pairs and --repeat must be >= 1, --warmup >= 0")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.resolution < 64 or args.resolution % 16:
        parser.error("--resolution must be a multiple of 16, at least 64")
    regions = None
    if args.regions:
        try:
            face, hair, background = (float(v) for v in args.regions.split(","))
        except ValueError:
            parser.error("--regions takes three numbers: FACE,HAIR,BACKGROUND")
        regions = {"face": face, "hair": hair, "background": background}
    terms = [t.strip() for t in args.terms.split(",") if t.strip()]
    if not terms or set(terms) - set(TERMS):
        parser.error(f"--terms takes some of {', '.join(TERMS)}")
    if terms != ["none"] and "none" not in terms:
        terms.insert(0, "none")  # the reference every term's cost is given against
    if terms != ["none"] and regions:
        parser.error("--regions and --terms: give the regions as the `regions` term instead")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"cached", "uncached"}:
        parser.error("--modes takes cached and/or uncached")
    try:
        depths = sorted({int(b) for b in args.blocks.split(",")})
    except ValueError:
        parser.error("--blocks takes comma-separated integers")
    if args.width == "real" and (not depths or depths[0] < 1):
        parser.error("--blocks must be >= 1")
    if args.width == "real" and args.diffusers_script is not None:
        parser.error("--diffusers-script compares on the tiny models: leave out --width real")
    checkpointing = (
        args.width == "real" if args.gradient_checkpointing is None else args.gradient_checkpointing
    )
    if args.diffusers_script is not None and not args.diffusers_script.is_file():
        parser.error(f"--diffusers-script {args.diffusers_script}: no such file")
    families = list(FAMILIES) if args.family == "all" else [args.family]
    diffusers = args.diffusers_script is not None and "flux2_klein" in families

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = args.keep.resolve() if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.width == "real":
            models = [
                {"name": f"{f}-{b}", "family": f, "blocks": b} for f in families for b in depths
            ]
        else:
            models = [{"name": f, "family": f} for f in families]
        job = {
            "root": str(root / "setup"),
            "models": models,
            "pairs": args.pairs,
            "resolution": args.resolution,
            "parquet": diffusers,
            "terms": terms if terms != ["none"] else [],
        }
        t0 = time.perf_counter()
        setup = run_child("setup", job, root / "setup", args.threads)
        if "error" in setup:
            print("setup failed:", setup["error"], *setup["log_tail"], sep="\n  ")
            sys.exit(1)
        if args.device == "cuda" and not setup["cuda_available"]:
            print("--device cuda: torch sees no CUDA device here")
            sys.exit(1)
        v = setup["versions"]
        kind = (
            "random models of the released block width, fewer blocks"
            if args.width == "real"
            else "tiny random models"
        )
        print(f"facelora training-loop benchmark ({kind}; figures only)")
        print(
            f"  python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
            f"transformers {v['transformers']}, peft {v['peft']}"
        )
        where = f"cuda ({setup['cuda_name']})" if args.device == "cuda" else "cpu"
        print(
            f"  device {where}, dtype {args.dtype}, torch threads {args.threads} "
            f"(os.cpu_count() {os.cpu_count()})"
        )
        print(
            f"  {args.pairs} pairs at {args.resolution}x{args.resolution}, batch 1, LoRA rank "
            f"{args.rank}; {args.warmup} warm-up + {args.steps} timed steps per run, "
            f"{args.repeat} run(s) per row"
        )
        print(f"  model.quantize {args.quantize}, gradient checkpointing {checkpointing}")
        print(f"  train.losses.regions {regions or 'all 1 (plain loss)'}")
        if terms != ["none"]:
            print(f"  loss terms compared: {', '.join(terms)} (see the docstring)")
        print(f"  load average at start (1, 5, 15 min): {_load()}")
        built = ", ".join(f"{f} {s:.1f} s" for f, s in setup["build_seconds"].items())
        for name, blocks in setup["blocks"].items():
            print(f"  {name}: transformer blocks {' + '.join(map(str, blocks))}")
        print(f"  setup (tiny models: {built}; data): {time.perf_counter() - t0:.1f} s")
        print()

        results: dict[tuple[str, str], dict | None] = {}
        targets: list[str] | None = None
        for spec in models:
            family, name = spec["family"], spec["name"]
            model = str(root / "setup" / "models" / name)
            for mode, term in itertools.product(modes, terms):
                runs = []
                label = f"facelora {mode}" + ("" if term == "none" else f" +{term}")
                paired = term in ("contrastive", "all")
                for r in range(args.repeat):
                    job = {
                        "root": str(root / f"{name}-{mode}-{term}-{r}"),
                        "family": family,
                        "mode": mode,
                        "model": model,
                        "data": str(root / "setup" / ("data_paired" if paired else "data")),
                        "losses": term_losses(term, root / "setup" / "nets")
                        if term != "none"
                        else None,
                        "device": args.device,
                        "dtype": args.dtype,
                        "rank": args.rank,
                        "resolution": args.resolution,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "threads": args.threads,
                        "quantize": args.quantize,
                        "gradient_checkpointing": checkpointing,
                        "regions": regions,
                    }
                    out = run_child("facelora", job, Path(job["root"]), args.threads)
                    if "error" in out:
                        print(f"{name} {label} run {r} failed: {out['error']}")
                        print(*out["log_tail"], sep="\n  ")
                    elif targets is None and family == "flux2_klein":
                        targets = out["targets"]
                    runs.append(out)
                results[(name, label)] = summarise(runs)
                print(f"  done: {name} {label}", flush=True)
            if family == "flux2_klein" and diffusers:
                if targets is None:
                    print("  diffusers script skipped: no facelora Klein run gave the targets")
                    continue
                for mode in ("cached", "uncached"):
                    runs = []
                    for r in range(args.repeat):
                        job = {
                            "root": str(root / f"diffusers-{mode}-{r}"),
                            "script": str(args.diffusers_script.resolve()),
                            "mode": mode,
                            "model": model,
                            "dataset": str(root / "setup" / "dataset"),
                            "device": args.device,
                            "dtype": args.dtype,
                            "rank": args.rank,
                            "targets": targets,
                            "resolution": args.resolution,
                            "steps": args.steps,
                            "warmup": args.warmup,
                            "threads": args.threads,
                        }
                        out = run_child(
                            "diffusers",
                            job,
                            Path(job["root"]),
                            args.threads,
                            args.diffusers_pythonpath,
                        )
                        if "error" in out:
                            print(f"diffusers {mode} run {r} failed: {out['error']}")
                            print(*out["log_tail"], sep="\n  ")
                        runs.append(out)
                    label = "diffusers " + ("cache_latents" if mode == "cached" else "vae/step")
                    results[(family, label)] = summarise(runs)
                    print(f"  done: {family} {label}", flush=True)

        print()
        print_table(results, args.device == "cuda")
        if terms != ["none"]:
            print()
            print("loss terms: s/step and peak memory against the plain loss (same mode):")
            for spec in models:
                for mode in modes:
                    base = results.get((spec["name"], f"facelora {mode}"))
                    for term in terms[1:]:
                        row = results.get((spec["name"], f"facelora {mode} +{term}"))
                        if base is None or row is None:
                            continue
                        line = (
                            f"  {spec['name']:<22} {mode:<8} +{term:<15} s/step "
                            f"{100 * (row['median'] / base['median'] - 1):+6.0f}%, "
                            f"peak RSS {row['rss_mb'] - base['rss_mb']:+7.0f} MB"
                        )
                        if row["cuda_mb"] is not None and base["cuda_mb"] is not None:
                            line += f", CUDA {row['cuda_mb'] - base['cuda_mb']:+7.0f} MB"
                        if term in ("contrastive", "all"):
                            line += " (2 samples per step)"
                        print(line)
        for spec in models if set(modes) == {"cached", "uncached"} else []:
            if spec is models[0]:
                print()
                print("cached / uncached speed-up (uncached s/step / cached s/step):")
            family = spec["name"]
            cached = results.get((family, "facelora cached"))
            uncached = results.get((family, "facelora uncached"))
            print(
                f"  {family:<16} facelora   median {ratio(uncached, cached, 'median')}, "
                f"mean {ratio(uncached, cached, 'mean')}"
            )
            if family == "flux2_klein" and diffusers:
                dc = results.get((family, "diffusers cache_latents"))
                du = results.get((family, "diffusers vae/step"))
                print(
                    f"  {family:<16} diffusers  median {ratio(du, dc, 'median')}, "
                    f"mean {ratio(du, dc, 'mean')}"
                )
        if diffusers:
            print()
            print("diffusers example / facelora, Klein (diffusers s/step / facelora s/step):")
            fc = results.get(("flux2_klein", "facelora cached"))
            fu = results.get(("flux2_klein", "facelora uncached"))
            dc = results.get(("flux2_klein", "diffusers cache_latents"))
            du = results.get(("flux2_klein", "diffusers vae/step"))
            print(
                f"  cached latents: median {ratio(dc, fc, 'median')}, mean {ratio(dc, fc, 'mean')}"
            )
            print(
                f"  no latent cache: median {ratio(du, fu, 'median')}, "
                f"mean {ratio(du, fu, 'mean')} (diffusers still encodes captions once)"
            )
        if args.width == "real":
            print_extrapolation(models, results, setup["full_units"], modes[0])
        print()
        print("notes:")
        for (family, label), s in results.items():
            if s is None or not label.startswith("facelora"):
                continue
            first = s["runs"][0]
            print(
                f"  {family} {label}: model load + LoRA {first['load_seconds']:.1f} s, "
                f"whole run() {first['run_seconds']:.1f} s, encoder calls (cache misses) "
                f"{first['cache_misses']}, cache reads {first['cache_hits']}, trainable "
                f"params {first['trainable_params']}, "
                f"warm-up steps {', '.join(f'{x:.3f}' for x in first['warmup_seconds'])} s"
            )
        for (family, label), s in results.items():
            if s is None or not label.startswith("diffusers"):
                continue
            first = s["runs"][0]
            print(
                f"  {family} {label}: whole script {first['run_seconds']:.1f} s, LoRA params "
                f"saved {first['trainable_params']}, warm-up steps "
                f"{', '.join(f'{x:.3f}' for x in first['warmup_seconds'])} s"
            )
        print(f"  this parent's own peak RSS: {peak_rss_mb():.0f} MB")
        print(f"  load average at the end (1, 5, 15 min): {_load()} (other work skews timings)")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
    else:
        main()

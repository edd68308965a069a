"""Benchmark: decoding the one-step prediction for the loss terms, whole image vs face window.

The identity, LPIPS and contrastive terms decode x0_pred = x_t - sigma v with the family's VAE
and backpropagate through its decoder. This times that decode + backward with the released
VAE architectures (diffusers' AutoencoderKLQwenImage and AutoencoderKLFlux2 at their default,
released configurations, RANDOM weights: their cost, not their output), through facelora's
own `FamilyAdapter.decode_latents`, for

* image  - the whole training image (LPIPS, contrastive, `identity.window: image`);
* face   - only the latent window under the identity embedder's chip (`identity.window:
           face`), for the face of a real photo cropped by the data step's own crop settings
           (crop.padding 0.45, vertical_shift -0.1), the window found by the training code
           (`IdentityEmbedder.footprint`, `latent_window`).

Run it:

    .venv/bin/python benchmarks/bench_decode.py [--resolution 256,512] [--device cpu]
        [--dtype float32] [--threads 2] [--repeat 2] [--backend dlib|arcface]

It prints, per family and resolution, the window's share of the latent grid, seconds per
decode + backward (median of --repeat after one warm-up) and, on CUDA, the peak memory of
each. On a GPU: --resolution 1024 --device cuda --dtype bfloat16. Figures only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "faces" / "same_person" / "obama" / "obama.jpg"


def face_landmarks(side: int) -> np.ndarray:
    """The 5 landmarks of a real face in its crop at side px (the data step's geometry); a
    frontal face at the crop's standard place when the sample photo is not there."""
    from facelora.config import CropParams
    from facelora.prepare.faces.align import plan_crop, transform_points

    if PHOTO.is_file():
        import dlib
        from PIL import Image

        from facelora.config import DlibParams
        from facelora.prepare.faces.dlib_backend import five_from_68, model_path

        rgb = np.asarray(Image.open(PHOTO).convert("RGB"))
        rect = dlib.get_frontal_face_detector()(rgb, 1)[0]
        predictor = dlib.shape_predictor(str(model_path(DlibParams(), "landmarks_model")))
        points = five_from_68(predictor(rgb, rect))
        box, _ = plan_crop(points, rgb.shape[1], rgb.shape[0], CropParams(min_side=64))
        return transform_points(points, box, side)
    eyes = np.array([[0.4, 0.42], [0.6, 0.42], [0.5, 0.52], [0.42, 0.62], [0.58, 0.62]])
    return eyes * side


def adapter_for(family: str, dtype: torch.dtype, device: torch.device):
    """facelora's adapter of the family around a released-architecture VAE (random weights):
    decode_latents is the training code's own."""
    from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage, Flux2KleinPipeline

    from facelora.models.adapters import Flux2Klein, QwenImageEdit

    torch.manual_seed(0)
    if family == "qwen_image_edit":
        vae = AutoencoderKLQwenImage().to(device, dtype).requires_grad_(False).eval()
        adapter = object.__new__(QwenImageEdit)
        adapter.pipe = SimpleNamespace(vae=vae, vae_scale_factor=8)
        channels = vae.config.z_dim
    else:
        vae = AutoencoderKLFlux2().to(device, dtype).requires_grad_(False).eval()
        adapter = object.__new__(Flux2Klein)
        adapter.pipe = SimpleNamespace(
            vae=vae,
            vae_scale_factor=8,
            _unpatchify_latents=Flux2KleinPipeline._unpatchify_latents,
        )
        channels = vae.config.latent_channels * 4
    return adapter, channels


def time_decode(adapter, latents: torch.Tensor, device: torch.device, repeat: int):
    seconds, peak = [], None
    for i in range(repeat + 1):
        x = latents.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        adapter.decode_latents(x).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        if i:  # the first is a warm-up
            seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", default="256,512", help="comma-separated sides")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--backend", choices=["dlib", "arcface"], default="dlib")
    parser.add_argument("--family", default="qwen_image_edit,flux2_klein")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from facelora.train.identity import (
        ArcFaceIdentityEmbedder,
        DlibIdentityEmbedder,
        arcface_template,
    )
    from facelora.train.objectives import latent_window

    if args.backend == "dlib":
        embedder = DlibIdentityEmbedder()
    else:  # the footprint needs only the template: no ONNX file is loaded
        embedder = object.__new__(ArcFaceIdentityEmbedder)
        embedder.template, embedder.side = arcface_template(), 112
    sides = [int(s) for s in args.resolution.split(",")]
    print(
        f"decode + backward through the released VAE architectures (random weights); "
        f"torch {torch.__version__}, {args.device} {args.dtype}, {args.threads} threads, "
        f"identity chip: {args.backend}; face: {PHOTO.name if PHOTO.is_file() else 'a template'}"
    )
    head = f"{'family':<16} {'side':>5} {'window':>13} {'share':>6} {'image s':>8} {'face s':>8}"
    head += f" {'speed-up':>8}"
    if args.device == "cuda":
        head += f" {'image MB':>9} {'face MB':>8}"
    print(head)
    print("-" * len(head))
    for family in args.family.split(","):
        adapter, channels = adapter_for(family, dtype, device)
        cell = 8 if family == "qwen_image_edit" else 16
        for side in sides:
            grid = (side // cell, side // cell)
            latents = torch.randn(1, channels, *grid, device=device, dtype=torch.float32)
            box = embedder.footprint(face_landmarks(side))
            x0, y0, x1, y1 = latent_window(box, cell, grid)
            share = (x1 - x0) * (y1 - y0) / (grid[0] * grid[1])
            image_s, image_mb = time_decode(adapter, latents, device, args.repeat)
            face_s, face_mb = time_decode(
                adapter, latents[..., y0:y1, x0:x1].contiguous(), device, args.repeat
            )
            line = (
                f"{family:<16} {side:>5} {f'{x1 - x0}x{y1 - y0} of {grid[0]}':>13} "
                f"{share:>6.0%} {image_s:>8.3f} {face_s:>8.3f} {image_s / face_s:>7.1f}x"
            )
            if args.device == "cuda":
                line += f" {image_mb:>9.0f} {face_mb:>8.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()

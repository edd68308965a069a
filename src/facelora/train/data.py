"""Training samples from a phase folder, and the on-disk cache of their encodings.

A sample is one pair of the phase's manifest.jsonl: start (control), optional references,
end (target) and caption. All images of a pair are resized to one size, chosen from the
target's aspect ratio at about `train.resolution` squared pixels (multiples of 16), so the
pair stays pixel-aligned; samples of the same size form a bucket, and a batch never mixes
buckets.

The cache keeps the VAE latents and the prompt embeddings as safetensors files, keyed by the
content of the inputs (image bytes, caption), the size, and the identity of the model parts
that made them: a change to any of these gives a new key, an unchanged input is never encoded
twice, across epochs and across phases.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from facelora.errors import MissingInput, SettingsError
from facelora.io.atomic import atomic_path
from facelora.io.progress import progress
from facelora.models.adapters import FamilyAdapter, bucket_size, to_pixels

CACHE_VERSION = "1"  # bump when the encoding code changes meaning


@dataclass
class Sample:
    pair_id: str
    target: list[Path]  # the end image; [start, end] side by side in diptych mode
    controls: list[Path]  # start, then references (none in diptych mode)
    caption: str
    size: tuple[int, int] = (0, 0)  # training width, height of the whole target
    # the loss's regions (train.losses.regions): the end image's 5 landmarks in its pixels
    # (end_size), and/or a grey mask of the end image; None: not known (weight 1)
    landmarks: list[list[float]] | None = None
    end_size: tuple[int, int] = (0, 0)
    mask: Path | None = None

    @property
    def tiles(self) -> int:
        """Images side by side in the target (2 in diptych mode), each with the end's regions."""
        return len(self.target)


def read_phase(
    folder: str | Path,
    resolution: int,
    max_references: int,
    diptych_prefix: str | None = None,
) -> list[Sample]:
    """The phase's pairs; with diptych_prefix, each as one [start | end] image."""
    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise MissingInput(f"{manifest} not found: run the select step for this phase")
    samples = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        start, end = folder / row["start"], folder / row["end"]
        with Image.open(end) as im:
            width, height = im.size
        regions = {
            "landmarks": row.get("end_landmarks"),
            "end_size": (width, height),
            "mask": folder / row["mask"] if row.get("mask") else None,
        }
        if diptych_prefix is not None:
            samples.append(
                Sample(
                    pair_id=row["pair_id"],
                    target=[start, end],
                    controls=[],
                    caption=f"{diptych_prefix} {row['caption']}",
                    size=bucket_size(2 * width, height, resolution),
                    **regions,
                )
            )
            continue
        references = [folder / r for r in row.get("references", [])][:max_references]
        samples.append(
            Sample(
                pair_id=row["pair_id"],
                target=[end],
                controls=[start, *references],
                caption=row["caption"],
                size=bucket_size(width, height, resolution),
                **regions,
            )
        )
    if not samples:
        info = folder / "phase.json"
        reason = json.loads(info.read_text()).get("empty") if info.is_file() else None
        raise SettingsError(reason or f"{folder} holds no pairs")
    return samples


def read_regularization(folder: str | Path, caption: str, resolution: int) -> list[Sample]:
    """Photos the LoRA must leave unchanged: each is its own start and end."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"train.regularization.folder = {folder}: not found")
    samples = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
            continue
        with Image.open(path) as im:
            size = bucket_size(im.width, im.height, resolution)
        samples.append(
            Sample(
                pair_id=f"reg:{path.name}",
                target=[path],
                controls=[path],
                caption=caption,
                size=size,
            )
        )
    if not samples:
        raise SettingsError(f"train.regularization.folder = {folder}: no images in it")
    return samples


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:32]


class EncodingCache:
    """Latents and prompt embeddings of every sample, computed once and kept on disk."""

    def __init__(self, folder: str | Path | None, adapter: FamilyAdapter):
        self.folder = Path(folder) if folder else None
        self.adapter = adapter
        self.vae_id = _digest(CACHE_VERSION, adapter.component_identity("vae"))
        self.text_id = _digest(
            CACHE_VERSION, adapter.component_identity("text_encoder", "tokenizer", "processor")
        )
        self.hits = self.misses = 0

    def _path(self, kind: str, key: str) -> Path | None:
        return None if self.folder is None else self.folder / kind / f"{key}.safetensors"

    def _get(self, kind: str, key: str, compute) -> torch.Tensor:
        """From the disk cache, or computed (and stored when there is a cache folder).
        Without a folder nothing is kept: every use encodes again (train.cache: false)."""
        path = self._path(kind, key)
        if path is not None and path.is_file():
            self.hits += 1
            return load_file(path)["value"]
        with self.adapter.encoders_on_device():
            value = compute().detach().to("cpu").contiguous()
        self.misses += 1
        if path is not None:
            with atomic_path(path) as tmp:
                save_file({"value": value}, str(tmp))
        return value

    def latents(self, images: Path | list[Path], size: tuple[int, int]) -> torch.Tensor:
        """Latents of one image, or of several side by side (a diptych), at size."""
        parts = [images] if isinstance(images, Path) else list(images)
        key = _digest(
            "latents", self.vae_id, *[p.read_bytes() for p in parts], f"{size[0]}x{size[1]}"
        )

        def compute():
            return self.adapter.encode_latents(side_by_side(parts, size))[0]

        return self._get("latents", key, compute)

    def text(self, sample: Sample) -> torch.Tensor:
        contents = [p.read_bytes() for p in sample.controls]
        key = _digest("text", self.text_id, sample.caption, *contents)

        def compute():
            images = [Image.open(p).convert("RGB") for p in sample.controls]
            return self.adapter.encode_text(sample.caption, images)

        return self._get("text", key, compute)

    def prepare(self, samples: list[Sample]) -> None:
        """Encode every sample now (before training, so the encoders can be set aside)."""
        if self.folder is None:
            return
        for s in progress(samples, desc="cache", unit="pair"):
            self.latents(s.target, s.size)
            for control in s.controls:
                self.latents(control, s.size)
            self.text(s)


def side_by_side(parts: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) pixels: the parts resized to equal widths and placed left to right."""
    width, height = size
    if len(parts) == 1:
        with Image.open(parts[0]) as im:
            return to_pixels(im, width, height)
    step = width // len(parts)
    tiles = []
    for i, path in enumerate(parts):
        with Image.open(path) as im:
            tiles.append(to_pixels(im, step if i < len(parts) - 1 else width - step * i, height))
    return torch.cat(tiles, dim=3)

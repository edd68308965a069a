"""The edit kind's local generator: a diffusers edit pipeline from a local folder.

`DiffusersEditor` edits a face crop by an instruction with the pipeline in
`synthesis.generator.model` (any facelora family: QwenImageEditPlusPipeline, Flux2KleinPipeline),
sampled like evaluation samples (`facelora.models.inference.generate`): the crop is the start
image, the instruction the prompt, the output `size` x `size`, seeded. Same request, same bytes.

It answers the data half's `Editor` protocol (facelora.prepare.synthesis.edit) by shape only:
this layer does not import the data half, so `edit` returns a `GeneratedEdit` with the fields
of the data half's EditAnswer and the workflow layer converts it (facelora.workflow.editors).

`request_key` needs no pipeline: the pipeline is loaded at the first `edit`, so a rerun whose
answers are all cached never loads the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from facelora.config import GeneratorParams
from facelora.errors import ModelFileMissing, SettingsError
from facelora.models import inference
from facelora.models.adapters import DTYPES, load_quantized_pipeline, resolve_device, torch_dtype
from facelora.registry.families import FAMILIES, Family, family_of_class

log = logging.getLogger(__name__)

SETTING = "synthesis.generator"
KEY_VERSION = 1  # bump when the meaning of a request changes: old answers stop matching
SIDE_MULTIPLE = 16  # both pipelines need sides divisible by 2 x the VAE's factor 8
FULL_HASH_BYTES = 16 * 2**20  # files up to this size are hashed whole (configs, tokenizers)
SAMPLE_BYTES = 64 * 2**10  # bigger ones: the header plus three samples (weights: gigabytes)
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


@dataclass(frozen=True)
class GeneratedEdit:
    """One after image, with the fields of the data half's EditAnswer."""

    png: bytes
    request_id: str | None  # None: a local generator has no request id
    model: str  # the model folder's name


EditRequest = tuple[list[bytes], str, int]  # (images: start first, instruction, seed)


# --- the model folder ---------------------------------------------------------------------


def pipeline_family(folder: str | Path | None) -> tuple[Path, Family]:
    """The resolved folder of synthesis.generator.model and the facelora family of the
    pipeline in it; a clear error when it is not set, missing or not a facelora pipeline."""
    if folder is None:
        raise SettingsError(
            f"{SETTING}.model is not set: give the local folder of a diffusers edit pipeline "
            "(e.g. a copy of Qwen-Image-Edit-2511 or FLUX.2-klein), or choose an API backend"
        )
    path = Path(folder).expanduser().resolve()
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFileMissing(
            f"{SETTING}.model = {folder}: no diffusers pipeline folder there (model_index.json "
            "missing); set it to a local copy of an edit pipeline (nothing is downloaded)"
        )
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, AttributeError) as exc:
        raise SettingsError(
            f"{SETTING}.model = {folder}: {index} is not readable JSON ({exc}); restore the "
            "model folder"
        ) from None
    found = family_of_class(class_name)
    if found is None or class_name != found.pipeline_class:
        known = ", ".join(f.pipeline_class for f in FAMILIES.values())
        raise SettingsError(
            f"{SETTING}.model = {folder} holds a {class_name}, not a pipeline facelora can "
            f"run ({known}); point it at one of those, or choose an API backend"
        )
    return path, found


def model_fingerprint(folder: str | Path) -> str:
    """A cheap content digest of a model folder: every file's relative path and size, small
    files whole, big ones (weights) by their safetensors header and three samples. Reading a
    few hundred KiB of a 40 GB model tells apart fine-tuned or replaced weights
    without hashing gigabytes. File times are left out: a checkout or copy changes them, not
    the model. Hidden entries (.cache, .huggingface download notes) are skipped."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{rel.as_posix()}\0{size}\0".encode())
        digest.update(_file_digest(path, size))
    return digest.hexdigest()


def _file_digest(path: Path, size: int) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            h.update(f.read())
            return h.digest()
        if path.suffix == ".safetensors":
            # the header names every tensor, its dtype, shape and offsets
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head)
            if 0 < length <= min(SAFETENSORS_MAX_HEADER, size - 8):
                h.update(f.read(length))
        for offset in (0, (size - SAMPLE_BYTES) // 2, size - SAMPLE_BYTES):
            f.seek(max(offset, 0))
            h.update(f.read(SAMPLE_BYTES))
    return h.digest()


# --- images ---------------------------------------------------------------------------------


def _image(data: bytes, index: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise SettingsError(
            f"{SETTING}: input image {index} of an edit request is not a readable image "
            f"({exc}); rerun the crop step that wrote it"
        ) from None


def _png(array: Any) -> bytes:
    """The decoded (H, W, 3) floats in [0, 1] as PNG, as diffusers rounds to 8 bits."""
    rgb = np.asarray(array, dtype=np.float32)
    if not np.isfinite(rgb).all():
        raise SettingsError(
            f"{SETTING}: the pipeline produced NaN/inf pixels (the model overflows in this "
            "dtype); set model.dtype: bfloat16 or float32"
        )
    rgb = (np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "PNG")
    return buf.getvalue()


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars while from_pretrained loads the components (the runner shows one)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    were = [m.is_progress_bar_enabled() for m in modules]
    for m in modules:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip(modules, were, strict=True):
            if on:
                m.enable_progress_bar()


# --- the editor -----------------------------------------------------------------------------


class DiffusersEditor:
    """The local generator of the edit kind (synthesis.generator.backend: diffusers).

    Thread-safe: the request runner calls `edit` from several threads (its concurrency), but a
    pipeline call mutates the scheduler and, for tiny models, diffusers' module constants, so
    calls run one at a time; on one device nothing would be gained by overlapping them.
    """

    secrets: tuple[str, ...] = ()  # no API key

    def __init__(self, settings: GeneratorParams, dtype: str, device: str):
        if settings.size % SIDE_MULTIPLE:
            near = max(1, round(settings.size / SIDE_MULTIPLE)) * SIDE_MULTIPLE
            raise SettingsError(
                f"{SETTING}.size = {settings.size}: the diffusers pipelines need a multiple of "
                f"{SIDE_MULTIPLE} (e.g. {near})"
            )
        if dtype not in DTYPES:
            raise SettingsError(f"model.dtype = {dtype}: use one of {', '.join(DTYPES)}")
        self.settings = settings
        self.folder, self.family = pipeline_family(settings.model)  # fails before any work
        self.dtype = dtype
        self.device = resolve_device(str(device))
        self.model = self.folder.name
        self._fingerprint: str | None = None
        self._pipe: Any = None
        self._lock = threading.Lock()
        if settings.batch_size > 1:
            log.warning(
                "%s.batch_size = %d: the diffusers generator edits one crop per pipeline call "
                "(the pipelines cannot batch different start images reproducibly)",
                SETTING,
                settings.batch_size,
            )

    @property
    def fingerprint(self) -> str:
        """model_fingerprint of the folder, computed once (the first request_key)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.folder)
        return self._fingerprint

    def request_key(self, images: list[bytes], instruction: str, seed: int) -> str:
        """sha256 over canonical JSON of everything that decides the after image. The device
        is left out: a run resumed on another machine reuses the answers it finds."""
        s = self.settings
        parts = {
            "backend": "diffusers",
            "model": {"path": str(self.folder), "fingerprint": self.fingerprint},
            "size": s.size,
            "steps": s.steps,
            "guidance": s.guidance,
            "dtype": self.dtype,
            "images": [hashlib.sha256(b).hexdigest() for b in images],
            "instruction": instruction,
            "seed": int(seed),
        }
        text = json.dumps(
            {"parts": parts, "version": KEY_VERSION},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _pipeline(self) -> Any:
        # under self._lock: loaded once, at the first edit
        if self._pipe is None:
            log.info("%s: loading %s from %s", SETTING, self.family.pipeline_class, self.folder)
            # load_quantized_pipeline, not inference.load_pipeline: that one refuses what
            # training refuses (a step-distilled Klein), which is a fine generator of pairs
            with _quiet_loading():
                self._pipe = load_quantized_pipeline(
                    self.family.name, self.folder, torch_dtype(self.dtype), self.device, "none"
                )
        return self._pipe

    def edit(self, images: list[bytes], instruction: str, seed: int) -> GeneratedEdit:
        """The after image of `images[0]` (later images: references) edited by `instruction`."""
        if not images:
            raise SettingsError(f"{SETTING}: an edit request needs its start image")
        start, *references = (_image(b, i) for i, b in enumerate(images))
        if len(references) > self.family.max_references:
            raise SettingsError(
                f"{SETTING}: {self.family.pipeline_class} takes at most "
                f"{self.family.max_references} reference images besides the start image, "
                f"not {len(references)}"
            )
        s = self.settings
        with self._lock:
            array = inference.generate(
                self._pipeline(),
                start,
                references,
                instruction,
                width=s.size,
                height=s.size,
                steps=s.steps,
                seed=seed,
                guidance=s.guidance,
                output_type="np",  # NaN stays visible (PIL conversion would hide it)
            )
        return GeneratedEdit(_png(array), None, self.model)

    def edit_batch(self, requests: Sequence[EditRequest]) -> list[GeneratedEdit]:
        """One answer per (images, instruction, seed), in order.

        Done one by one on purpose: QwenImageEditPlusPipeline refuses more than one prompt per
        call, and Flux2KleinPipeline shares one set of images across its prompts, so only
        instructions on the same crop could share a call; even those come out different
        from the same requests made alone (tiny Klein, 4 prompts at 256 px: about 1 in 4000
        8-bit values), which would make a cached answer depend on how jobs were grouped.
        """
        return [self.edit(images, instruction, seed) for images, instruction, seed in requests]

"""Evaluate checkpoints: generate every validation edit with the real pipeline + the LoRA,
score it, and write one row per (checkpoint, strength, pair).

A job loads the pipeline and the metric models once and swaps LoRAs for each of its
checkpoints (`eval.checkpoints_per_job`); each LoRA is loaded once and re-weighted for every
strength of `eval.lora_scales` (the `scale` column; the base model's rows have scale 0, what
a LoRA at strength 0 is). Nothing is dropped: a missing or corrupt checkpoint,
a LoRA of another model, a NaN image or an output without a face each give rows with
status `failed` and the reason, scored as failures by the choice.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from facelora.config import Params
from facelora.errors import SettingsError
from facelora.io.atomic import write_csv, write_json, write_png
from facelora.io.datasets import read_manifest
from facelora.io.progress import progress
from facelora.models import lora_io
from facelora.models.adapters import bucket_size, resolve_device
from facelora.prepare.captions import strip_trigger
from facelora.registry.layout import BASE, CHECKPOINTS, Layout, checkpoint_name
from facelora.registry.scores import EVAL_METRICS

log = logging.getLogger(__name__)
BACKEND_COLUMNS = [f"{m}_backend" for m in EVAL_METRICS]
COLUMNS = [
    "phase",
    "step",
    "weights",
    "checkpoint",
    "scale",
    "pair_id",
    "image",
    "status",
    "note",
    *EVAL_METRICS,
    "seconds",
    *BACKEND_COLUMNS,
]


BASE_SCALE = 0.0  # the base model's rows: a LoRA at strength 0 is the model alone


def scale_key(scale: float) -> str:
    """A strength as summary.json's keys and image folders spell it: 1.0 -> "1", 1.25 -> "1.25"."""
    return f"{float(scale):g}"


@dataclass
class ValidationPair:
    pair_id: str
    start: Path
    end: Path
    references: list[Path]
    caption: str
    change: str


def read_validation(folder: str | Path, trigger: str) -> list[ValidationPair]:
    folder = Path(folder)
    pairs = []
    for row in read_manifest(folder):
        pairs.append(
            ValidationPair(
                pair_id=row["pair_id"],
                start=folder / row["start"],
                end=folder / row["end"],
                references=[folder / r for r in row.get("references", [])],
                caption=row["caption"],
                change=strip_trigger(row["caption"], trigger),
            )
        )
    return pairs


def lora_file(train_dir: Path, step: int, use_ema: bool) -> Path:
    """The diffusers-layout LoRA of checkpoint `step` in a phase's training folder."""
    folder = Path(train_dir) / CHECKPOINTS / checkpoint_name(step)
    return (folder / "ema" if use_ema else folder) / lora_io.DIFFUSERS_WEIGHTS


def _eval_size(path: Path, resolution: int) -> tuple[int, int]:
    with Image.open(path) as im:
        return bucket_size(im.width, im.height, resolution)


def _check_lora(path: Path, transformer) -> str | None:
    """Why this checkpoint cannot be evaluated, or None."""
    if not path.is_file():
        return f"checkpoint file missing: {path}"
    try:
        tensors, _ = lora_io.read_lora(path)
    except Exception as exc:  # a truncated or corrupt safetensors file
        return f"checkpoint unreadable ({type(exc).__name__}: {exc})"
    try:
        lora_io.check_compatible(tensors, transformer, str(path))
    except lora_io.LoraMismatch as exc:
        return str(exc)
    return None


class Evaluator:
    def __init__(self, params: Params, metrics=None):
        from facelora.models.inference import load_pipeline

        self.params = params
        device = resolve_device(params.model.device)
        model = params.model
        self.pipe = load_pipeline(model.family, model.path, model.dtype, device, model.quantize)
        if metrics is None:
            from facelora.evaluate.metrics import MetricSuite, settings_from_params

            metrics = MetricSuite(settings_from_params(params))
        self.metrics = metrics
        self.seed = params.eval.seed if params.eval.seed is not None else params.seed

    def _row(self, phase, step, weights, checkpoint, scale, pair, **values) -> dict:
        row = dict.fromkeys(COLUMNS, None)
        row.update(
            phase=phase,
            step=step,
            weights=weights,
            checkpoint=checkpoint,
            scale=float(scale),
            pair_id=pair.pair_id,
            **values,
        )
        for name in EVAL_METRICS:
            row[name] = row[name] if row[name] is not None else float("nan")
        row.update(self.metrics.backend_columns())
        return row

    def evaluate(
        self, phase: str, step: int, lora: Path | None, pairs: list[ValidationPair], out: Path
    ) -> list[dict]:
        """Rows for one checkpoint at every strength of eval.lora_scales (lora None: the base
        model, once, at scale 0). The LoRA is loaded once and re-weighted per strength; every
        strength uses the same seeds, so its rows are what a single-strength run gives."""
        from facelora.models.inference import apply_lora, remove_lora, set_lora_scale

        e = self.params.eval
        weights = "none" if lora is None else ("ema" if e.use_ema else "raw")
        shown = None if lora is None else str(lora)
        if lora is None:
            remove_lora(self.pipe)
            row = functools.partial(self._row, phase, step, weights, shown, BASE_SCALE)
            return self._generate(row, pairs, out, BASE)
        scales = e.scales
        why = _check_lora(lora, self.pipe.transformer)
        if why is not None:
            return [
                self._row(phase, step, weights, shown, s, p, status="failed", note=why)
                for s in scales
                for p in pairs
            ]
        apply_lora(self.pipe, lora, scale=scales[0])
        rows = []
        for scale in scales:
            set_lora_scale(self.pipe, scale)
            row = functools.partial(self._row, phase, step, weights, shown, scale)
            folder = f"step-{step:06d}/scale-{scale_key(scale)}"
            rows.extend(self._generate(row, pairs, out, folder))
        return rows

    def _generate(self, row, pairs: list[ValidationPair], out: Path, folder: str) -> list[dict]:
        """Generate and score every pair with the pipeline as it stands; images in `folder`."""
        from facelora.models.inference import generate

        e = self.params.eval
        rows = []
        for i, pair in enumerate(pairs):
            t0 = time.perf_counter()
            width, height = _eval_size(pair.end, e.resolution)
            start = Image.open(pair.start).convert("RGB")
            refs = [Image.open(r).convert("RGB") for r in pair.references]
            array = generate(
                self.pipe,
                start,
                refs,
                pair.caption,
                width=width,
                height=height,
                steps=e.steps,
                seed=self.seed + i,
                guidance=e.guidance,
                output_type="np",
            )
            array = np.asarray(array, dtype=np.float32).reshape(height, width, -1)
            if not np.isfinite(array).all():
                rows.append(
                    row(
                        pair,
                        status="failed",
                        note="the generated image has NaN/inf values",
                    )
                )
                continue
            image = Image.fromarray(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8))
            name = f"{folder}/{pair.pair_id}.png"
            write_png(out / name, np.asarray(image.convert("RGB")))
            target = Image.open(pair.end).convert("RGB")
            reference = refs[0] if refs else None
            scores = self.metrics.evaluate(image, start, target, reference, pair.change)
            failures, notes = scores.pop("failures", None), scores.pop("notes", None)
            note = "; ".join(n for n in (failures, notes) if n) or None
            rows.append(
                row(
                    pair,
                    image=name,
                    status="failed" if failures else "ok",
                    note=note,
                    seconds=round(time.perf_counter() - t0, 3),
                    **{k: scores.get(k) for k in EVAL_METRICS},
                )
            )
        return rows


def evaluate_group(
    params: Params,
    phase: str,
    steps: list[int],
    validation: Path,
    train_dir: Path | None,
    out: Path,
    evaluator: Evaluator | None = None,
    metrics_out: Path | None = None,
    backends_out: Path | None = None,
) -> pd.DataFrame:
    """Evaluate `steps` of `phase` (phase `base`: the model alone): the generated images in
    `out`, the rows in `metrics_out`, the metric backends in `backends_out` (default: the
    layout's names in `out`)."""
    pairs = read_validation(validation, params.captions.trigger)
    if not pairs:
        raise SettingsError(
            f"{validation} holds no validation pairs: raise split.validation_fraction"
        )
    evaluator = evaluator or Evaluator(params)
    rows = []
    jobs = (
        [(0, None)]
        if phase == BASE
        else [(s, lora_file(train_dir, s, params.eval.use_ema)) for s in steps]
    )
    for step, lora in progress(jobs, desc=f"evaluate {phase}", unit="ckpt"):
        rows.extend(evaluator.evaluate(phase, step, lora, pairs, out))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    write_json(backends_out or Layout.metric_backends(Path(out)), evaluator.metrics.describe())
    write_csv(metrics_out or Path(out) / Layout.METRICS, frame)
    return frame

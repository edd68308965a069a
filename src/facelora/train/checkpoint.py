"""Checkpoints: LoRA weights in both layouts, the EMA, and the full state for exact resume.

    OUT/checkpoints/step-000250/
        pytorch_lora_weights.safetensors   diffusers layout (pipe.load_lora_weights)
        lora_comfyui.safetensors           ComfyUI layout (LoraLoader; the family's key layout)
        ema/pytorch_lora_weights.safetensors  (with train.ema_decay)
        text_encoder_lora.safetensors      (with lora.train_text_encoder)
        state.pt                           optimizer, schedule, RNG states, data position, EMA,
                                           exact LoRA tensors (only in the newest
                                           train.keep_states checkpoints: it is several
                                           times the LoRA's size)
        meta.json                          step, loss, the run's fingerprint

A checkpoint is built in a hidden folder and renamed into place, so a killed run leaves
either a complete checkpoint or none; resume takes the newest complete one whose fingerprint
(settings + data + model) matches the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from facelora.models import exports, lora_io
from facelora.registry.layout import CHECKPOINTS, checkpoint_name

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out: Path, step: int) -> Path:
    """Checkpoint `step` of the training folder `out` (facelora.registry.layout)."""
    return Path(out) / CHECKPOINTS / checkpoint_name(step)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    folder = Path(out) / CHECKPOINTS
    found = []
    if folder.is_dir():
        for d in folder.iterdir():
            m = STEP_DIR.match(d.name)
            if m and (d / "meta.json").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def save(
    out: Path,
    step: int,
    pipeline_class,
    lora_tensors: dict[str, torch.Tensor],
    metadata: dict,
    alpha: float,
    state: dict,
    meta: dict,
    ema_tensors: dict[str, torch.Tensor] | None = None,
    text_encoder_tensors: dict[str, torch.Tensor] | None = None,
    *,
    family: str,
) -> Path:
    """Write checkpoint `step`; `family` (params.model.family) decides the ComfyUI file's keys."""
    final = checkpoint_dir(out, step)
    building = final.with_name(f".{final.name}.building")
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    lora_io.save_diffusers(building, pipeline_class, lora_tensors, metadata)
    exports.save_comfyui(building, lora_tensors, alpha, family)
    if text_encoder_tensors is not None:
        lora_io.save_text_encoder(building, text_encoder_tensors, alpha)
    if ema_tensors is not None:
        (building / "ema").mkdir()
        lora_io.save_diffusers(building / "ema", pipeline_class, ema_tensors, metadata)
    torch.save(state, building / "state.pt")
    (building / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(building, final)
    return final


def latest_matching(out: Path, fingerprint: str) -> tuple[int, Path] | None:
    """The newest complete checkpoint, with its training state, made by a run with the same
    fingerprint."""
    for step, folder in reversed(list_checkpoints(out)):
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("fingerprint") == fingerprint and (folder / "state.pt").is_file():
            return step, folder
    return None


def prune_states(out: Path, keep: int | None) -> list[Path]:
    """Delete state.pt from all but the newest `keep` checkpoints (None: keep every one); their
    LoRA weights stay for evaluation. Returns the folders pruned."""
    if keep is None:
        return []
    pruned = []
    for _, folder in list_checkpoints(out)[:-keep]:
        state = folder / "state.pt"
        if state.is_file():
            state.unlink()
            pruned.append(folder)
    return pruned


def load_state(folder: Path) -> dict:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)

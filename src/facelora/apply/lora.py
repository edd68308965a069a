"""Which LoRA file `--lora` names, the base family it was trained on, and its default scale.

`--lora` is a final folder (final.json: base_model.family, scale), a checkpoint folder
(meta.json: family), or a LoRA file (its header's `facelora_family`, or the meta.json of the
checkpoint it sits in)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from facelora.errors import MissingInput, SettingsError
from facelora.models import lora_io

FAMILY_KEY = "facelora_family"  # what merged files write in their header (release.merge)
FINAL_INFO = "final.json"


@dataclass(frozen=True)
class LoraChoice:
    file: Path
    family: str | None  # None: nothing says (checked against the model's modules instead)
    scale: float | None  # the final model card's strength, when there is one
    trigger: str | None = None  # the final model card's trigger word, when there is one


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve(path: str | Path) -> LoraChoice:
    path = Path(path)
    if path.is_dir():
        file = path / lora_io.DIFFUSERS_WEIGHTS
        if not file.is_file():
            raise MissingInput(f"--lora {path}: no {lora_io.DIFFUSERS_WEIGHTS} in this folder")
    elif path.is_file():
        file = path
    else:
        raise MissingInput(f"--lora {path}: no such file or folder")
    family, scale, trigger = None, None, None
    folders = [file.parent] + ([file.parent.parent] if file.parent.name == "ema" else [])
    for folder in folders:
        final = _json(folder / FINAL_INFO)
        if final:
            family = family or final.get("base_model", {}).get("family")
            if final.get("scale") is not None:
                scale = float(final["scale"])
            trigger = trigger or final.get("trigger")
        family = family or _json(folder / "meta.json").get("family")
    if family is None:
        try:
            with safe_open(str(file), "pt") as f:
                family = (f.metadata() or {}).get(FAMILY_KEY)
        except Exception as exc:
            raise SettingsError(f"--lora {file}: not a readable safetensors file ({exc})") from None
    return LoraChoice(file, family, scale, trigger)


def check_family(choice: LoraChoice, family: str) -> None:
    if choice.family is not None and choice.family != family:
        raise SettingsError(
            f"--lora {choice.file}: trained on a {choice.family} model, but model.family is "
            f"{family}: apply it with a {choice.family} model (model.family, model.path)"
        )

"""Local vision-language models: loading a model folder, asking about two images, and the
optional VLM captioner that describes the change between a pair's crops.

The captioner is off by default (captions.vlm.enabled). Models are loaded only from a local
image-text-to-text model folder (e.g. Qwen2.5-VL-7B-Instruct) with no download; the synthesis
scorer (prepare/synthesis/vlm_scorer.py) loads its model the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from facelora.config import VlmParams
from facelora.errors import ModelFileMissing


def model_folder(value: str | None, setting: str, instead: str) -> Path:
    """The folder `setting` names, if it holds a readable config.json; ModelFileMissing
    (naming the setting, and `instead`: what else the user may do) otherwise."""
    path = Path(value or "").expanduser()
    if not value or not (path / "config.json").is_file():
        raise ModelFileMissing(
            f"{setting} = {value!r}: no model folder with a config.json there; set it to a "
            f"local image-text-to-text model or {instead}"
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileMissing(
            f"{setting} = {value!r}: its config.json does not read as JSON ({exc}); copy the "
            f"model folder again or {instead}"
        ) from None
    if not isinstance(config, dict):
        raise ModelFileMissing(
            f"{setting} = {value!r}: its config.json holds no JSON object; copy the model "
            f"folder again or {instead}"
        )
    return path


def two_images_and_text(text: str) -> list[dict[str, Any]]:
    """The chat messages for one user turn: the first image, the second image, the text."""
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}],
        }
    ]


@dataclass
class LocalVlm:
    """A loaded model folder: its processor and image-text-to-text model, on `device`."""

    processor: Any
    model: Any
    device: str

    def inputs(self, images: list[Image.Image], text: str, answer_start: str = "") -> Any:
        """Model inputs for two images + text; `answer_start` begins the assistant's answer
        (the model continues it)."""
        prompt = self.processor.apply_chat_template(
            two_images_and_text(text), add_generation_prompt=True
        )
        inputs = self.processor(text=[prompt + answer_start], images=images, return_tensors="pt")
        return inputs.to(self.device)


def load_vlm(folder: Path, device: str, setting: str, instead: str) -> LocalVlm:
    """Processor + model from a folder `model_folder` accepted (local files only), on
    `device`, in eval mode; a folder that does not load is a ModelFileMissing naming
    `setting`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def broken(why: str) -> ModelFileMissing:
        return ModelFileMissing(
            f"{setting} = {str(folder)!r}: the folder does not load as an image-text-to-text "
            f"model ({why}); point it at a complete model folder (config.json, weights, "
            f"tokenizer and processor files) or {instead}"
        )

    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        # a partial copy, or a folder of another kind of model: the user must fix the folder
        raise broken(f"{type(exc).__name__}: {str(exc)[:300]}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    # without its tokenizer files, transformers quietly builds an empty tokenizer
    if tokenizer is None or not tokenizer.encode("a face", add_special_tokens=False):
        raise broken("its tokenizer encodes no text: the tokenizer files are missing")
    model.to(device).eval()
    return LocalVlm(processor, model, device)


class VlmCaptioner:
    SETTING = "captions.vlm.model_path"
    INSTEAD = "set captions.vlm.enabled: false"

    def __init__(self, params: VlmParams, pairs_dir: Path):
        import torch

        folder = model_folder(params.model_path, self.SETTING, self.INSTEAD)
        self.params = params
        self.pairs_dir = pairs_dir
        self.vlm = load_vlm(folder, params.device, self.SETTING, self.INSTEAD)
        self.processor, self.model = self.vlm.processor, self.vlm.model
        self._torch = torch

    def __call__(self, pair: dict) -> str:
        images = [
            Image.open(self.pairs_dir / pair["start_crop"]).convert("RGB"),
            Image.open(self.pairs_dir / pair["end_crop"]).convert("RGB"),
        ]
        inputs = self.vlm.inputs(images, self.params.prompt)
        with self._torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.params.max_new_tokens, do_sample=False
            )
        answer = self.processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )[0]
        return clean_instruction(answer)


def clean_instruction(answer: str) -> str:
    """First line of a model answer, without quotes, labels or a trailing full stop."""
    line = next((ln for ln in answer.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(instruction|edit|answer)\s*:\s*", "", line.strip(), flags=re.I)
    return line.strip().strip("\"'`").rstrip(".").strip()

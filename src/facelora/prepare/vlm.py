"""Optional VLM captioner: describe the change between a pair's crops with a local model.

Off by default (captions.vlm.enabled). The model is loaded only from captions.vlm.model_path
(an image-text-to-text model folder, e.g. Qwen2.5-VL-7B-Instruct) with no download.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from facelora.config import VlmParams
from facelora.errors import ModelFileMissing


class VlmCaptioner:
    def __init__(self, params: VlmParams, pairs_dir: Path):
        path = Path(params.model_path or "").expanduser()
        if not params.model_path or not (path / "config.json").is_file():
            raise ModelFileMissing(
                f"captions.vlm.model_path = {params.model_path!r}: no model folder with a "
                f"config.json there; set it to a local image-text-to-text model or set "
                f"captions.vlm.enabled: false"
            )
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.params = params
        self.pairs_dir = pairs_dir
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        self.model.to(params.device).eval()
        self._torch = torch

    def __call__(self, pair: dict) -> str:
        images = [
            Image.open(self.pairs_dir / pair["start_crop"]).convert("RGB"),
            Image.open(self.pairs_dir / pair["end_crop"]).convert("RGB"),
        ]
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": self.params.prompt},
                ],
            }
        ]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        inputs = inputs.to(self.params.device)
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

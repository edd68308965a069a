"""Sampling with the real diffusers pipelines: one edit of one start image, reproducibly.

Training feeds the transformer through the pipelines' own encoding functions
(`facelora.models.adapters`); sampling here calls the pipelines themselves, so what evaluation
sees is what a user of the released LoRA gets with `pipe.load_lora_weights(...)`:

- `load_pipeline(family, path, dtype, device)`: the family's pipeline class from a local
  model folder (checked like training checks it, never downloaded).
- `apply_lora(pipe, lora_file, scale)` / `remove_lora(pipe)`: a saved LoRA file on and off;
  `set_lora_scale(pipe, scale)` changes its strength in place (evaluation's eval.lora_scales).
- `generate(pipe, start, references, caption, ...)`: the start image first, then the
  references (training's order), a seeded generator, explicit size, the PIL image back.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from facelora.errors import MissingInput
from facelora.models import adapters
from facelora.models.adapters import check_model_folder, load_quantized_pipeline, torch_dtype
from facelora.registry.families import Family, family_of_class

LORA_ADAPTER = "facelora"  # the adapter name apply_lora gives the LoRA inside the pipeline


def load_pipeline(
    family: str,
    path: str | Path,
    dtype: str | torch.dtype,
    device: str | torch.device,
    quantize: str = "none",
) -> Any:
    """The family's diffusers pipeline from a local folder, on `device`, progress bar off,
    its transformer stored as in training (model.quantize), so a LoRA is judged on the base
    it was trained against.

    The folder is refused for the same reasons training refuses it (wrong class, distilled
    Klein), so a LoRA is never evaluated on a model it was not trained for.
    """
    check_model_folder(path, family)
    return load_quantized_pipeline(
        family, Path(path), torch_dtype(dtype), torch.device(device), quantize
    )


def apply_lora(pipe: Any, lora_file: str | Path, scale: float = 1.0) -> None:
    """Load a diffusers-layout LoRA file (a checkpoint's pytorch_lora_weights.safetensors)
    into the pipeline under one adapter name, at `scale`; an earlier one is replaced."""
    lora_file = Path(lora_file)
    if not lora_file.is_file():
        raise MissingInput(f"LoRA file not found: {lora_file}")
    remove_lora(pipe)
    pipe.load_lora_weights(
        str(lora_file.parent), weight_name=lora_file.name, adapter_name=LORA_ADAPTER
    )
    set_lora_scale(pipe, scale)


def set_lora_scale(pipe: Any, scale: float) -> None:
    """Re-weight the LoRA apply_lora loaded, without reloading it (peft only rescales it)."""
    pipe.set_adapters([LORA_ADAPTER], adapter_weights=[float(scale)])


def remove_lora(pipe: Any) -> None:
    """Take every LoRA out of the pipeline: the base model again (no-op without one)."""
    if pipe.get_list_adapters():
        pipe.unload_lora_weights()


def _model_folder(pipe: Any) -> Path | None:
    name = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    return Path(name) if name else None


def _family(pipe: Any) -> Family:
    found = family_of_class(type(pipe).__name__)
    if found is None:
        raise TypeError(f"{type(pipe).__name__} is not the pipeline of a facelora model family")
    return found


def reference_sizes(pipe: Any) -> AbstractContextManager:
    """The pipeline's reference sizes, exactly as training sets them (tiny models)."""
    return adapters.reference_sizes(_family(pipe).name, _model_folder(pipe))


def _device(pipe: Any) -> torch.device:
    # with model offloading the pipeline sits on the CPU but runs on its execution device
    return getattr(pipe, "_execution_device", None) or pipe.device


def generate(
    pipe: Any,
    start: Image.Image,
    references: list[Image.Image],
    caption: str,
    *,
    width: int,
    height: int,
    steps: int,
    seed: int,
    guidance: float | None = None,
    output_type: str = "pil",
) -> Image.Image | Any:
    """One edited image: `start` then `references` as the pipeline's images, `caption` as the
    prompt, `steps` flow-matching steps from noise seeded by `seed`. output_type "np" gives the
    float array (H, W, 3) in [0, 1] as decoded, before any conversion hides NaN values.

    guidance: None runs without classifier-free guidance (the conditional prediction only,
    one transformer call per step); a value turns it on: Qwen's true CFG against the negative
    prompt " ", Klein's guidance_scale against its empty prompt.
    """
    images = [start.convert("RGB"), *(r.convert("RGB") for r in references)]
    generator = torch.Generator(device=_device(pipe)).manual_seed(int(seed))
    kwargs: dict[str, Any] = {
        "image": images,
        "prompt": caption,
        "height": int(height),
        "width": int(width),
        "num_inference_steps": int(steps),
        "generator": generator,
        "output_type": output_type,
    }
    if _family(pipe).guidance == "true_cfg":
        if guidance is None:
            kwargs["true_cfg_scale"] = 1.0  # its default (4.0) would only log a warning
        else:
            kwargs.update(true_cfg_scale=float(guidance), negative_prompt=" ")
    else:
        kwargs["guidance_scale"] = 1.0 if guidance is None else float(guidance)
    with reference_sizes(pipe), torch.no_grad():
        return pipe(**kwargs).images[0]

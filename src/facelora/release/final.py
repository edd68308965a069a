"""The final LoRA: the chosen checkpoint of the last phase, in both key layouts, with a model
card that says what made it (base model, data, settings, metrics, the choice of each phase)
and the strength to load it with (the chosen eval strength; the files stay as trained).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from facelora.config import Params
from facelora.io.atomic import write_json, write_text
from facelora.io.datasets import MANIFEST
from facelora.models import exports, lora_io
from facelora.registry.families import family as get_family
from facelora.registry.layout import Layout
from facelora.registry.scores import EVAL_METRICS


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "absent"


def data_version(layout: Layout, params: Params) -> dict:
    """Content hashes of what the LoRA was trained and judged on."""
    out = {"images_table": _file_digest(Path(layout.images()))}
    for phase in params.phase_names:
        out[f"phase:{phase}"] = _file_digest(Path(layout.phase_dir(phase)) / MANIFEST)
    out["validation"] = _file_digest(Path(layout.validation_dir()) / MANIFEST)
    return out


def base_metrics(layout: Layout) -> dict:
    """The model without LoRA on the same pairs (the reference the card compares with)."""
    summary = Path(layout.eval_summary())
    if not summary.is_file():
        return {}
    base = json.loads(summary.read_text()).get("base", {})
    by_scale = next(iter(base.values()), {})  # {"0": {"0": means}}: step 0, strength 0
    entry = next(iter(by_scale.values()), {})
    return {k: entry.get(k) for k in EVAL_METRICS}


def build_final(params: Params, results: Path, out: Path) -> dict:
    """The final LoRA folder `out` (written whole, then renamed into place) from the last
    phase's choice among the results under `results` (paths.results)."""
    layout = Layout(str(results))
    last = params.phase_names[-1]
    choice = json.loads(Path(layout.best(last)).read_text())
    source = Path(choice["lora"])
    scale = float(choice["scale"])
    tensors, meta = lora_io.read_lora(source)
    alpha = float(meta.get("lora_alpha", params.lora.scale_alpha))
    out.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.building"
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    compression = None
    if params.final.merge_rank:  # smaller file: the LoRA's delta, truncated by SVD
        from facelora.release.merge import compress, merge_loras, pipeline_class_for, save_merged

        merged = merge_loras([(source, 1.0)], family=params.model.family)
        merged, compression = compress(merged, params.final.merge_rank)
        save_merged(
            merged, building, pipeline_class_for(params.model.family), family=params.model.family
        )
    else:
        shutil.copyfile(source, building / lora_io.DIFFUSERS_WEIGHTS)
        exports.save_comfyui(building, tensors, alpha, params.model.family)
    if params.final.fuse:  # deployment without peft: the transformer with the LoRA added
        from facelora.release.merge import fuse_and_save, merge_loras

        # a fused model has no strength to set later: fuse at the chosen one
        at_scale = merge_loras(
            [(building / lora_io.DIFFUSERS_WEIGHTS, scale)],
            normalize=False,
            family=params.model.family,
        )
        fuse_and_save(
            params.model.family, params.model.path, at_scale, building / "transformer_fused"
        )
    choices = {}
    for phase in params.phase_names:
        best = Path(layout.best(phase))
        if best.is_file():
            c = json.loads(best.read_text())
            choices[phase] = {k: c[k] for k in ("step", "scale", "score", "reason", "weights")}
    chosen = next(
        t for t in choice["checkpoints"] if t["step"] == choice["step"] and t["scale"] == scale
    )
    info = {
        "scale": scale,  # load with this strength (set_adapters / ComfyUI's strength_model)
        "trigger": params.captions.trigger,  # the first word of every training caption
        # how evaluation generated the edits it chose this checkpoint on
        "inference": {
            "resolution": params.eval.resolution,
            "steps": params.eval.steps,
            "guidance": params.eval.guidance,
        },
        "base_model": {
            "family": params.model.family,
            "path": params.model.path,
            "model_index": _file_digest(Path(params.model.path) / "model_index.json"),
        },
        "lora": {
            "source": str(source),
            "rank": params.lora.rank,
            "alpha": alpha,
            "preset": params.lora.preset,
            "sha256": _file_digest(source),
        },
        "data": data_version(layout, params),
        "metrics": {k: chosen.get(k) for k in EVAL_METRICS},
        "base_metrics": base_metrics(layout),
        "choices": choices,
        "compression": None
        if compression is None
        else {
            "rank": params.final.merge_rank,
            "relative_error": compression["overall"]["relative_error"],
            "energy_kept": compression["overall"]["energy_kept"],
        },
    }
    write_json(building / "final.json", info)
    write_text(building / "README.md", model_card(info, params))
    if out.exists():
        shutil.rmtree(out)
    building.rename(out)
    return info


def files_section(family: str, fused: bool) -> list[str]:
    """The card's list of files: which loader each one is for."""
    pipeline = get_family(family).pipeline_class
    layout = exports.comfyui_layout(family)
    lines = [
        "## Files: which one goes where",
        "",
        f"- `{lora_io.DIFFUSERS_WEIGHTS}`: for diffusers. Load the base model with "
        f'`{pipeline}.from_pretrained(...)`, then `pipe.load_lora_weights("<this folder>", '
        f'weight_name="{lora_io.DIFFUSERS_WEIGHTS}")`. The strength (alpha / rank) is in its '
        "header; it has no `.alpha` tensors (diffusers' loader refuses them). Not for ComfyUI: "
        "it would load there at scale 1 instead of alpha / rank.",
        f"- `{exports.COMFYUI_WEIGHTS}`: for ComfyUI. Copy it into `ComfyUI/models/loras/` and "
        "apply it to the base model with a LoRA loader node (`Load LoRA`, LoraLoaderModelOnly; "
        "or `Load LoRA (Model and CLIP)`, LoraLoader); `strength_model` 1.0 is the strength it "
        "was trained at (each module's `.alpha` tensor gives alpha / rank). Keys: "
        f"`{layout.prefix}<module>`, the layout ComfyUI maps onto this family's weights. Not "
        "for `load_lora_weights`.",
    ]
    if fused:
        lines.append(
            "- `transformer_fused/`: the transformer with the LoRA added into its weights at "
            "the strength below, for deployment without peft (a diffusers model folder)."
        )
    return lines


def strength_section(scale: float) -> list[str]:
    """How strongly to apply the LoRA: the strength evaluation chose (eval.lora_scales)."""
    return [
        f"## Load with strength {scale:g}",
        "",
        f"Validation scored this checkpoint best at LoRA strength {scale:g} (the files are the "
        "checkpoint as trained, at strength 1).",
        "",
        f"- ComfyUI: set `strength_model` to {scale:g} on the LoRA loader node (LoraLoader / "
        "LoraLoaderModelOnly).",
        f'- diffusers: `pipe.load_lora_weights("<this folder>", adapter_name="face")`, then '
        f'`pipe.set_adapters(["face"], adapter_weights=[{scale:g}])`.',
    ]


def model_card(info: dict, params: Params) -> str:
    settings = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
    lines = [
        "# facelora LoRA",
        "",
        f"Base model: `{info['base_model']['family']}` from `{info['base_model']['path']}` "
        f"(model_index {info['base_model']['model_index']}).",
        f"Trigger word: `{params.captions.trigger}`; LoRA rank {info['lora']['rank']}, "
        f"alpha {info['lora']['alpha']}, preset {info['lora']['preset']}.",
        f"Evaluated at resolution {info['inference']['resolution']}, "
        f"{info['inference']['steps']} steps, guidance {info['inference']['guidance']} "
        "(eval.*, which `facelora apply` generates with too).",
        "",
        *strength_section(info["scale"]),
        "",
        *files_section(info["base_model"]["family"], params.final.fuse),
        "",
        "## Validation metrics of this checkpoint (base model without LoRA in brackets)",
        "",
        *[f"- {k}: {v} ({info['base_metrics'].get(k)})" for k, v in info["metrics"].items()],
        "",
        "## How each phase's checkpoint was chosen",
        "",
        *[
            f"- {p}: step {c['step']} ({c['weights']}) at strength {c['scale']:g}, "
            f"score {c['score']}: {c['reason']}"
            for p, c in info["choices"].items()
        ],
        "",
        "## Data (content hashes)",
        "",
        *[f"- {k}: {v}" for k, v in info["data"].items()],
        "",
        "## Settings (params.yaml)",
        "",
        "```yaml",
        settings.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)

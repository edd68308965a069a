"""The model families facelora trains: one record per family, read by everything else.

Config validation, the CLI's choices, model-folder checks, LoRA targets and recipes, training,
sampling, evaluation, the exports and the rules all read these records; nothing else names a
family's classes or limits. Adding a family means one record here plus one adapter class in
facelora.models.adapters (which registers itself under the record's name).

Plain data only (no torch, no diffusers): this module is imported by config validation and by
the Snakefile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from facelora.errors import SettingsError

DOUBLE = "transformer_blocks"  # diffusers' double-stream block stack
SINGLE = "single_transformer_blocks"  # and the single-stream one (FLUX)


@dataclass(frozen=True)
class Preset:
    """LoRA targets: module names relative to a double- and a single-stream block."""

    double: tuple[str, ...]
    single: tuple[str, ...] = ()
    needs_blocks: bool = False  # True: applies only to the blocks given in `lora.blocks`
    doc: str = ""


@dataclass(frozen=True)
class LoraRecipe:
    """The recipe's LoRA for a family: what `lora.preset/rank/alpha: null` resolve to."""

    preset: str
    rank: int
    alpha_per_rank: float


@dataclass(frozen=True)
class Family:
    name: str  # the params.yaml value of model.family
    title: str  # the released model, in words
    pipeline_class: str  # diffusers pipeline class (model_index.json `_class_name`)
    transformer_class: str  # diffusers transformer class (transformer/config.json)
    text_encoder: str  # in words, for messages and model cards
    max_references: int  # reference images besides the start image
    # every nn.Linear of a block, per stack, relative to the block (what lists may name)
    block_linears: dict[str, tuple[str, ...]]
    presets: dict[str, Preset]
    recipe: LoraRecipe
    # model_index.json flags that mean "not trainable here", with the reason
    refused_flags: dict[str, str] = field(default_factory=dict)
    # the pipeline resizes references to module-level pixel counts whatever the output size:
    # tiny models must lower them (facelora.models.tiny.small_reference_sizes)
    fixed_reference_sizes: bool = False
    # the prompt encoding: the pipeline's text-encoder hidden layers and length (None: its own)
    text_encoder_out_layers: tuple[int, ...] | None = None
    max_text_tokens: int | None = None
    # classifier-free guidance: "true_cfg" (a negative prompt, two calls per step) or
    # "guidance_scale" (the pipeline's own guidance against its empty prompt)
    guidance: str = "guidance_scale"
    # the key layout of lora_comfyui.safetensors that ComfyUI maps onto this family's weights
    # (a name in facelora.models.exports.LAYOUTS; tests/test_comfyui_export.py checks it)
    comfyui_layout: str = "diffusion_model"


_QWEN_ATTENTION = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
_QWEN_MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
_FLUX2_DOUBLE = (
    *_QWEN_ATTENTION,
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)
_FLUX2_SINGLE = ("attn.to_qkv_mlp_proj", "attn.to_out")

QWEN_IMAGE_EDIT = Family(
    name="qwen_image_edit",
    title="Qwen-Image-Edit-2511",
    pipeline_class="QwenImageEditPlusPipeline",
    transformer_class="QwenImageTransformer2DModel",
    text_encoder="Qwen2.5-VL (prompt encoded together with the control images)",
    max_references=3,
    # the adaLN Linears (img_mod.1, txt_mod.1) are LoRA-able but in no preset
    block_linears={DOUBLE: (*_QWEN_ATTENTION, *_QWEN_MLP, "img_mod.1", "txt_mod.1"), SINGLE: ()},
    presets={
        "full": Preset(
            (*_QWEN_ATTENTION, *_QWEN_MLP), doc="attention (both streams) + img/txt MLPs"
        ),
        "attention": Preset(_QWEN_ATTENTION, doc="joint attention of both streams"),
        "image_stream": Preset(
            ("attn.to_q", "attn.to_k", "attn.to_v", "img_mlp.net.0.proj", "img_mlp.net.2"),
            doc="q/k/v + the image-stream MLP",
        ),
    },
    # the recipe: full preset, rank 64, alpha 2 x rank
    recipe=LoraRecipe(preset="full", rank=64, alpha_per_rank=2.0),
    fixed_reference_sizes=True,
    guidance="true_cfg",
    comfyui_layout="diffusion_model",
)

FLUX2_KLEIN = Family(
    name="flux2_klein",
    title="FLUX.2 [klein] base",
    pipeline_class="Flux2KleinPipeline",
    transformer_class="Flux2Transformer2DModel",
    text_encoder="Qwen3 (hidden states of layers 9, 18, 27)",
    max_references=4,
    block_linears={DOUBLE: _FLUX2_DOUBLE, SINGLE: _FLUX2_SINGLE},
    presets={
        "all_blocks": Preset(_FLUX2_DOUBLE, _FLUX2_SINGLE, doc="every Linear of every block"),
        "double_stream": Preset(
            _FLUX2_DOUBLE, doc="double-stream blocks only (best face similarity in A/B tests)"
        ),
        "single_stream": Preset((), _FLUX2_SINGLE, doc="single-stream blocks only"),
        "blocks": Preset(
            _FLUX2_DOUBLE,
            _FLUX2_SINGLE,
            needs_blocks=True,
            doc="all_blocks targets on the selected blocks (double first, then single)",
        ),
    },
    # the recipe: double-stream blocks (best face similarity in A/B tests), rank 128, alpha 64
    recipe=LoraRecipe(preset="double_stream", rank=128, alpha_per_rank=0.5),
    refused_flags={
        "is_distilled": "is the step-distilled FLUX.2 Klein: LoRAs must be trained on the base "
        "model (FLUX.2-klein-base), whose sampling they then transfer to"
    },
    text_encoder_out_layers=(9, 18, 27),  # the pipeline's default
    max_text_tokens=512,  # the pipeline's default max_sequence_length
    guidance="guidance_scale",
    # ComfyUI's FLUX.2 has BFL names; it maps `transformer.<diffusers module>` onto them
    comfyui_layout="transformer",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN_IMAGE_EDIT, FLUX2_KLEIN)}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


class UnknownFamily(SettingsError):
    """A family name that is not in the registry."""


def family(name: str) -> Family:
    """The record of `name`; an unknown name is refused with the valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamily(
            f"unknown model family {name!r}; valid: {', '.join(FAMILY_NAMES)}"
        ) from None


def family_of_class(class_name: str | None) -> Family | None:
    """The family whose pipeline or transformer class is `class_name`, or None."""
    return next(
        (f for f in FAMILIES.values() if class_name in (f.pipeline_class, f.transformer_class)),
        None,
    )

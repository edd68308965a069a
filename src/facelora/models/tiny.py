"""Tiny random-initialised edit pipelines, built offline, for tests and demos.

`make_tiny_model(family, out, seed)` writes a complete diffusers pipeline folder (model_index.json
plus one folder per component, the real repositories' layout) whose components are the SAME
classes as the real models, only a few layers deep and a few dozen channels wide:

- "qwen_image_edit" (Qwen-Image-Edit-2511): QwenImageEditPlusPipeline with a
  QwenImageTransformer2DModel (`zero_cond_t=True`), AutoencoderKLQwenImage, a
  Qwen2_5_VLForConditionalGeneration text encoder, a Qwen2Tokenizer, a Qwen2VLProcessor (image +
  video processor) and the repository's FlowMatchEulerDiscreteScheduler settings.
- "flux2_klein" (FLUX.2 [klein] base): Flux2KleinPipeline with a Flux2Transformer2DModel,
  AutoencoderKLFlux2, a Qwen3ForCausalLM text encoder, a Qwen2 tokenizer with a Qwen3-style
  chat template, a FlowMatchEulerDiscreteScheduler and `is_distilled: false`.

Everything the real models fix through their interfaces is kept: latent channels (Qwen 16,
packed 2x2 into 64; Klein 32, patchified 2x2 into 128), the VAE's 8x downsampling, the pipeline's
64-token Qwen system prefix, Klein's default text-encoder layers (9, 18, 27) (the Qwen3 has 36
layers, like Qwen3-4B/8B) and its batch-norm latent statistics (given non-trivial values here so
that code which forgets to normalise shows up). Nothing is downloaded: the byte-level BPE
tokenizer is trained here, and the weights are random with fixed seeds, so the same seed gives
byte-identical files. `facelora_tiny.json` beside model_index.json says so: these models
produce noise and must never be mistaken for real ones.

`small_reference_sizes()` lowers the Qwen edit pipeline's reference-image sizes (module
constants, 1024x1024 and 384x384 pixels) so that a tiny pipeline call stays tiny.

See ../../../../shared/notes/TINY_MODELS.md for the traps these builders avoid.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from facelora.errors import RefusedInput, SettingsError
from facelora.io.atomic import atomic_dir
from facelora.registry.families import FAMILY_NAMES

MARKER = "facelora_tiny.json"
# The number of leading tokens QwenImageEditPlusPipeline drops from the templated prompt.
QWEN_PROMPT_PREFIX_TOKENS = 64

# Qwen2.5-VL's special tokens, in the real tokenizer's order (ids follow the trained vocab).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen3 adds the tool-call and thinking markers.
QWEN3_SPECIAL_TOKENS = [*QWEN_SPECIAL_TOKENS, "<tool_call>", "</tool_call>", "<think>", "</think>"]

# The Qwen2-VL chat template (the processor's); the edit pipeline formats its own prompt.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3's chat template, reduced to what Flux2KleinPipeline uses: string messages, the generation
# prompt and `enable_thinking=False` (an empty think block), as in the real tokenizer.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# Qwen-Image's scheduler/scheduler_config.json (shared by Qwen-Image-Edit-2511).
QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# FLUX.2's scheduler settings (Flux2KleinPipeline passes its own empirical mu at each call).
FLUX2_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Short texts the BPE is trained on besides the pipeline's own template: every word of the
# template becomes one token (as in the real 151k vocabulary), other words split into pieces.
CORPUS = [
    "You are a helpful assistant.",
    "Picture 1: Picture 2: Picture 3: Video 1: user assistant system",
    "open the eyes wider",
    "make the smile bigger and the skin smoother",
    "remove the glasses and restore the face",
    "add a beard, darken the hair, brighten the light",
    "turn the head to the left and close the mouth",
    "change the colour of the eyes to green",
    "a portrait photo of a person, studio light",
]
BPE_VOCAB = 2000  # an upper bound: training stops once every word of the corpus is one token


def qwen_prompt_template() -> tuple[str, int]:
    """(template, drop_idx) of QwenImageEditPlusPipeline, read from a component-less instance."""
    from diffusers import QwenImageEditPlusPipeline

    bare = QwenImageEditPlusPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=None,
    )
    return bare.prompt_template_encode, bare.prompt_template_encode_start_idx


def _train_bpe(extra: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained with Qwen2's pre-tokenizer, to saturation."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*CORPUS, *extra], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _tokenizer(special: list[str], chat_template: str | None = None) -> Any:
    """The trained BPE as a Qwen2Tokenizer; the special tokens get the ids after the vocab."""
    from transformers import Qwen2Tokenizer

    # Strip the special tokens out of the template text: they are never BPE-split.
    template, _ = qwen_prompt_template()
    for token in special:
        template = template.replace(token, "\n")
    vocab, merges = _train_bpe([template])
    vocab = dict(vocab)
    vocab.update({token: len(vocab) + i for i, token in enumerate(special)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
        extra_special_tokens=special,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def qwen_prefix_length(tokenizer: Any) -> int:
    """How many tokens the pipeline's system prefix (the text before the prompt) takes."""
    template, _ = qwen_prompt_template()
    return len(tokenizer(template.split("{}")[0])["input_ids"])


def _check_qwen_prefix(tokenizer: Any, where: str = "the tiny tokenizer") -> None:
    """Raise unless the pipeline's system prefix is exactly the tokens the pipeline drops.

    A wrong length crops the prompt embeddings silently (too few: system text leaks in; too
    many: the start of the user text, i.e. the "Picture 1:" image tokens, is cut).
    """
    prefix = qwen_prefix_length(tokenizer)
    _, drop_idx = qwen_prompt_template()
    if prefix != drop_idx:
        raise RuntimeError(
            f"{where} makes the Qwen edit system prefix {prefix} tokens, but the pipeline "
            f"drops {drop_idx}: prompts would be cropped wrongly"
        )


def _check_saved(family: str, folder: Path) -> None:
    """Re-check, on the files just written, what the pipeline relies on."""
    if family == "qwen_image_edit":
        from transformers import Qwen2Tokenizer, Qwen2VLProcessor

        _check_qwen_prefix(Qwen2Tokenizer.from_pretrained(folder / "tokenizer"), "tokenizer/")
        processor = Qwen2VLProcessor.from_pretrained(folder / "processor")
        _check_qwen_prefix(processor.tokenizer, "processor/")


def _seed_everything(seed: int, component: str) -> None:
    """Seed torch, numpy and random for one component (its own stream, stable across runs)."""
    import random

    import numpy as np
    import torch

    derived = (seed * 1_000_003 + zlib.crc32(component.encode())) % 2**32
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)


# --- Qwen-Image-Edit-2511 --------------------------------------------------------------------

QWEN_TEXT_HIDDEN = 32


def _qwen_image_edit(seed: int, transformer_args: dict | None = None) -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _tokenizer(QWEN_SPECIAL_TOKENS)
    _check_qwen_prefix(tokenizer)
    # The real Qwen2.5-VL image processor: 14 px patches, 2x2 merged, 56x56 px at least.
    sizes = {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 16384,
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )

    ids = dict(
        zip(
            QWEN_SPECIAL_TOKENS,
            tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS),
            strict=True,
        )
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": QWEN_TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 128000,
            "max_window_layers": 2,
            # head_dim 16: M-RoPE splits its 8 frequencies 2:3:3 between t, h, w (real 16:24:24)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "out_hidden_size": QWEN_TEXT_HIDDEN,
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    _seed_everything(seed, "text_encoder")
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    _seed_everything(seed, "transformer")
    args = {
        "patch_size": 2,
        "in_channels": 64,  # 16 latent channels, 2x2-packed
        "out_channels": 16,
        "num_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": QWEN_TEXT_HIDDEN,
        "guidance_embeds": False,
        "axes_dims_rope": (4, 6, 6),  # sums to the head dim (real: 16, 56, 56)
        "zero_cond_t": True,
    }
    transformer = QwenImageTransformer2DModel(**{**args, **(transformer_args or {})}).eval()

    _seed_everything(seed, "vae")
    # Real latents_mean/latents_std (the class defaults) and 8x downsampling, narrow channels.
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    return QwenImageEditPlusPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )


# --- FLUX.2 [klein] base ---------------------------------------------------------------------

KLEIN_TEXT_HIDDEN = 16
KLEIN_TEXT_LAYERS = 36  # like Qwen3-4B/8B, so the default out layers (9, 18, 27) are intermediate
KLEIN_OUT_LAYERS = (9, 18, 27)


def _flux2_klein(seed: int, transformer_args: dict | None = None) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _tokenizer(QWEN3_SPECIAL_TOKENS, QWEN3_CHAT_TEMPLATE)
    ids = dict(
        zip(
            QWEN3_SPECIAL_TOKENS,
            tokenizer.convert_tokens_to_ids(QWEN3_SPECIAL_TOKENS),
            strict=True,
        )
    )
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=KLEIN_TEXT_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=KLEIN_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,  # Qwen3Config defaults to 128 whatever the width
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    _seed_everything(seed, "text_encoder")
    text_encoder = Qwen3ForCausalLM(config).eval()

    _seed_everything(seed, "transformer")
    args = {
        "patch_size": 1,
        "in_channels": 128,  # 32 latent channels, 2x2-patchified
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": len(KLEIN_OUT_LAYERS) * KLEIN_TEXT_HIDDEN,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": (4, 4, 4, 4),  # sums to the head dim (real: 32 x 4)
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": False,
    }
    transformer = Flux2Transformer2DModel(**{**args, **(transformer_args or {})}).eval()

    _seed_everything(seed, "vae")
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),  # four levels: 8x downsampling as the real VAE
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
    ).eval()
    # Non-trivial latent statistics (the real ones are not 0 and 1): unnormalised latents show.
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) * 1.5 + 0.5)

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


_BUILDERS = {"qwen_image_edit": _qwen_image_edit, "flux2_klein": _flux2_klein}


def _is_empty_or_tiny(path: Path) -> bool:
    """True if path is missing, an empty folder, or an earlier tiny build (safe to replace)."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    return not any(path.iterdir()) or (path / MARKER).is_file()


def make_tiny_model(
    family: str, out: str | Path, seed: int = 0, transformer_args: dict | None = None
) -> Path:
    """Build a tiny random `family` pipeline and save it into `out` (the real repo layout).

    `out` must be missing, empty, or an earlier tiny build (which is replaced). The folder is
    written beside `out` first and renamed into place, so a killed build leaves nothing behind.
    `transformer_args` overrides the transformer's constructor arguments (e.g. the real block
    width from facelora.models.real_configs, for benchmarks); the text encoder stays tiny, so
    `joint_attention_dim` must stay as built. A transformer of a billion or more parameters
    is saved in bf16 (as the released models are), others in fp32.
    """
    if family not in _BUILDERS:
        raise SettingsError(f"family must be one of {FAMILY_NAMES}, not {family!r}")
    out = Path(out)
    if not _is_empty_or_tiny(out):
        raise RefusedInput(f"{out} exists and is not an earlier tiny model: not replacing it")

    import numpy as np
    import torch

    with torch.random.fork_rng(devices=[]):
        state = np.random.get_state()
        try:
            pipe = _BUILDERS[family](int(seed), transformer_args)
        finally:
            np.random.set_state(state)
    if sum(p.numel() for p in pipe.transformer.parameters()) >= 10**9:
        pipe.transformer.to(torch.bfloat16)

    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _check_saved(family, tmp)
        marker = {
            "family": family,
            "seed": int(seed),
            "random_weights": True,
            "note": "facelora tiny test model: random weights, NOT a real model",
            "pipeline": type(pipe).__name__,
        }
        if transformer_args:
            marker["transformer_args"] = transformer_args
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out


@contextmanager
def small_reference_sizes(vae_side: int = 64, condition_side: int = 32) -> Iterator[None]:
    """Temporarily make QwenImageEditPlusPipeline resize references to tiny sizes.

    The pipeline resizes each reference to about VAE_IMAGE_SIZE pixels (1024x1024) for the VAE
    and CONDITION_IMAGE_SIZE (384x384) for the text encoder, whatever the output size: at 64x64
    on a tiny model that is 4096 latent tokens per reference. Sides are rounded to multiples
    of 32 by the pipeline, so they must be multiples of 32 here. Not thread-safe: it changes
    module globals of diffusers for the duration.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    for name, side in (("vae_side", vae_side), ("condition_side", condition_side)):
        if side <= 0 or side % 32:
            raise SettingsError(f"{name} must be a positive multiple of 32, not {side}")
    saved = (module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE)
    module.VAE_IMAGE_SIZE = vae_side * vae_side
    module.CONDITION_IMAGE_SIZE = condition_side * condition_side
    try:
        yield
    finally:
        module.VAE_IMAGE_SIZE, module.CONDITION_IMAGE_SIZE = saved


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The facelora_tiny.json of a model folder, or None for a folder without one (real)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())

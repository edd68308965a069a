"""A tiny random-initialised Qwen2.5-VL (model + processor), built offline for tests.

`build_tiny_qwen2_5_vl(dest)` writes a complete image-text-to-text model folder that loads with
`AutoProcessor` / `AutoModelForImageTextToText` and `local_files_only=True`. Nothing is
downloaded: the byte-level BPE is trained here on a few sentences and wrapped as a
`Qwen2Tokenizer` with Qwen's special tokens appended (their ids follow the trained vocabulary,
and the model config's image/video/vision token ids are read from the tokenizer), and the
weights are random with a fixed seed, so two builds are byte-identical. It answers gibberish;
it exists to run the real classes end to end.

Layouts:
- "transformers": what `save_pretrained` writes (config.json, generation_config.json,
  model.safetensors, tokenizer.json, tokenizer_config.json, processor_config.json holding the
  image and video processors, chat_template.jinja).
- "hub": the file set of the Qwen/Qwen2.5-VL-*-Instruct repositories (preprocessor_config.json
  with min_pixels/max_pixels and no video processor config, chat_template.json, vocab.json,
  merges.txt, a transformers-4-style tokenizer_config.json, sampling defaults in
  generation_config.json), i.e. what a user's downloaded model folder looks like.

Sizes: text model 2 layers, hidden 64, 4 heads (2 KV heads), vocabulary 414; vision tower 2
blocks, hidden 32, 8 px patches merged 2x2 into one token. The image processor resizes every
image to between 32x32 and 64x64 pixels, so a square crop of any size costs IMAGE_TOKENS (16)
image tokens. About 0.8 MB on disk; the build takes well under a second once torch and
transformers are imported. The generation config suppresses every token that is not a
lowercase word (optionally with a leading space), special tokens and EOS included, so greedy
decoding always yields max_new_tokens words. See ../shared/notes/TINY_MODELS.md for the traps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SEED = 0
PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64
# A square image is resized to 64x64: (64 / 8) ** 2 patches, 2x2 of them per token.
IMAGE_TOKENS = (64 // PATCH_SIZE) ** 2 // MERGE_SIZE**2
BPE_VOCAB = 400
LAYOUTS = ("transformers", "hub")

# Qwen2.5-VL's special tokens, in the real tokenizer's order (ids follow the trained vocab).
SPECIAL_TOKENS = [
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

# The Qwen2-VL / Qwen2.5-VL chat template: system prefix, {"type": "image"} entries,
# add_generation_prompt.
CHAT_TEMPLATE = (
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

CORPUS = [
    "You are a helpful assistant.",
    "The first image is before an edit, the second after. Describe the edit as one short "
    "imperative instruction, e.g. 'open the eyes wider'. Answer with the instruction only.",
    "open the eyes wider",
    "make the smile bigger and the skin smoother",
    "remove the glasses and restore the face",
    "add a beard, darken the hair, brighten the light",
    "turn the head to the left and close the mouth",
    "change the colour of the eyes to green",
    "Picture 1: Picture 2: Video 1: user assistant system",
]


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on CORPUS with Qwen2's pre-tokenizer."""
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
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The trained BPE as a Qwen2Tokenizer; the special tokens get the ids after the vocab."""
    from transformers import Qwen2Tokenizer

    vocab = dict(vocab)
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=4096,
        extra_special_tokens=SPECIAL_TOKENS,
    )


def _processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = {
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
    }
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=CHAT_TEMPLATE,
    )


def _word_only_suppression(tokenizer) -> list[int]:
    """Ids of every token that does not decode to a lowercase word (optionally ' word')."""
    return [
        i
        for i in range(len(tokenizer))
        if not re.fullmatch(r" ?[a-z]+", tokenizer.decode([i], skip_special_tokens=False))
    ]


def _model(tokenizer):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS), strict=True))
    hidden = 64
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "max_window_layers": 2,
            # head_dim 16: M-RoPE splits its 8 frequencies between t, h and w
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
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            # windowed attention over 2x2 merged tokens (window_size // merge // patch = 2)
            "window_size": 2 * MERGE_SIZE * PATCH_SIZE,
            "fullatt_block_indexes": [1],
            "out_hidden_size": hidden,
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = _word_only_suppression(tokenizer)
    return model


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _to_hub_layout(dest: Path, tokenizer, vocab: dict, merges: list) -> None:
    """Rewrite a save_pretrained folder into the Qwen2.5-VL-Instruct repositories' file set."""
    image = json.loads((dest / "processor_config.json").read_text())["image_processor"]
    size = image.pop("size")
    image.update(
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
        processor_class="Qwen2_5_VLProcessor",
    )
    _write_json(dest / "preprocessor_config.json", image)
    (dest / "processor_config.json").unlink()
    template = dest / "chat_template.jinja"
    _write_json(dest / "chat_template.json", {"chat_template": template.read_text()})
    template.unlink()

    _write_json(dest / "vocab.json", vocab)
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (dest / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, **token, "special": True}
            for i, t in zip(ids, SPECIAL_TOKENS, strict=True)
        },
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(dest / "tokenizer_config.json", config)

    generation = json.loads((dest / "generation_config.json").read_text())
    generation.update(
        do_sample=True,
        eos_token_id=[ids[2], ids[0]],  # <|im_end|>, <|endoftext|>
        repetition_penalty=1.05,
        temperature=0.1,
        top_k=1,
        top_p=0.001,
    )
    _write_json(dest / "generation_config.json", generation)


def build_tiny_qwen2_5_vl(dest: Path, layout: str = "transformers") -> Path:
    """Write the tiny model folder into dest (created if needed) and return dest."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_bpe()
    tokenizer = _tokenizer(vocab, merges)
    processor = _processor(tokenizer)
    model = _model(tokenizer)
    processor.save_pretrained(dest)
    model.save_pretrained(dest)
    if layout == "hub":
        _to_hub_layout(dest, tokenizer, vocab, merges)
    return dest

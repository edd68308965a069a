"""Helpers the tests share. Not a test module: test files import from here, never from one
another or from conftest (which holds only fixtures).

- paths: ROOT (the repository), SHARED_FACES (real photos, optional), BIN (this interpreter's
  scripts: facelora, snakemake, dvc)
- phase folders: `write_phase_folder` (the package's own `write_kontext_images`), the square
  edit pairs `write_pairs` is made of (`smooth_image`, `paint_square`), and training settings
  for the tiny models (`settings`, FAMILIES)
- the data half in-process (`run_data_half`) and a tiny project to run the workflow in
  (`make_project`, SHORT_PHASES)
- face images and tiny InsightFace-format model packs (`face_image`, `expected_face`,
  `make_pack`)
- a tiny Qwen2.5-VL captioner (`build_tiny_qwen2_5_vl`, IMAGE_TOKENS, LAYOUTS)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from facelora.config import Params, validate_params
from facelora.io.datasets import write_kontext_images
from facelora.models.tiny import QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
SHARED_FACES = Path(os.environ.get("FACELORA_SHARED_FACES", ROOT.parent / "shared" / "faces"))
# ComfyUI's source tree (an archive), for tests that load LoRA files with ComfyUI's own code.
SHARED_COMFYUI = Path(os.environ.get("FACELORA_SHARED_COMFYUI", ROOT.parent / "shared" / "comfyui"))
BIN = Path(sys.executable).parent
FAMILIES = ["qwen_image_edit", "flux2_klein"]
CAPTION = "EDITFACE paint a yellow square"

# --- phase folders --------------------------------------------------------------------------


def write_phase_folder(folder: Path, pairs, caption: str = CAPTION, prefix: str = "p") -> Path:
    """A phase folder of (start, end) image pairs (PIL images or RGB arrays), all with one
    caption, ids PREFIX000000000000, PREFIX000000000001, ...: the package's Kontext layout and
    manifest, written by the package's own writer."""
    rows = [
        {"pair_id": f"{prefix}{i:012d}", "start_crop": start, "end_crop": end, "caption": caption}
        for i, (start, end) in enumerate(pairs)
    ]
    write_kontext_images(folder, rows)
    return folder


def smooth_image(rng: np.random.Generator, size: int = 64, cells: int = 8, low: int = 40):
    """Random colour cells (values low..199) blown up to size x size with a bicubic resize."""
    base = rng.integers(low, 200, (cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC))


def paint_square(start: np.ndarray) -> np.ndarray:
    """The edit the tiny models learn: a yellow square over the second quarter of each side."""
    h, w = start.shape[:2]
    end = start.copy()
    end[h // 4 : h // 2, w // 4 : w // 2] = (250, 240, 40)
    return end


def write_pairs(folder: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """A phase folder: smooth random starts; ends with a bright square painted on."""
    rng = np.random.default_rng(seed)
    starts = [smooth_image(rng, size) for _ in range(n)]
    return write_phase_folder(folder, [(start, paint_square(start)) for start in starts])


def settings(family: str, model: Path, steps: int = 6, **train):
    return validate_params(
        {
            "seed": 3,
            "lr": 1e-3,
            "model": {"family": family, "path": str(model)},
            "lora": {"rank": 4, "preset": "full" if family == "qwen_image_edit" else "all_blocks"},
            "train": {"resolution": 64, "save_every": 3, **train},
            "phases": [
                {"name": "one", "steps": steps},
                {"name": "two", "steps": 3, "init_from": "last"},
            ],
        }
    )


# --- the data half in-process, and a tiny project for the workflow --------------------------


def run_data_half(raw: Path, results: Path, params: Params, shards: int = 1) -> Path:
    """detect -> crop -> synthesize (synthesis.kinds) -> pair index -> pairs -> captions ->
    split -> phases, in-process, at the results layout's paths under `results`."""
    from facelora.prepare.captions import caption_pairs
    from facelora.prepare.faces.crop import crop_shard, gather_crops
    from facelora.prepare.faces.detect import DetectOutputs, detect_shard, gather_detections
    from facelora.prepare.listing import write_listings
    from facelora.prepare.pairs.index import build_index, write_index
    from facelora.prepare.pairs.score import gather_pairs, score_shard
    from facelora.prepare.phases import run_select
    from facelora.prepare.split import run_split
    from facelora.prepare.synthesis.made import MadeFolder
    from facelora.prepare.synthesis.run import ShardOutputs, gather_synthesis, synthesize_shard
    from facelora.registry.layout import Layout

    L = Layout(str(results))
    # the shard tables apart from the step folders, so that runs with different shard counts
    # leave identical step folders to compare
    S = Layout(str(results / "shards"))
    detected = [(S.faces_shard(i), S.images_shard(i)) for i in range(shards)]
    # each shard reads its listing of the folder, as the workflow's detect jobs do
    write_listings(raw, params.images, shards, S.raw_listing, S.raw_sidecars_listing())
    for i, (faces, images) in enumerate(detected):
        detect_shard(raw, faces, images, params, (i, shards), listing=S.raw_listing(i))
    gather_detections(detected, DetectOutputs(L.faces(), L.images(), L.faces_rejected()))
    crop_tables = [S.crops_shard(i) for i in range(shards)]
    for i, table in enumerate(crop_tables):
        crop_shard(raw, L.faces(), L.images(), L.crops_dir(), table, params, (i, shards))
    gather_crops(crop_tables, L.crops_dir(), L.crops(), L.crops_rejected())
    made = []
    for kind in params.synthesis.kinds:
        outs = [
            ShardOutputs(
                Path(S.synthesis_shard_manifest(kind, i)),
                Path(S.synthesis_shard_images(kind, i)),
                Path(S.synthesis_shard_faces(kind, i)),
            )
            for i in range(shards)
        ]
        for i, out in enumerate(outs):
            synthesize_shard(
                kind,
                L.crops(),
                L.faces(),
                L.images(),
                L.crops_dir(),
                L.synthesis_dir(kind),
                out,
                params,
                (i, shards),
            )
        gather_synthesis(outs, L.synthesis_dir(kind))
        made.append(MadeFolder.at(L.synthesis_dir(kind)))
    index, rejected = build_index(raw, L.images(), L.faces(), L.crops(), params, made)
    write_index(index, rejected, L.pair_index(), L.pair_index_rejected())
    pair_tables = [S.pairs_shard(i) for i in range(shards)]
    for i, table in enumerate(pair_tables):
        score_shard(
            L.pair_index(),
            raw,
            L.faces(),
            L.crops(),
            L.images(),
            L.pairs_dir(),
            table,
            params,
            (i, shards),
            crops_dir=L.crops_dir(),
            made=made,
        )
    gather_pairs(
        pair_tables, L.pair_index_rejected(), L.pairs_dir(), params, L.pairs(), L.pairs_rejected()
    )
    caption_pairs(
        L.pairs(), L.pairs_dir(), params, L.captions(), L.captions_lint(), L.captions_rejected()
    )
    pairs_dir = L.pairs_dir()
    run_split(
        L.pairs(),
        L.captions(),
        L.faces(),
        L.split(),
        L.validation_dir(),
        params,
        pairs_dir=pairs_dir,
        made=made,
    )
    for phase in params.phase_names:
        run_select(
            phase,
            L.pairs(),
            L.captions(),
            L.split(),
            L.phase_dir(phase),
            params,
            pairs_dir=pairs_dir,
        )
    return results


SHORT_PHASES = [
    {"name": "broad", "after": "base", "steps": 8, "init_from": "none"},
    {
        "name": "skin_match",
        "after": "broad",
        "steps": 6,
        "init_from": "best",
        "filters": {"skin_delta_e": {"max": 8.0}},
        "top": {"by": "skin_delta_e", "fraction": 0.5},
    },
    {
        "name": "best_quality",
        "after": "skin_match",
        "steps": 4,
        "init_from": "best",
        "top": {"by": "quality", "fraction": 0.25},
    },
]


def make_project(dest: Path, raw: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ["Snakefile", "dvc.yaml", "environment.yml"]:
        shutil.copy(ROOT / name, dest / name)
    settings = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings["phases"] = SHORT_PHASES
    settings["lora"]["rank"] = 4
    settings["train"]["save_every"] = 4
    (dest / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    shutil.copytree(ROOT / "rules", dest / "rules")
    shutil.copytree(ROOT / "report", dest / "report")
    shutil.copytree(ROOT / "profiles", dest / "profiles")
    (dest / "results").mkdir()
    shutil.copy(ROOT / "results" / ".gitignore", dest / "results" / ".gitignore")
    shutil.copytree(ROOT / "slurm", dest / "slurm")
    shutil.copytree(
        ROOT / "src" / "facelora",
        dest / "src" / "facelora",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(raw, dest / "data" / "raw")
    return dest


# --- face images and tiny ONNX models shaped like an InsightFace pack ------------------------

STRIDES = (8, 16, 32)
FACE_STRIDE = 32  # the tiny detector only "sees" faces on its stride-32 grid
# Keypoint offsets from an anchor, in strides: eyes, nose, mouth corners (image-left first).
KPS_OFFSETS = np.array(
    [[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32
)


def _conv_head(name: str, x: str, stride: int, per_anchor: int, weight, bias) -> tuple:
    """Conv with kernel = stride, then (1, C, h, w) -> (h*w*2, per_anchor) like SCRFD's heads."""
    from onnx import helper, numpy_helper

    channels = 2 * per_anchor
    nodes = [
        helper.make_node(
            "Conv",
            [x, f"{name}_w", f"{name}_b"],
            [f"{name}_conv"],
            kernel_shape=[stride, stride],
            strides=[stride, stride],
        ),
    ]
    inits = [
        numpy_helper.from_array(
            np.asarray(weight, np.float32).reshape(channels, 3, stride, stride), f"{name}_w"
        ),
        numpy_helper.from_array(np.asarray(bias, np.float32).reshape(channels), f"{name}_b"),
        numpy_helper.from_array(np.array([-1, per_anchor], np.int64), f"{name}_shape"),
    ]
    last = f"{name}_conv"
    if per_anchor == 1:
        nodes.append(helper.make_node("Sigmoid", [last], [f"{name}_sig"]))
        last = f"{name}_sig"
    nodes += [
        helper.make_node("Transpose", [last], [f"{name}_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name]),
    ]
    return nodes, inits


def write_scrfd(path: Path, gain: float = 12.0) -> None:
    """SCRFD layout (9 outputs: scores, box distances, keypoints for strides 8/16/32, 2 anchors).

    Only the stride-32 score looks at the image: the mean red channel of each 32x32 cell, so a
    red square aligned with that grid is "a face" exactly covering its cell. The box is the
    anchor's cell (distances 0, 0, 1, 1 strides); keypoints sit at KPS_OFFSETS inside it.
    Blue cells score nothing, so swapping RGB for BGR shows.
    """
    from onnx import TensorProto, helper

    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        zeros = np.zeros((2, 3, s, s), np.float32)
        if s == FACE_STRIDE:
            w = zeros.copy()
            w[:, 0] = gain / (s * s)  # channel 0 of insightface's blob is red (it swaps BGR)
            score = (w, np.zeros(2))
        else:
            score = (zeros, np.full(2, -20.0))
        heads = {
            "score": (1, *score),
            "bbox": (4, np.zeros((8, 3, s, s)), np.tile([0.0, 0.0, 1.0, 1.0], 2)),
            "kps": (10, np.zeros((20, 3, s, s)), np.tile(KPS_OFFSETS.reshape(-1), 2)),
        }
        for kind, (per_anchor, weight, bias) in heads.items():
            name = f"{kind}_{s}"
            n, i = _conv_head(name, "input.1", s, per_anchor, weight, bias)
            nodes += n
            inits += i
            outputs[kind].append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{s}", per_anchor])
            )
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=inits,
    )
    _save_onnx(graph, path)


def write_arcface(path: Path, dim: int = 512, side: int = 112) -> None:
    """ArcFace layout (1x3xSxS -> 1xDIM): the first three outputs are the crop's mean R, G, B
    (normalised to -1..1), the rest fixed random mixes of them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, (3, dim)).astype(np.float32)
    weight[:, :3] = np.eye(3)
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "proj"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, dim])],
        initializer=[numpy_helper.from_array(weight, "proj")],
    )
    _save_onnx(graph, path)


def _save_onnx(graph, path: Path) -> None:
    from onnx import checker, helper, save

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    checker.check_model(model)
    save(model, str(path))


def make_pack(root: Path, pack: str = "buffalo_l", dim: int = 512, decoys: bool = True) -> Path:
    """ROOT/models/PACK with buffalo_l's file names; decoys shaped like its landmark (192 px)
    and gender/age (96 px) models, which sort before w600k_r50.onnx."""
    folder = root / "models" / pack
    folder.mkdir(parents=True)
    write_scrfd(folder / "det_10g.onnx")
    write_arcface(folder / "w600k_r50.onnx", dim=dim)
    if decoys:
        write_arcface(folder / "1k3d68.onnx", dim=3309, side=192)
        write_arcface(folder / "genderage.onnx", dim=3, side=96)
    return folder


def face_image(cells: list[tuple[int, int]], colour=(255, 0, 0), scale: int = 2) -> np.ndarray:
    """Black RGB image 480x640 (HxW) holding squares of `colour` on the detector's stride-32
    grid, as seen at det_size 320 (the image is shrunk by `scale` = 2 to fit)."""
    rgb = np.zeros((480, 640, 3), np.uint8)
    side = FACE_STRIDE * scale
    for col, row in cells:
        rgb[row * side : (row + 1) * side, col * side : (col + 1) * side] = colour
    return rgb


def expected_face(col: int, row: int, scale: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Box and landmarks, in full-image pixels, that the tiny detector gives for that cell."""
    x0, y0 = col * FACE_STRIDE, row * FACE_STRIDE
    box = np.array([x0, y0, x0 + FACE_STRIDE, y0 + FACE_STRIDE], float) * scale
    landmarks = (np.array([x0, y0]) + KPS_OFFSETS * FACE_STRIDE) * scale
    return box, landmarks


# --- a tiny random-initialised Qwen2.5-VL (model + processor), built offline -----------------
#
# `build_tiny_qwen2_5_vl(dest)` writes a complete image-text-to-text model folder that loads with
# `AutoProcessor` / `AutoModelForImageTextToText` and `local_files_only=True`. Nothing is
# downloaded: the byte-level BPE is trained here on a few sentences and wrapped as a
# `Qwen2Tokenizer` with Qwen's special tokens appended (their ids follow the trained vocabulary,
# and the model config's image/video/vision token ids are read from the tokenizer), and the
# weights are random with a fixed seed, so two builds are byte-identical. It answers gibberish;
# it exists to run the real classes end to end.
#
# Layouts:
# - "transformers": what `save_pretrained` writes (config.json, generation_config.json,
#   model.safetensors, tokenizer.json, tokenizer_config.json, processor_config.json holding the
#   image and video processors, chat_template.jinja).
# - "hub": the file set of the Qwen/Qwen2.5-VL-*-Instruct repositories (preprocessor_config.json
#   with min_pixels/max_pixels and no video processor config, chat_template.json, vocab.json,
#   merges.txt, a transformers-4-style tokenizer_config.json, sampling defaults in
#   generation_config.json), i.e. what a user's downloaded model folder looks like.
#
# Sizes: text model 2 layers, hidden 64, 4 heads (2 KV heads), vocabulary 414; vision tower 2
# blocks, hidden 32, 8 px patches merged 2x2 into one token. The image processor resizes every
# image to between 32x32 and 64x64 pixels, so a square crop of any size costs IMAGE_TOKENS (16)
# image tokens. About 0.8 MB on disk; the build takes well under a second once torch and
# transformers are imported. The generation config suppresses every token that is not a
# lowercase word (optionally with a leading space), special tokens and EOS included, so greedy
# decoding always yields max_new_tokens words. See ../shared/notes/TINY_MODELS.md for the traps.

VLM_SEED = 0
PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64
# A square image is resized to 64x64: (64 / 8) ** 2 patches, 2x2 of them per token.
IMAGE_TOKENS = (64 // PATCH_SIZE) ** 2 // MERGE_SIZE**2
VLM_BPE_VOCAB = 400
LAYOUTS = ("transformers", "hub")

# Qwen2.5-VL's special tokens (the real tokenizer's order) and the Qwen2-VL / Qwen2.5-VL chat
# template (system prefix, {"type": "image"} entries, add_generation_prompt): the package's.
SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS
CHAT_TEMPLATE = QWEN_VL_CHAT_TEMPLATE

VLM_CORPUS = [
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


def _vlm_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on VLM_CORPUS with Qwen2's pre-tokenizer."""
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
        vocab_size=VLM_BPE_VOCAB,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(VLM_CORPUS, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _vlm_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
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


def _vlm_processor(tokenizer):
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


def _vlm_model(tokenizer):
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
    torch.manual_seed(VLM_SEED)
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
    vocab, merges = _vlm_bpe()
    tokenizer = _vlm_tokenizer(vocab, merges)
    processor = _vlm_processor(tokenizer)
    model = _vlm_model(tokenizer)
    processor.save_pretrained(dest)
    model.save_pretrained(dest)
    if layout == "hub":
        _to_hub_layout(dest, tokenizer, vocab, merges)
    return dest


# --- a tiny CLIP ----------------------------------------------------------------------------


def tiny_clip(folder: Path) -> Path:
    """A tiny random CLIPModel + processor saved in folder (32 px images, 16-D embeddings)."""
    import string

    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    letters = string.ascii_lowercase
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    vocab += ["sm", "smi"]
    tokenizer = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=[("s", "m"), ("sm", "i")]
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 40,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder

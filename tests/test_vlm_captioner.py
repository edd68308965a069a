"""The VLM captioner through the real transformers classes, with a tiny offline Qwen2.5-VL.

The model (tests/helpers.py) has random weights, so its answers are gibberish: these tests
prove the plumbing (folder -> AutoProcessor/AutoModelForImageTextToText -> chat template ->
both crops -> greedy generate -> cleaned instruction -> captions.parquet), not the quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from facelora.config import VlmParams, validate_params
from facelora.errors import ModelFileMissing
from facelora.io.tables import read_rows
from facelora.prepare.captions import caption_pairs
from facelora.prepare.pairs.score import PAIRS
from facelora.prepare.vlm import VlmCaptioner

from helpers import IMAGE_TOKENS, LAYOUTS, build_tiny_qwen2_5_vl

PAIR = {"pair_id": "p1", "start_crop": "images/p1_start.png", "end_crop": "images/p1_end.png"}


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, offline) -> dict[str, Path]:
    """The tiny model in both folder layouts (save_pretrained's and the hub repositories')."""
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {layout: build_tiny_qwen2_5_vl(root / layout, layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """A pairs folder with one pair's crops: a 128 px 'face' and the same with brighter eyes."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    y, x = np.mgrid[0:128, 0:128]
    start = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    start[(x - 64) ** 2 / 40**2 + (y - 64) ** 2 / 52**2 < 1] = (200, 160, 140)
    end = start.copy()
    end[44:56, 36:92] = (250, 250, 250)
    Image.fromarray(start).save(root / PAIR["start_crop"])
    Image.fromarray(end).save(root / PAIR["end_crop"])
    return root


def _captioner(model: Path, pairs_dir: Path) -> VlmCaptioner:
    return VlmCaptioner(VlmParams(enabled=True, model_path=str(model), max_new_tokens=8), pairs_dir)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_captioner_runs_the_real_model_on_both_crops(tiny_models, pairs_dir, layout):
    captioner = _captioner(tiny_models[layout], pairs_dir)
    assert type(captioner.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(captioner.processor).__name__ == "Qwen2_5_VLProcessor"

    calls = []
    generate = captioner.model.generate

    def recording_generate(**inputs):
        calls.append(inputs)
        return generate(**inputs)

    captioner.model.generate = recording_generate
    first = captioner(PAIR)
    second = captioner(PAIR)
    assert isinstance(first, str) and first.strip()
    assert first == second  # greedy decoding
    assert len(calls) == 2
    inputs = calls[0]
    assert inputs["max_new_tokens"] == 8 and inputs["do_sample"] is False

    # Two images, each 128 px resized to 64 px: an 8x8 grid of 8 px patches, 2x2 merged.
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8], [1, 8, 8]]
    image_token_id = captioner.model.config.image_token_id
    assert int((inputs["input_ids"] == image_token_id).sum()) == 2 * IMAGE_TOKENS
    assert int(grid.prod(dim=1).sum()) // 4 == 2 * IMAGE_TOKENS
    # ... the start crop first, then the end crop: the same pixels as each processed alone.
    image_processor = captioner.processor.image_processor
    pixels = inputs["pixel_values"]
    alone = [
        image_processor(images=Image.open(pairs_dir / PAIR[key]).convert("RGB"))["pixel_values"]
        for key in ("start_crop", "end_crop")
    ]
    assert pixels.shape[0] == sum(a.shape[0] for a in alone)
    torch.testing.assert_close(pixels[: alone[0].shape[0]], torch.as_tensor(alone[0]))
    torch.testing.assert_close(pixels[alone[0].shape[0] :], torch.as_tensor(alone[1]))
    assert not torch.equal(torch.as_tensor(alone[0]), torch.as_tensor(alone[1]))

    # The pixels reach the language model: swapping the end crop for the start crop changes
    # the next-token logits.
    forward = {
        k: v
        for k, v in inputs.items()
        if k not in ("max_new_tokens", "do_sample") and v is not None
    }
    swapped = {**forward, "pixel_values": torch.cat([pixels[: alone[0].shape[0]]] * 2)}
    with torch.inference_mode():
        logits = captioner.model(**forward).logits[0, -1]
        logits_swapped = captioner.model(**swapped).logits[0, -1]
    assert not torch.allclose(logits, logits_swapped)


def test_caption_pairs_uses_the_vlm(tiny_models, pairs_dir, tmp_path):
    rows = [
        {**PAIR, "status": "ok", "layout": "kontext", "caption": None, "caption_source": None},
        {
            **PAIR,
            "pair_id": "p2",
            "status": "ok",
            "layout": "kontext",
            "caption": "open the eyes wider",
            "caption_source": "manifest",
        },
        {"pair_id": "p3", "status": "rejected", "reason": "no face", "layout": "kontext"},
    ]
    pairs_path = pairs_dir / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), pairs_path)
    params = validate_params(
        {
            "captions": {
                "vlm": {
                    "enabled": True,
                    "model_path": str(tiny_models["transformers"]),
                    "max_new_tokens": 8,
                }
            }
        }
    )
    stats = caption_pairs(
        pairs_path,
        pairs_path.parent,
        params,
        tmp_path / "captions.parquet",
        tmp_path / "lint.csv",
        tmp_path / "rejected.csv",
    )
    captions = {row["pair_id"]: row for row in read_rows(tmp_path / "captions.parquet")}
    assert set(captions) == {"p1", "p2"} and stats["captioned"] == 2
    assert captions["p1"]["status"] == "ok"
    assert captions["p1"]["source"] == "vlm"
    assert captions["p1"]["caption"].startswith("EDITFACE ")
    assert captions["p1"]["change"] == captions["p1"]["caption"].removeprefix("EDITFACE ")
    expected = _captioner(tiny_models["transformers"], pairs_dir)(PAIR)
    assert captions["p1"]["change"] == expected
    # A pair's own caption still comes first.
    assert captions["p2"]["source"] == "manifest"
    assert captions["p2"]["caption"] == "EDITFACE open the eyes wider"


def test_model_folder_without_config_json(tiny_models, pairs_dir, tmp_path):
    """A real model folder that lost its config.json is refused before anything loads."""
    broken = shutil.copytree(tiny_models["hub"], tmp_path / "model")
    (broken / "config.json").unlink()
    assert (broken / "model.safetensors").is_file()
    with pytest.raises(ModelFileMissing, match=r"captions\.vlm\.model_path") as error:
        _captioner(broken, pairs_dir)
    assert str(broken) in str(error.value)

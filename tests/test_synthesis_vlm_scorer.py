"""The local VLM scorer (synthesis.scorer.backend: transformers) with the tiny offline
Qwen2.5-VL of tests/helpers.py.

That model has random weights, and its folder's generation config suppresses every token
that is not a lowercase word (digits, quotes and end-of-text included): left to itself it
never writes a number. Its answers still follow the rubric here because the scorer writes the
JSON itself and lets the model choose only the values, within what each value may be.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facelora.config import RubricItem, ScorerParams
from facelora.errors import ModelFileMissing, SettingsError
from facelora.prepare.synthesis.requests import (
    InvalidAnswer,
    Job,
    RequestCache,
    run_requests,
)
from facelora.prepare.synthesis.rubric import parse_answer
from facelora.prepare.synthesis.vlm_scorer import AnswerDecoder, NumberGrammar, TransformersScorer

from helpers import build_tiny_qwen2_5_vl

# the default rubric's two ranges, one that no first digit but 2 and 3 can start, and one
# below zero
RUBRIC = {
    "instruction_success": RubricItem(question="Was the instruction carried out?"),
    "intensity": RubricItem(min=0.0, max=1.0, question="How strong is the change?"),
    "age": RubricItem(min=20.0, max=30.0, question="How old does the person look?"),
    "tilt": RubricItem(min=-3.0, max=-1.0, question="How far is the head tilted left?"),
}
INSTRUCTION = "make the eyes brighter"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores a tiny model runs ~10x faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, offline) -> Path:
    """The hub repositories' file set: what a user's downloaded model folder looks like."""
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_vlm") / "model", "hub")


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pair() -> tuple[bytes, bytes]:
    """A 96 px 'face' (before) and the same with brighter eyes (after), as PNG bytes."""
    y, x = np.mgrid[0:96, 0:96]
    before = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    before[(x - 48) ** 2 / 30**2 + (y - 48) ** 2 / 40**2 < 1] = (200, 160, 140)
    after = before.copy()
    after[34:42, 28:68] = (250, 250, 250)
    return _png(before), _png(after)


def _settings(model: Path | str | None, **kw) -> ScorerParams:
    values = {"rubric": RUBRIC, "max_new_tokens": 12, **kw}
    return ScorerParams(
        backend="transformers", model=None if model is None else str(model), **values
    )


@pytest.fixture(scope="module")
def scorer(tiny_model) -> TransformersScorer:
    scorer = TransformersScorer(_settings(tiny_model))
    scorer.load()
    return scorer


def _answer_ids(tokenizer, decoder: AnswerDecoder, values: list[str], end: str = '"') -> list:
    """The token ids of an answer holding `values` (numbers, then the description)."""
    ids: list[int] = []
    values = iter(values)
    for seg in decoder.segments:
        if hasattr(seg, "ids"):
            ids += seg.ids
        else:
            ids += tokenizer.encode(next(values), add_special_tokens=False)
    return ids + tokenizer.encode(end, add_special_tokens=False) if decoder.describe else ids


# --- the answers -----------------------------------------------------------------------------


def test_scores_follow_the_rubric_and_repeat(scorer, tiny_model, pair, monkeypatch):
    # the folder's own generation config would forbid every digit (see the module docstring)
    suppressed = json.loads((tiny_model / "generation_config.json").read_text())["suppress_tokens"]
    digits = scorer._decoder.tokenizer.convert_tokens_to_ids(list("0123456789"))
    assert set(digits) <= set(suppressed)

    calls = []
    generate = scorer._vlm.model.generate

    def recording_generate(**inputs):
        calls.append(inputs)
        return generate(**inputs)

    monkeypatch.setattr(scorer._vlm.model, "generate", recording_generate)
    first = scorer.score(*pair, INSTRUCTION)
    second = scorer.score(*pair, INSTRUCTION)
    assert first == second  # greedy: the same bytes, the same answer
    assert first.model == str(tiny_model) and first.request_id is None

    scores = first.scores
    assert set(scores) == {f"vlm_{name}" for name in RUBRIC} | {"vlm_description"}
    for name, item in RUBRIC.items():
        value = scores[f"vlm_{name}"]
        assert isinstance(value, float) and item.min <= value <= item.max, (name, value)
    assert isinstance(scores["vlm_description"], str) and scores["vlm_description"].strip()
    # the same validation as every backend's: the scores are what parse_answer gives
    assert parse_answer(json.dumps({k[4:]: v for k, v in scores.items()}), RUBRIC, True) == scores

    inputs = calls[0]
    assert inputs["generation_config"].do_sample is False
    assert inputs["image_grid_thw"].shape[0] == 2  # before and after
    prompt = scorer._decoder.tokenizer.decode(inputs["input_ids"][0])
    assert INSTRUCTION in prompt and "age (a number from 20 to 30)" in prompt
    assert prompt.endswith('<|im_start|>assistant\n{"instruction_success": ')


def test_a_fresh_load_gives_the_same_answer(scorer, tiny_model, pair):
    again = TransformersScorer(_settings(tiny_model))
    assert not again.loaded  # loaded by the first score only
    assert again.score(*pair, INSTRUCTION) == scorer.score(*pair, INSTRUCTION)
    assert again.loaded


def test_without_description(tiny_model, pair):
    rubric = {"identity_kept": RubricItem(question="Is it the same person?")}
    scorer = TransformersScorer(_settings(tiny_model, rubric=rubric, describe=False))
    scores = scorer.score(*pair, None).scores
    assert set(scores) == {"vlm_identity_kept"}
    assert 1.0 <= scores["vlm_identity_kept"] <= 5.0


def test_out_of_range_answers_are_invalid_never_clamped(scorer, pair, tmp_path, monkeypatch):
    """An answer the template does not allow (here: forced through a patched generate) is an
    InvalidAnswer, which the request runner retries and then records as a failure."""
    decoder = scorer._decoder
    tokenizer = decoder.tokenizer
    wrong = _answer_ids(tokenizer, decoder, ["7", "0.5", "25", "-2", "open the eyes"])

    def generate(**inputs):
        tail = torch.tensor([wrong], dtype=inputs["input_ids"].dtype)
        return torch.cat([inputs["input_ids"], tail], dim=1)

    monkeypatch.setattr(scorer._vlm.model, "generate", generate)
    with pytest.raises(InvalidAnswer, match=r"instruction_success: '7' is not a number from 1"):
        scorer.score(*pair, INSTRUCTION)

    cache = RequestCache(tmp_path / "cache")
    key = scorer.request_key(*pair, INSTRUCTION)
    run = run_requests(
        [Job(key, pair)],
        lambda request: scorer.score(*request, INSTRUCTION).to_answer(),
        cache=cache,
        concurrency=1,
        retries=1,
        setting="synthesis.scorer",
        backoff_s=0.0,
    )
    (outcome,) = list(run)
    assert outcome.status == "failed" and outcome.attempts == 2
    assert outcome.reason.startswith("invalid answer: instruction_success: '7' is not")
    assert [f["key"] for f in cache.failures()] == [key]
    assert cache.get(key) is None


# --- the decoder, without the model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)


def test_decoder_writes_the_json_and_refuses_tokens_out_of_place(tokenizer):
    rubric = {"a": RubricItem(question="a?"), "b": RubricItem(min=0, max=1, question="b?")}
    decoder = AnswerDecoder(tokenizer, rubric, describe=True, budget=8)
    assert decoder.answer_start == '{"a": '

    ids = _answer_ids(tokenizer, decoder, ["4", "0.25", "open the eyes"])
    walk = decoder.walk(ids)
    assert walk.segment == len(decoder.segments) and decoder.allowed(walk) == []
    assert decoder.answer_text(walk) == '{"a": 4, "b": 0.25, "description": "open the eyes"}'

    # the first digit keeps to 1..5; after "5" only a '.', or the text after the number
    pieces = decoder.pieces
    first = decoder.allowed(decoder.walk([]))
    assert sorted(pieces[i] for i in first) == ["1", "2", "3", "4", "5"]
    after_five = decoder.allowed(decoder.walk(tokenizer.encode("5")))
    assert sorted(pieces[i] for i in after_five) == [",", "."]
    # a description must hold something before it may end; end-of-text ends it too
    opened = _answer_ids(tokenizer, decoder, ["4", "0.25", ""], end="")
    assert decoder.walk(opened).values == ["4", "0.25"]
    assert tokenizer.eos_token_id not in decoder.allowed(decoder.walk(opened))
    eyes = opened + tokenizer.encode("eyes")
    assert tokenizer.eos_token_id in decoder.allowed(decoder.walk(eyes))
    assert decoder.walk([*eyes, tokenizer.eos_token_id]).values[-1] == "eyes"
    # ... and after `budget` tokens it is cut there
    words = tokenizer.encode(" open the eyes wider and smile and turn the head")
    assert len(words) > 8
    cut = decoder.answer_text(decoder.walk(opened + words[:8]))
    assert (
        cut == '{"a": 4, "b": 0.25, "description": ' + json.dumps(tokenizer.decode(words[:8])) + "}"
    )

    for bad, match in [
        (tokenizer.encode("6"), r"a: '6' is not a number from 1 to 5"),
        (tokenizer.encode("4.123"), r"expected the answer's fixed text ', \"b\": ', got .*'3'"),
        (tokenizer.encode("open"), r"a: 'open' is not a number"),
        (ids[:1] + tokenizer.encode(":"), r"expected the answer's fixed text ', \"b\": '"),
        (ids + tokenizer.encode("x"), r"goes on after its end"),
        (opened + tokenizer.encode('"'), r"the description cannot hold"),
        ([*opened, tokenizer.convert_tokens_to_ids("<|image_pad|>")], r"cannot hold"),
    ]:
        with pytest.raises(InvalidAnswer, match=match):
            decoder.walk(bad)
    with pytest.raises(InvalidAnswer, match="cut off"):
        decoder.answer_text(decoder.walk(ids[:-3]))


def test_decoder_without_description(tokenizer):
    rubric = {"a": RubricItem(min=-3, max=-1, question="a?")}
    decoder = AnswerDecoder(tokenizer, rubric, describe=False, budget=8)
    walk = decoder.walk(_answer_ids(tokenizer, decoder, ["-1.5"]))
    assert decoder.answer_text(walk) == '{"a": -1.5}'
    assert [decoder.pieces[i] for i in decoder.allowed(decoder.walk([]))] == ["-"]


# (min, max): first characters allowed; complete numbers; beginnings only; refused
GRAMMAR_CASES = {
    (1, 5): ("12345", "1 5 5.0 2.75 5.00", "5. 4.", "0 6 5.1 - 4.123 01 .5"),
    (0, 1): ("01", "0 1 0.5 1.0 0.05", "0. 1.", "1.5 2 00 -0"),
    (20, 30): ("23", "20 25.5 30 30.00", "2 3 29.", "1 4 31 30.5 300"),
    (-3, -1): ("-", "-1 -3 -2.5", "- -2.", "-0 -4 -3.5 1 --1"),
    (0, 100): ("0123456789", "100 10.5 0 99.99", "10. 99.", "101 1000 100.5 007"),
}


@pytest.mark.parametrize(("lo", "hi"), GRAMMAR_CASES, ids=str)
def test_number_grammar(lo, hi):
    first, complete, continues, refused = GRAMMAR_CASES[(lo, hi)]
    grammar = NumberGrammar(RubricItem(min=lo, max=hi, question="?"), "synthesis.scorer.x")
    assert "".join(c for c in "-0123456789." if grammar.can_continue(c)) == first
    for text in complete.split():
        assert grammar.complete(text) and grammar.can_continue(text), text
    for text in continues.split():
        assert grammar.can_continue(text) and not grammar.complete(text), text
    for text in refused.split():
        assert not grammar.can_continue(text) and not grammar.complete(text), text


@pytest.mark.parametrize(
    ("lo", "hi", "match"), [(1e-9, 2e-9, "more than 6 decimals"), (0.0, float("inf"), "finite")]
)
def test_a_range_no_number_can_keep_to_is_refused(tiny_model, lo, hi, match):
    item = RubricItem(min=lo, max=hi, question="?")
    with pytest.raises(SettingsError, match=rf"synthesis\.scorer\.rubric\.odd: .*{match}"):
        TransformersScorer(_settings(tiny_model, rubric={"odd": item}))


# --- request keys ------------------------------------------------------------------------------


def test_request_key(tiny_model, pair, tmp_path):
    before, after = pair
    scorer = TransformersScorer(_settings(tiny_model))
    key = scorer.request_key(before, after, INSTRUCTION)
    assert len(key) == 64 and int(key, 16) >= 0
    assert not scorer.loaded  # keys need no model: a rerun of cached answers loads none
    # stable: another instance, and settings that do not change answers
    same = TransformersScorer(_settings(tiny_model, device="cpu", concurrency=1, retries=0))
    assert same.request_key(before, after, INSTRUCTION) == key

    other_png = _png(np.zeros((8, 8, 3), np.uint8))
    rubric = dict(RUBRIC)
    changed = {
        "before": scorer.request_key(other_png, after, INSTRUCTION),
        "after": scorer.request_key(before, other_png, INSTRUCTION),
        "swapped": scorer.request_key(after, before, INSTRUCTION),
        "instruction": scorer.request_key(before, after, "close the mouth"),
        "no instruction": scorer.request_key(before, after, None),
    }
    for name, settings in {
        "question": {"rubric": {**rubric, "age": RubricItem(min=20, max=30, question="Age?")}},
        "range": {"rubric": {**rubric, "age": RUBRIC["age"].model_copy(update={"min": 18.0})}},
        "describe": {"describe": False},
        "max_new_tokens": {"max_new_tokens": 13},
    }.items():
        changed[name] = TransformersScorer(_settings(tiny_model, **settings)).request_key(
            before, after, INSTRUCTION
        )

    # the model folder: where it is, its config.json, its weight files' sizes
    copy = shutil.copytree(tiny_model, tmp_path / "copy")

    def key_of(folder: Path) -> str:
        return TransformersScorer(_settings(folder)).request_key(before, after, INSTRUCTION)

    changed["another folder"] = copied = key_of(copy)
    config = copy / "config.json"
    config.write_text(config.read_text() + "\n")
    changed["config.json"] = key_of(copy)
    config.write_text(config.read_text()[:-1])
    assert key_of(copy) == copied
    with (copy / "model.safetensors").open("ab") as fh:
        fh.write(b"\0")
    changed["weights"] = key_of(copy)
    assert len(set(changed.values()) | {key}) == len(changed) + 1, changed


# --- the model folder ---------------------------------------------------------------------------


def _broken_folders(tiny_model: Path, root: Path) -> dict[str, Path | None]:
    folders: dict[str, Path | None] = {"not set": None, "no such folder": root / "absent"}
    for name in [
        "no config.json",
        "config.json not JSON",
        "no weights",
        "not a VLM",
        "no tokenizer",
    ]:
        folders[name] = shutil.copytree(tiny_model, root / name.replace(" ", "_"))
    (folders["no config.json"] / "config.json").unlink()
    (folders["config.json not JSON"] / "config.json").write_text("{model_type: qwen")
    (folders["no weights"] / "model.safetensors").unlink()
    (folders["not a VLM"] / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]:
        (folders["no tokenizer"] / name).unlink()
    return folders


def test_a_missing_or_broken_model_folder_names_the_setting(tiny_model, tmp_path):
    found = {}
    for case, folder in _broken_folders(tiny_model, tmp_path).items():
        with pytest.raises(ModelFileMissing) as error:
            TransformersScorer(_settings(folder), setting="synthesis.scorer").load()
        found[case] = str(error.value)
    for case, message in found.items():
        assert message.startswith("synthesis.scorer.model = "), (case, message)
        assert "synthesis.scorer.backend: none" in message, (case, message)
    assert "no model folder with a config.json" in found["not set"]
    assert "no model folder with a config.json" in found["no such folder"]
    assert "no model folder with a config.json" in found["no config.json"]
    assert "does not read as JSON" in found["config.json not JSON"]
    assert "no weight files" in found["no weights"]
    assert "AutoModelForImageTextToText" in found["not a VLM"]
    assert "tokenizer files are missing" in found["no tokenizer"]
    assert str(tmp_path / "no_weights") in found["no weights"]

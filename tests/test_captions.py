"""Captions: sources in order, the trigger, and the lint."""

import pytest

from facelora.config import CaptionsParams, Params, validate_params
from facelora.errors import ModelFileMissing
from facelora.prepare.captions import caption_for, lint_caption
from facelora.prepare.vlm import VlmCaptioner, clean_instruction


def rules(caption, **kw):
    return [issue.split(":")[0] for issue in lint_caption(caption, CaptionsParams(**kw))]


def test_a_good_caption_passes():
    assert rules("EDITFACE open the eyes wider") == []
    assert rules("EDITFACE restore the face: sharpen the details") == []


@pytest.mark.parametrize(
    ("caption", "rule"),
    [
        ("open the eyes wider", "trigger_first"),
        ("EDITFACE open EDITFACE eyes", "trigger_repeated"),
        ("EDITFACE", "no_change"),
        ("EDITFACE smiling woman", "no_change"),
        ("EDITFACE a photo of sks person smiling", "class_prompt"),
        ("EDITFACE make ohwx man older", "class_prompt"),
        ("EDITFACE make the {change}", "placeholder"),
    ],
)
def test_lint_rules(caption, rule):
    assert rule in rules(caption)


def test_too_long():
    assert "too_long" in rules("EDITFACE make " + "very " * 80 + "wide", max_words=60)


def test_sources_in_order():
    params = validate_params({"captions": {"default_change": "make it better"}})
    pair = {"layout": "kontext", "caption": "EDITFACE smile", "caption_source": "sidecar:a.txt"}
    assert caption_for(pair, params)[:2] == ("EDITFACE smile", "sidecar:a.txt")
    caption, _, notes = caption_for({**pair, "caption": "smile wider"}, params)
    assert caption == "EDITFACE smile wider" and notes[0].startswith("trigger_added")
    assert caption_for({**pair, "caption": None}, params)[:2] == (
        "EDITFACE make it better",
        "default_change",
    )
    identity = {"layout": "auto_identity", "caption": None}
    assert caption_for(identity, params)[1] == "template"
    assert caption_for({**pair, "caption": None}, Params())[0] is None  # rejected later


def test_vlm_answer_cleaning():
    assert (
        clean_instruction('Instruction: "Open the eyes wider."\nmore text') == "Open the eyes wider"
    )


def test_vlm_needs_a_local_model(tmp_path):
    with pytest.raises(ValueError, match="captions.vlm.model_path must be set"):
        validate_params({"captions": {"vlm": {"enabled": True}}})
    params = validate_params({"captions": {"vlm": {"enabled": True, "model_path": str(tmp_path)}}})
    with pytest.raises(ModelFileMissing, match="captions.vlm.model_path"):
        VlmCaptioner(params.captions.vlm, tmp_path)


def test_captions_of_the_sample_data(demo_results):
    import pandas as pd

    captions = pd.read_parquet(demo_results / "captions" / "captions.parquet")
    lint = pd.read_csv(demo_results / "captions" / "lint.csv")
    ok = captions[captions["status"] == "ok"]
    assert ok["caption"].str.startswith("EDITFACE ").all()
    rejected = captions[captions["status"] == "rejected"]
    assert len(rejected) == 1 and rejected.iloc[0]["reason"].startswith("no caption")
    assert "trigger_added" in set(lint["rule"])  # astronaut_cmyk.txt lacks the trigger

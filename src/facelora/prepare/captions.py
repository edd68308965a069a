"""Captions: trigger word + the change ("EDITFACE open the eyes wider"), and their lint.

Sources, in order: the pair's own caption (sidecar .txt or manifest), the optional VLM
captioner (a local model), the identity-pairing template, captions.default_change. A pair with
none is rejected with the reason. Every caption is linted; violations are reported (or reject
the pair when captions.reject_on_lint).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa

from facelora.config import CaptionsParams, Params
from facelora.io.atomic import write_csv, write_parquet
from facelora.io.tables import read_rows
from facelora.prepare.vlm import clean_instruction
from facelora.registry.scores import VLM_DESCRIPTION

log = logging.getLogger(__name__)

CAPTIONS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("status", pa.string()),  # ok | rejected
        ("reason", pa.string()),
        ("caption", pa.string()),
        ("change", pa.string()),  # the caption without the trigger
        ("source", pa.string()),  # sidecar:PATH | manifest | vlm | template | default_change
        ("lint", pa.string()),  # "rule: message; ..." or null
    ]
)

# Words that make an instruction describe a change (imperative edit verbs and change words).
EDIT_WORDS = {
    "add",
    "adjust",
    "age",
    "alter",
    "apply",
    "blend",
    "blur",
    "brighten",
    "change",
    "clean",
    "close",
    "color",
    "colour",
    "convert",
    "correct",
    "darken",
    "deblur",
    "denoise",
    "enhance",
    "enlarge",
    "fix",
    "give",
    "increase",
    "decrease",
    "keep",
    "lighten",
    "lower",
    "make",
    "match",
    "move",
    "narrow",
    "open",
    "paint",
    "put",
    "raise",
    "recolor",
    "reduce",
    "remove",
    "repair",
    "replace",
    "reshape",
    "restore",
    "retouch",
    "rotate",
    "sharpen",
    "shorten",
    "shrink",
    "smile",
    "smooth",
    "soften",
    "straighten",
    "swap",
    "tilt",
    "transfer",
    "turn",
    "use",
    "warm",
    "warmer",
    "cool",
    "cooler",
    "wider",
    "widen",
    "older",
    "younger",
    "into",
    "instead",
    "without",
    "more",
    "less",
    "frown",
    "squint",
    "wink",
    "look",
    "transform",
}


def lint_caption(caption: str, params: CaptionsParams) -> list[str]:
    """Violations as 'rule: message' strings (empty when the caption is fine)."""
    issues = []
    words = caption.split()
    trigger = params.trigger
    if not words or words[0] != trigger:
        issues.append(f"trigger_first: the caption must start with the trigger {trigger!r}")
    if sum(w.strip(".,;:!") == trigger for w in words) > 1:
        issues.append("trigger_repeated: the trigger appears more than once")
    change = [w for w in words if w.strip(".,;:!") != trigger]
    lowered = [re.sub(r"[^a-z]", "", w.lower()) for w in change]
    if len(change) < 2:
        issues.append("no_change: say what changes, e.g. 'open the eyes wider'")
    elif not EDIT_WORDS.intersection(lowered):
        issues.append(
            "no_change: reads like a description, not an edit instruction "
            "(start with a verb: make, add, remove, open, restore, ...)"
        )
    text = " " + " ".join(lowered) + " "
    spaced = " " + " ".join(re.sub(r"[^a-z ]", "", w.lower()) for w in change) + " "
    for phrase in params.class_words:
        if f" {phrase.lower()} " in spaced or f" {phrase.lower()} " in text:
            issues.append(
                f"class_prompt: {phrase!r} is a DreamBooth-style class prompt; describe the edit"
            )
    if len(words) > params.max_words:
        issues.append(f"too_long: {len(words)} words > captions.max_words {params.max_words}")
    if "{" in caption or "}" in caption:
        issues.append("placeholder: an unfilled {placeholder} is left in the caption")
    return issues


def compose(change: str, params: CaptionsParams) -> str:
    return " ".join(params.template.format(trigger=params.trigger, change=change.strip()).split())


def strip_trigger(caption: str, trigger: str) -> str:
    words = caption.split()
    return " ".join(w for w in words if w.strip(".,;:!") != trigger)


def caption_for(pair: dict, params: Params, vlm=None) -> tuple[str | None, str | None, list[str]]:
    """(caption, source, notes) for one usable pair; caption None when there is none."""
    settings = params.captions
    notes: list[str] = []
    raw, source = pair.get("caption"), pair.get("caption_source")
    described = pair.get(VLM_DESCRIPTION)
    if params.synthesis.scorer.caption_from_description and described:
        return compose(clean_instruction(described), settings), "vlm_description", notes
    if raw:
        if raw.split()[0] == settings.trigger or not settings.add_trigger:
            return raw, source, notes
        notes.append("trigger_added: the trigger was prepended (captions.add_trigger)")
        return compose(raw, settings), source, notes
    if vlm is not None:
        return compose(vlm(pair), settings), "vlm", notes
    if pair["layout"] == "auto_identity":
        return compose(params.pairs.auto_identity.change, settings), "template", notes
    if settings.default_change:
        return compose(settings.default_change, settings), "default_change", notes
    return None, None, notes


def caption_pairs(
    pairs_path: str | Path,
    pairs_dir: str | Path,
    params: Params,
    captions_out: str | Path,
    lint_out: str | Path,
    rejected_out: str | Path,
) -> dict:
    """Caption every usable pair of the pairs table (its crops under `pairs_dir`, which the
    VLM captioner looks at) and lint the captions."""
    usable = [p for p in read_rows(pairs_path) if p["status"] == "ok"]
    vlm = None
    if params.captions.vlm.enabled and usable:
        from facelora.prepare.vlm import VlmCaptioner

        vlm = VlmCaptioner(params.captions.vlm, Path(pairs_dir))
    rows, lint_rows = [], []
    for pair in usable:
        caption, source, notes = caption_for(pair, params, vlm)
        if caption is None:
            rows.append(
                {
                    "pair_id": pair["pair_id"],
                    "status": "rejected",
                    "reason": (
                        "no caption: no caption file, manifest caption or captions.default_change "
                        "(add one, set captions.default_change, or enable captions.vlm)"
                    ),
                }
            )
            continue
        issues = lint_caption(caption, params.captions)
        for issue in notes + issues:
            rule, _, message = issue.partition(": ")
            lint_rows.append(
                {"pair_id": pair["pair_id"], "rule": rule, "message": message, "caption": caption}
            )
        status, reason = "ok", None
        if issues and params.captions.reject_on_lint:
            status, reason = "rejected", "caption lint: " + "; ".join(issues)
        rows.append(
            {
                "pair_id": pair["pair_id"],
                "status": status,
                "reason": reason,
                "caption": caption,
                "change": strip_trigger(caption, params.captions.trigger),
                "source": source,
                "lint": "; ".join(issues) or None,
            }
        )
    frame = pd.DataFrame(rows, columns=CAPTIONS.names)
    write_parquet(
        captions_out,
        pa.Table.from_pandas(frame, schema=CAPTIONS, preserve_index=False),
    )
    write_csv(
        lint_out,
        pd.DataFrame(lint_rows, columns=["pair_id", "rule", "message", "caption"]),
    )
    rejected = frame.loc[frame["status"] == "rejected", ["pair_id", "reason"]]
    write_csv(rejected_out, rejected)
    stats = {
        "captioned": int((frame["status"] == "ok").sum()),
        "rejected": len(rejected),
        "lint_violations": sum(1 for r in lint_rows if r["rule"] != "trigger_added"),
    }
    log.info("captions: %s", stats)
    return stats

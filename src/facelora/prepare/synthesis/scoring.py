"""VLM scores: a vision-language model rates (before, after) against the rubric in params.

One function serves every caller (the synthesize step for the pairs it makes, `facelora
score DIR` for a pair folder, the pair step for the raw layouts' pairs with
`synthesis.scorer.other_pairs`): every request cached by content and run through the request
runner (budget, retries, failures recorded). Scores are named `vlm_<rubric name>`, plus
`vlm_description` when the scorer describes the change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from facelora.config import Params, ScorerParams
from facelora.errors import SettingsError
from facelora.prepare.synthesis.requests import Job as Request
from facelora.prepare.synthesis.requests import (
    RequestCache,
    ScoreAnswer,
    api_settings,
    run_requests,
)

log = logging.getLogger(__name__)
SETTING = "synthesis.scorer"
DESCRIPTION = "vlm_description"


class Scorer(Protocol):
    secrets: tuple[str, ...]

    def request_key(self, before: bytes, after: bytes, instruction: str | None) -> str: ...

    def score(
        self, before_png: bytes, after_png: bytes, instruction: str | None
    ) -> ScoreAnswer: ...


def make_scorer(settings: ScorerParams) -> Scorer:
    if settings.backend == "openai":
        from facelora.prepare.synthesis.openai_api import OpenAIScorer

        return OpenAIScorer(settings, SETTING)
    if settings.backend == "transformers":
        from facelora.prepare.synthesis.vlm_scorer import TransformersScorer

        return TransformersScorer(settings, SETTING)
    raise SettingsError(f"{SETTING}.backend is none: set transformers or openai to score pairs")


def score_names(params: Params) -> list[str]:
    """The numeric score columns the rubric adds (none without a scorer)."""
    if params.synthesis.scorer.backend == "none":
        return []
    return [f"vlm_{name}" for name in params.synthesis.scorer.rubric]


def score_pairs(
    items: list[tuple[bytes, bytes, str | None]],
    params: Params,
    cache_dir: str | Path,
    scorer: Scorer | None = None,
    desc: str = "vlm scores",
) -> list[dict | str]:
    """For each (before PNG, after PNG, instruction): its scores, or why there are none."""
    if not items:
        return []
    settings = params.synthesis.scorer
    scorer = scorer or make_scorer(settings)
    requests = [Request(scorer.request_key(*item), item) for item in items]
    limits = api_settings(settings)
    if settings.backend == "transformers":  # one local model, greedy: a retry says the same
        limits.update(concurrency=1, retries=0)
    run = run_requests(
        requests,
        lambda item: scorer.score(*item).to_answer(),
        cache=RequestCache(cache_dir),
        progress_desc=desc,
        setting=SETTING,
        secrets=scorer.secrets,
        **limits,
    )
    out: list[dict | str] = []
    for outcome in run:
        if outcome.status in ("ok", "cached"):
            answer = ScoreAnswer.from_answer(outcome.answer)
            out.append({**answer.scores, "scorer_model": answer.model})
        else:
            out.append(f"{outcome.status}: {outcome.reason}")
    log.info("scores: %s", run.report())
    return out


def apply_scores(rows: list[dict], folder: Path, params: Params, cache_dir: str | Path) -> int:
    """Score the usable manifest rows of a pair folder in place (row["scores"]); failures go
    to row["score_failure"]. Returns how many were scored."""
    ok = [r for r in rows if r["status"] == "ok"]
    items = [
        ((folder / r["start"]).read_bytes(), (folder / r["end"]).read_bytes(), _instruction(r))
        for r in ok
    ]
    scored = 0
    for row, result in zip(ok, score_pairs(items, params, cache_dir), strict=True):
        if isinstance(result, dict):
            row["scores"] = result
            row.pop("score_failure", None)
            scored += 1
        else:
            row["scores"] = {}
            row["score_failure"] = result
    return scored


def _instruction(row: dict) -> str | None:
    """What the pair was meant to do: the edit's instruction, else its caption."""
    return row.get("instruction") or row.get("caption")

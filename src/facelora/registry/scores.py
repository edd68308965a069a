"""Score and metric names, defined once.

Pair scores are the columns of the pairs table (facelora.prepare.pairs.score computes them)
that phases may filter and rank on; evaluation metrics are what facelora.evaluate.metrics
computes for every checkpoint. Each name maps to whether a higher value is better. The
settings schema builds its allowed names from these tuples, so adding a score or a metric
is one line here plus its computation.
"""

from __future__ import annotations

from typing import Literal

# pair score -> higher is better
SCORE_COLUMNS: dict[str, bool] = {
    "quality": True,
    "identity_sim": True,
    "identity_sim_ref": True,
    "skin_delta_e": False,
    "skin_delta_e_ref": False,
    "hair_sim": True,
    "pose_diff": False,
    "bg_ssim": True,
    "resolution": True,
    "face_score": True,
}
SCORE_NAMES: tuple[str, ...] = tuple(SCORE_COLUMNS)
# A VLM's rubric (synthesis.scorer.rubric in params.yaml) adds one score per rubric name,
# `vlm_<name>`; its questions are phrased so that higher is better.
VLM_PREFIX = "vlm_"
VLM_DESCRIPTION = "vlm_description"  # the VLM's one-line description of the change (text)


def is_score_column(column: str) -> bool:
    """A numeric pair score column of the pairs table (fixed, or from the VLM rubric)."""
    return column in SCORE_COLUMNS or (column.startswith(VLM_PREFIX) and column != VLM_DESCRIPTION)


def higher_is_better(score: str) -> bool:
    """Whether a pair score (a fixed one or a VLM rubric score) is better when higher."""
    return SCORE_COLUMNS.get(score, True)


# evaluation metric -> higher is better
EVAL_METRICS: dict[str, bool] = {
    "identity_sim": True,
    "lpips": False,
    "bg_ssim": True,
    "clip_score": True,
}
METRIC_NAMES: tuple[str, ...] = tuple(EVAL_METRICS)
EvalMetric = Literal[METRIC_NAMES]  # type: ignore[valid-type]

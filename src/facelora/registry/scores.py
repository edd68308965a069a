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
ScoreName = Literal[SCORE_NAMES]  # type: ignore[valid-type]

# evaluation metric -> higher is better
EVAL_METRICS: dict[str, bool] = {
    "identity_sim": True,
    "lpips": False,
    "bg_ssim": True,
    "clip_score": True,
}
METRIC_NAMES: tuple[str, ...] = tuple(EVAL_METRICS)
EvalMetric = Literal[METRIC_NAMES]  # type: ignore[valid-type]

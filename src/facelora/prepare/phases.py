"""Progressive phase datasets: broad first, then narrower sets of the best pairs.

Each phase in params.yaml filters the training pairs on score ranges (a pair without a score
is not filtered on it: e.g. background SSIM does not apply to identity pairs) and/or keeps the
top k (or top fraction) by one score. Its folder holds the pairs in the Kontext layout, the
manifest, and phase.json (what training needs: steps, init_from and the previous phase).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from facelora.config import Params, PhaseParams
from facelora.errors import SettingsError
from facelora.io.datasets import write_kontext_dataset
from facelora.io.tables import frame_records, read_table
from facelora.prepare.split import trainable_pairs
from facelora.registry.scores import higher_is_better, is_score_column

log = logging.getLogger(__name__)


class PhaseEmpty(SettingsError):
    pass


def apply_filters(pairs: pd.DataFrame, phase: PhaseParams) -> tuple[pd.DataFrame, dict[str, int]]:
    dropped = {}
    for name, bounds in phase.filters.items():
        values = pairs[name].astype(float)
        keep = values.isna()
        inside = pd.Series(True, index=pairs.index)
        if bounds.min is not None:
            inside &= values >= bounds.min
        if bounds.max is not None:
            inside &= values <= bounds.max
        keep |= inside
        dropped[name] = int((~keep).sum())
        pairs = pairs[keep]
    return pairs, dropped


def apply_top(pairs: pd.DataFrame, phase: PhaseParams) -> pd.DataFrame:
    top = phase.top
    if top is None or pairs.empty:
        return pairs
    best_first_ascending = not higher_is_better(top.by)
    ascending = best_first_ascending if top.order == "best" else top.order == "ascending"
    keys = pairs[top.by].astype(float)
    ranked = pairs.assign(_key=keys if ascending else -keys).sort_values(
        ["_key", "pair_id"], na_position="last", kind="stable"
    )
    k = top.k if top.k is not None else max(1, math.ceil(top.fraction * len(pairs)))
    return ranked.drop(columns="_key").head(k)


def select_phase(pairs: pd.DataFrame, phase: PhaseParams) -> tuple[pd.DataFrame, dict]:
    """The phase's pairs and the counts; PhaseEmpty (saying why) below min_pairs."""
    chosen, stats = _select(pairs, phase)
    _check_not_empty(phase, stats)
    return chosen, stats


def _select(pairs: pd.DataFrame, phase: PhaseParams) -> tuple[pd.DataFrame, dict]:
    filtered, dropped = apply_filters(pairs, phase)
    chosen = apply_top(filtered, phase)
    stats = {
        "candidates": len(pairs),
        "after_filters": len(filtered),
        "selected": len(chosen),
        "dropped_by_filter": dropped,
    }
    return chosen, stats


def _check_not_empty(phase: PhaseParams, stats: dict) -> None:
    candidates, selected, dropped = (
        stats["candidates"],
        stats["selected"],
        stats["dropped_by_filter"],
    )
    if candidates == 0:
        raise PhaseEmpty(
            f"phase {phase.name!r}: there are no training pairs to select from (no usable, "
            "captioned pair left after the pair and caption steps; their rejected.csv files "
            "say why). Photos are paired only when they form a before/after pair in one of the "
            "input layouts (NAME_start/NAME_end files, control folders, a manifest: "
            "docs/data.md), or with pairs.auto_identity.enabled: true (photos of one person)"
        )
    if selected < phase.min_pairs:
        raise PhaseEmpty(
            f"phase {phase.name!r} selected {selected} of {candidates} training pairs "
            f"(< min_pairs {phase.min_pairs}; dropped by filter: {dropped}): loosen its filters "
            f"or top in params.yaml"
        )


def run_select(
    name: str, pairs_path, captions_path, split_path, out_dir, params: Params, *, pairs_dir
) -> dict:
    """One phase's dataset folder (`out_dir`) from the pairs table (crops under `pairs_dir`).

    An empty phase (below min_pairs) is written too, with the reason in phase.json (`empty`),
    so that the data summary still reports every step; training it stops with that reason."""
    phase = params.phase(name)
    pairs = trainable_pairs(pairs_path, captions_path)
    split = read_table(split_path)
    train_ids = set(split.loc[split["split"] == "train", "pair_id"])
    pairs = pairs[pairs["pair_id"].isin(train_ids)]
    chosen, stats = _select(pairs, phase)
    try:
        _check_not_empty(phase, stats)
        empty = None
    except PhaseEmpty as exc:
        empty = str(exc)
        log.warning("%s", empty)
    position = params.phase_names.index(name)
    info = {
        "name": name,
        "index": position,
        "steps": phase.steps,
        "init_from": phase.init_from,
        "previous_phase": params.phase_names[position - 1] if position > 0 else None,
        "filters": {k: v.model_dump(exclude_none=True) for k, v in phase.filters.items()},
        "top": phase.top.model_dump(exclude_none=True) if phase.top else None,
        **stats,
        "empty": empty,
        "score_means": {
            k: (None if np.isnan(m) else round(float(m), 4))
            for k, m in chosen[[c for c in chosen if is_score_column(c)]]
            .astype(float)
            .mean()
            .items()
        },
    }
    write_kontext_dataset(
        out_dir,
        frame_records(chosen),
        Path(pairs_dir),
        {"phase.json": json.dumps(info, indent=2, sort_keys=True) + "\n"},
    )
    return info

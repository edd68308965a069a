"""Evaluation results in one place: the metrics table, per-checkpoint means, plots, contact
sheets, and the best (checkpoint, strength) of each phase (the choice and its reason written
down). Means are per (step, eval strength): `summary[phase][step][scale_key(scale)]`. The paths
are the results layout's (facelora.registry.layout): each phase's `best.json`, and
`eval/metrics.csv`, `eval/summary.json` (DVC metrics), `eval/plots/PHASE.png` (each metric
against step, one line per strength, the base model dashed), `eval/contact/PHASE.png`
(source | target | base | each checkpoint at each strength, per pair).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from facelora.config import Params
from facelora.errors import SettingsError
from facelora.evaluate.run import COLUMNS, lora_file, scale_key
from facelora.io.atomic import atomic_path, write_csv, write_json
from facelora.registry.layout import BASE, Layout
from facelora.registry.scores import EVAL_METRICS


def gather(tables: list[Path]) -> pd.DataFrame:
    frames = []
    for table in tables:
        if not table.is_file():
            continue
        frame = pd.read_csv(table)
        if "scale" not in frame.columns:  # written before rows recorded their strength
            raise SettingsError(
                f"{table} has no `scale` column (an evaluation from an older facelora): "
                "evaluate again (snakemake --forcerun evaluate evaluate_base)"
            )
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.concat(frames, ignore_index=True)
    order = ["phase", "step", "scale", "pair_id"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def _mean(values: pd.Series) -> float | None:
    v = values.astype(float)
    v = v[np.isfinite(v)]
    return round(float(v.mean()), 6) if len(v) else None


def summarize(frame: pd.DataFrame) -> dict:
    """{phase: {step: {scale: {metric: mean, ..., "pairs", "failed"}}}}, scale spelled by
    scale_key (the base model: step 0, scale 0). A metric's mean is over the rows where it was
    computed: a pair whose output has no face still has a background SSIM. Failed pairs are
    counted, and the choice scores them as failures."""
    out: dict = {}
    for (phase, step, scale), group in frame.groupby(["phase", "step", "scale"], sort=True):
        entry = {m: _mean(group[m]) for m in EVAL_METRICS}
        entry.update(pairs=len(group), failed=int((group["status"] != "ok").sum()))
        steps = out.setdefault(str(phase), {})
        steps.setdefault(str(int(step)), {})[scale_key(scale)] = entry
    return out


def entries(steps: dict) -> list[tuple[int, float, dict]]:
    """(step, scale, means) of one phase's summary, by step then strength."""
    found = [(int(st), float(sc), e) for st, by in steps.items() for sc, e in by.items()]
    return sorted(found, key=lambda t: (t[0], t[1]))


def score(entry: dict, params: Params) -> tuple[float, list[str]]:
    """(weighted score, constraint violations) of one checkpoint's means. A failed pair counts
    as the worst case: the score is scaled by the share of pairs that worked."""
    objective = params.objective
    total = 0.0
    for metric, weight in objective.weights.items():
        value = entry.get(metric)
        if value is not None and math.isfinite(value):
            total += weight * value
    share = (entry["pairs"] - entry["failed"]) / entry["pairs"] if entry["pairs"] else 0.0
    violations = []
    for metric, bounds in objective.constraints.items():
        value = entry.get(metric)
        if value is None:
            violations.append(f"{metric} unavailable")
        elif bounds.min is not None and value < bounds.min:
            violations.append(f"{metric} {value:.3f} < {bounds.min}")
        elif bounds.max is not None and value > bounds.max:
            violations.append(f"{metric} {value:.3f} > {bounds.max}")
    return total * share, violations


def choose(phase: str, summary: dict, params: Params, train_dir: Path) -> dict:
    """The best (checkpoint, strength) of a phase: among those meeting every constraint the
    highest score; if none meets them, the highest score anyway, and the choice says so. Ties
    go to the earlier step, then to the strength nearest 1 (the one it was trained at)."""
    steps = summary.get(phase, {})
    if not steps:
        raise SettingsError(f"no evaluation rows for phase {phase}: evaluate it first")
    table = []
    for step, scale, entry in entries(steps):
        value, violations = score(entry, params)
        table.append(
            {
                "step": step,
                "scale": scale,
                "score": round(value, 6),
                "violations": violations,
                **{m: entry.get(m) for m in EVAL_METRICS},
                "failed": entry["failed"],
                "pairs": entry["pairs"],
            }
        )
    meeting = [t for t in table if not t["violations"] and t["failed"] < t["pairs"]]
    pool = meeting or table
    best = max(pool, key=lambda t: (t["score"], -t["step"], -abs(t["scale"] - 1.0)))
    what = "checkpoints" if len({t["scale"] for t in table}) == 1 else "(checkpoint, strength)s"
    if meeting:
        reason = (
            f"highest score ({best['score']:.4f}) among the {len(meeting)} of {len(table)} "
            f"{what} that meet every constraint"
        )
    else:
        reason = (
            f"no checkpoint meets the constraints ({'; '.join(best['violations'])}): "
            f"chose the highest score ({best['score']:.4f}) anyway"
        )
    lora = lora_file(train_dir, best["step"], params.eval.use_ema)
    return {
        "phase": phase,
        "step": best["step"],
        # the strength to load it with; the file itself is the checkpoint as trained
        "scale": best["scale"],
        "lora": str(lora),
        "weights": "ema" if params.eval.use_ema else "raw",
        "score": best["score"],
        "reason": reason,
        "objective": params.objective.model_dump(mode="json"),
        "checkpoints": table,
    }


def plot_phase(phase: str, summary: dict, out: Path) -> None:
    found = entries(summary.get(phase, {}))
    base = next((e for _, _, e in entries(summary.get(BASE, {}))), {})
    scales = sorted({scale for _, scale, _ in found})
    metrics = list(EVAL_METRICS)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        drawn = False
        for i, scale in enumerate(scales):  # one line per strength
            xs = [st for st, sc, _ in found if sc == scale]
            ys = [e.get(metric) for _, sc, e in found if sc == scale]
            ys = [np.nan if y is None else y for y in ys]
            if np.isfinite(ys).any():
                label = phase if len(scales) == 1 else f"{phase} x{scale_key(scale)}"
                ax.plot(xs, ys, marker="o", color=f"C{i}", label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "unavailable", ha="center", va="center", transform=ax.transAxes)
        if base.get(metric) is not None:
            ax.axhline(base[metric], color="grey", linestyle="--", label="base model")
        better = "higher" if EVAL_METRICS[metric] else "lower"
        ax.set_title(f"{metric} ({better} is better)", fontsize=10)
        ax.set_xlabel("step")
    handles, _ = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"phase {phase}: validation metrics per checkpoint")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def contact_sheet(
    phase: str, frame: pd.DataFrame, layout: Layout, validation: Path, out: Path, tile: int = 128
) -> None:
    """One row per validation pair: source | target | base | each checkpoint's output."""
    from facelora.io.datasets import read_manifest

    rows = frame[frame["phase"] == phase]
    base = frame[frame["phase"] == BASE]
    runs = sorted({(int(a), float(b)) for a, b in zip(rows["step"], rows["scale"], strict=True)})
    manifest = {m["pair_id"]: m for m in read_manifest(validation)}
    several = len({sc for _, sc in runs}) > 1
    labels = [
        "source",
        "target",
        "base",
        *[f"step {st}" + (f" x{scale_key(sc)}" if several else "") for st, sc in runs],
    ]
    pairs = sorted(manifest)
    sheet = Image.new("RGB", (tile * len(labels), 18 + tile * len(pairs)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(labels):
        draw.text((c * tile + 4, 3), label, fill="black")

    def paste(path: Path | None, r: int, c: int) -> None:
        box = (c * tile, 18 + r * tile)
        if path is not None and path.is_file():
            with Image.open(path) as im:
                sheet.paste(im.convert("RGB").resize((tile, tile)), box)
        else:
            draw.rectangle([box, (box[0] + tile - 1, box[1] + tile - 1)], outline="red")
            draw.text((box[0] + 4, box[1] + tile // 2), "failed", fill="red")

    def image_of(table: pd.DataFrame, phase_dir: str, pair_id: str, step, scale) -> Path | None:
        hit = table[
            (table["pair_id"] == pair_id) & (table["step"] == step) & (table["scale"] == scale)
        ]
        if hit.empty or not isinstance(hit.iloc[0]["image"], str):
            return None
        return Path(layout.eval_phase_dir(phase_dir)) / hit.iloc[0]["image"]

    for r, pid in enumerate(pairs):
        paste(validation / manifest[pid]["start"], r, 0)
        paste(validation / manifest[pid]["end"], r, 1)
        paste(image_of(base, BASE, pid, 0, 0.0), r, 2)
        for c, (step, scale) in enumerate(runs, start=3):
            paste(image_of(rows, phase, pid, step, scale), r, c)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


def group_tables(layout: Layout, params: Params, phase: str) -> list[Path]:
    """The tables of a phase's evaluation jobs, in job order (the rule's inputs)."""
    groups = range(len(params.eval_groups(phase)))
    return [Path(layout.eval_group_metrics(phase, g)) for g in groups]


def live_names(scales: list[str]) -> dict[tuple[str, str], str]:
    """(scale key, metric) -> the DVCLive metric name: the metric alone with one strength,
    `scale-S/metric` with several (as the image folders spell S)."""
    return {
        (s, m): m if len(scales) == 1 else f"scale-{s}/{m}" for s in scales for m in EVAL_METRICS
    }


def write_eval_live(phase: str, summary: dict, folder: Path) -> None:
    """The phase's evaluation means as a DVCLive folder, rewritten whole: one row per
    checkpoint (DVCLive's step = the checkpoint's step), each metric's mean at each strength
    (a metric that could not be computed: no point)."""
    from facelora.io.live import LiveSeries

    steps = summary.get(phase, {})
    scales = sorted({s for by in steps.values() for s in by}, key=float)
    names = live_names(scales)
    live = LiveSeries(folder)
    for step in sorted(steps, key=int):
        values = {
            names[s, m]: entry.get(m) for s, entry in steps[step].items() for m in EVAL_METRICS
        }
        live.log(int(step), values, summary=False)
    live.live.make_summary()


def write_choice(
    phase: str, params: Params, layout: Layout, out: Path, live_out: Path | None = None
) -> dict:
    """The best checkpoint of one phase, from its own rows and the base rows only, so the
    next phase can start from it before later phases are evaluated; with `live_out`, the
    phase's means per checkpoint as a DVCLive folder there. For `base` (the model alone) the
    record says so: what the first phase comes after."""
    if phase == BASE:
        if not Path(layout.base_metrics()).is_file():
            raise SettingsError("no evaluation rows for the base model: evaluate it first")
        choice = {
            "phase": BASE,
            "step": 0,
            "scale": 0.0,
            "lora": None,
            "weights": "none",
            "score": None,
            "reason": "the model without a LoRA: the reference row, and the first phase's start",
        }
        write_json(out, choice)
        return choice
    tables = [Path(layout.base_metrics()), *group_tables(layout, params, phase)]
    summary = summarize(gather(tables))
    choice = choose(phase, summary, params, Path(layout.train_dir(phase)))
    if live_out is not None:
        write_eval_live(phase, summary, Path(live_out))
    write_json(out, choice)
    return choice


def write_report(
    params: Params,
    layout: Layout,
    validation: Path,
    metrics_out: Path,
    summary_out: Path,
    plots: dict[str, Path],
    sheets: dict[str, Path],
) -> dict:
    """All rows (`metrics_out`), per-checkpoint means (`summary_out`, DVC metrics), a plot and
    a contact sheet per phase (`plots`, `sheets`: phase -> PNG)."""
    tables = [Path(layout.base_metrics())]
    for phase in params.phase_names:
        tables += group_tables(layout, params, phase)
    frame = gather(tables)
    write_csv(metrics_out, frame)
    summary = summarize(frame)
    backends = Path(layout.metric_backends(layout.base_dir()))
    if backends.is_file():  # which model computed each metric, or why it could not
        summary["metrics"] = json.loads(backends.read_text())
    # each phase's chosen checkpoint and strength with its means: what `dvc exp show` puts
    # beside the params
    chosen = {}
    for phase in params.phase_names:
        best = Path(layout.best(phase))
        if best.is_file():
            choice = json.loads(best.read_text())
            step, scale = choice["step"], choice["scale"]
            means = summary.get(phase, {}).get(str(step), {}).get(scale_key(scale), {})
            chosen[phase] = {"step": step, "scale": scale, **means}
    summary["chosen"] = chosen
    write_json(summary_out, summary, sort_keys=False)
    for phase in params.phase_names:
        plot_phase(phase, summary, plots[phase])
        contact_sheet(
            phase,
            _with_group_paths(frame, layout, phase),
            layout,
            validation,
            sheets[phase],
        )
    return summary


def _with_group_paths(frame: pd.DataFrame, layout: Layout, phase: str) -> pd.DataFrame:
    """Image paths of a phase's rows relative to its evaluation folder (they live in the
    folders of its evaluation jobs)."""
    out = frame.copy()
    root = Path(layout.eval_phase_dir(phase))
    for i in out.index[out["phase"] == phase]:
        image = out.at[i, "image"]
        if isinstance(image, str):
            found = list(root.glob(f"group-*/{image}"))
            out.at[i, "image"] = str(found[0].relative_to(root)) if found else None
    return out

"""DVCLive folders: the training log and the evaluation means as `dvc plots` / `dvc exp show`
read them (`plots/metrics/NAME.tsv`: step and value per row; `metrics.json`: the last values).

Always offline: no DVC Studio (whatever DVC_STUDIO_TOKEN or the DVC config say), no experiment
saved by DVCLive (the DVC stages version these folders), no dvc.yaml written (dvc.yaml declares
them), no HTML report (it would load vega from a CDN). Only `log_metric`, the `step` setter and
`make_summary` are used: `next_step`/`end` would also reread every series each step to post it
to Studio.

A folder is always written from the start: `LiveSeries` clears it and the caller replays the
rows it keeps (a resumed training run: log.csv's rows up to its checkpoint), so the series
never holds a step twice nor a step the run no longer has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

STEP = "step"
OFFLINE_ENV = {"DVC_STUDIO_OFFLINE": "true"}  # dvc-studio-client then skips every post
STUDIO_ENV = ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_STUDIO_REPO_URL", "STUDIO_REPO_URL")


@contextmanager
def _offline_env():
    """The environment DVCLive is opened under: Studio off, no token, no resume from env."""
    saved = {k: os.environ.get(k) for k in (*OFFLINE_ENV, *STUDIO_ENV, "DVCLIVE_RESUME")}
    try:
        for k in STUDIO_ENV:
            os.environ.pop(k, None)
        os.environ.pop("DVCLIVE_RESUME", None)
        os.environ.update(OFFLINE_ENV)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _live_class():
    from dvclive import Live

    class OfflineLive(Live):
        def _init_dvc(self):
            """No DVC repository lookup: nothing here needs one (no experiment, no Studio,
            no dvc.yaml), and DVCLive's own fails in a git repository without a commit."""

    return OfflineLive


class LiveSeries:
    """One DVCLive folder, rewritten from the first row: `log(step, values)` per row."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        with _offline_env():
            self.live = _live_class()(
                str(self.folder),
                resume=False,  # clears the folder's series: the caller replays what it keeps
                report=None,
                save_dvc_exp=False,
                dvcyaml=None,
                monitor_system=False,
            )
        # belt and braces: whatever was configured, nothing is ever posted to Studio
        self.live._dvc_studio_config = {}
        self.live._studio_events_to_skip.update({"start", "data", "done"})
        # there even with no value logged (no metric computed): DVC declares the folder
        (Path(self.live.plots_dir) / "metrics").mkdir(parents=True, exist_ok=True)

    def log(self, step: int, values: Mapping[str, float | None], summary: bool = True) -> None:
        """One row: each finite value at `step` (a missing or NaN value: no point)."""
        self.live.step = int(step)
        for name, value in values.items():
            if name == STEP or value is None or not math.isfinite(float(value)):
                continue
            self.live.log_metric(name, float(value))
        if summary:
            self.live.make_summary()

    def replay(self, rows: Iterable[Mapping[str, float]], columns: list[str]) -> None:
        """Rows kept from before (each with its `step`), in order."""
        last = None
        for row in rows:
            self.log(row[STEP], {c: row.get(c) for c in columns}, summary=False)
            last = row
        if last is not None:
            self.live.make_summary()


def read_series(folder: Path | str) -> dict[str, list[tuple[int, float]]]:
    """What a DVCLive folder holds: metric name -> [(step, value), ...] in file order."""
    import csv

    root = Path(folder) / "plots" / "metrics"
    out = {}
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        with tsv.open() as fh:
            out[name] = [
                (int(r[STEP]), float(r[name.rsplit("/", 1)[-1]]))
                for r in csv.DictReader(fh, delimiter="\t")
            ]
    return out

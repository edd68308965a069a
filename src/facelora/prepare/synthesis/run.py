"""The synthesize step (sharded) and its gather.

A shard makes the pairs of the jobs that hash to it and writes its rows (manifest, images,
faces); the gather merges the shards into the kind's folder, exactly what an unsharded run
writes, and removes files no row refers to (left from earlier settings).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from facelora.config import Params
from facelora.io.atomic import atomic_path, write_csv, write_parquet
from facelora.io.parallel import ordered_map
from facelora.io.progress import progress
from facelora.io.sharding import in_shard
from facelora.io.tables import FACES, IMAGES
from facelora.prepare.faces.backends import make_backend
from facelora.prepare.synthesis.kinds import CPU_KINDS
from facelora.prepare.synthesis.made import FACES_TABLE, IMAGES_TABLE, MANIFEST
from facelora.prepare.synthesis.plan import Job, plan, read_sources
from facelora.prepare.synthesis.write import PairWriter, Written
from facelora.registry.layout import MADE_FAILED as FAILED

log = logging.getLogger(__name__)

FAILED_COLUMNS = ["pair", "source", "reason"]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, default=_plain) + "\n")


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- worker processes ---------------------------------------------------------------------

_worker: dict = {}


def _init(kind: str, folder: Path, crops_dir: Path, params: Params, backend=None) -> None:
    import torch

    torch.set_num_threads(1)  # results independent of the thread count (and of sharding)
    _worker.update(
        kind=kind,
        params=params,
        writer=PairWriter(folder, crops_dir, params, backend or make_backend(params.faces)),
    )


def _work(job: Job) -> Written:
    writer: PairWriter = _worker["writer"]
    try:
        return CPU_KINDS[_worker["kind"]](job, writer, _worker["params"])
    except (OSError, ValueError) as exc:  # an unreadable crop: recorded, the run goes on
        return writer.failed(job, f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class ShardOutputs:
    manifest: Path
    images: Path
    faces: Path


def synthesize_shard(
    kind: str,
    crops_path: str | Path,
    faces_path: str | Path,
    images_path: str | Path,
    crops_dir: str | Path,
    folder: str | Path,
    out: ShardOutputs,
    params: Params,
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
    cache_dir: str | Path | None = None,
    editor=None,
) -> dict:
    """Make this shard's pairs of `kind` into `folder`; returns counts. The edit kind asks
    `editor` (facelora.prepare.synthesis.edit.Editor; default: the API client the settings
    name), its answers cached in `cache_dir` (default: FOLDER/.cache)."""
    folder, crops_dir = Path(folder), Path(crops_dir)
    sources = read_sources(crops_path, faces_path, images_path)
    jobs, skipped = plan(kind, sources, params)
    mine = [j for j in jobs if in_shard(j.pair, shard)]
    backend = make_backend(params.faces)  # a missing model fails here, before any work
    if kind == "edit":
        from facelora.prepare.synthesis.edit import api_editor, run_edit_jobs

        editor = editor or api_editor(params.synthesis.generator)
        writer = PairWriter(folder, crops_dir, params, backend)
        cache = Path(cache_dir) if cache_dir is not None else folder / ".cache"
        written = run_edit_jobs(mine, writer, params, editor, cache) if mine else []
    else:
        init = (kind, folder, crops_dir, params, backend if workers <= 1 else None)
        results = ordered_map(_work, mine, workers, _init, init)
        written = list(progress(results, total=len(mine), desc=kind, unit="pair"))
    _worker.clear()
    rows = [w.manifest for w in written]
    if params.synthesis.scorer.backend != "none":
        from facelora.prepare.synthesis.scoring import apply_scores

        cache = Path(cache_dir) if cache_dir is not None else folder / ".cache"
        apply_scores(rows, folder, params, cache)
    rows += [
        {"pair": None, "kind": kind, "status": "skipped", "reason": s["reason"], "source": s}
        for s in skipped
        if in_shard(s["source"], shard)
    ]
    write_jsonl(out.manifest, rows)
    write_parquet(out.images, pa.Table.from_pylist([r for w in written for r in w.images], IMAGES))
    write_parquet(out.faces, pa.Table.from_pylist([f for w in written for f in w.faces], FACES))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    log.info("%s shard %d/%d: %s", kind, *shard, counts)
    return counts


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def gather_synthesis(shards: list[ShardOutputs], folder: str | Path) -> dict:
    """Merge shard rows into the kind folder's manifest.jsonl, images/faces tables and
    failed.csv; delete pair files that no row refers to."""
    folder = Path(folder)
    rows = [r for s in shards for r in read_jsonl(s.manifest)]
    rows.sort(key=lambda r: (r["status"] != "ok", r["pair"] or "", json.dumps(r["source"])))
    images = pa.concat_tables([pq.read_table(s.images, schema=IMAGES) for s in shards])
    faces = pa.concat_tables([pq.read_table(s.faces, schema=FACES) for s in shards])
    write_parquet(folder / IMAGES_TABLE, images.sort_by([("image", "ascending")]))
    write_parquet(
        folder / FACES_TABLE,
        faces.sort_by([("image", "ascending"), ("face_index", "ascending")]),
    )
    failed = pd.DataFrame(
        [
            {"pair": r["pair"], "source": _source_text(r["source"]), "reason": r["reason"]}
            for r in rows
            if r["status"] != "ok"
        ],
        columns=FAILED_COLUMNS,
    )
    write_csv(folder / FAILED, failed)
    write_jsonl(folder / MANIFEST, rows)
    keep = {MANIFEST, IMAGES_TABLE, FACES_TABLE, FAILED}
    for r in rows:
        if r["status"] == "ok":
            keep.update([r["start"], r["end"], *r["references"], f"{r['pair']}.txt"])
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.name not in keep:
            path.unlink()
    stats = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    log.info("gathered %s pairs: %s", folder.name, stats)
    return stats


def _source_text(source: dict) -> str:
    if "image" in source:
        return f"{source['image']}#{source['face_index']}"
    return str(source.get("source"))

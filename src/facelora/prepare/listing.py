"""The raw photos folder as one listing file per shard: what the workflow's DAG depends on.

Snakemake would otherwise take every photo as an explicit input of the jobs that read it, and
planning then grows with the photos (about 1 s per 1,000 of them), not with the jobs. Instead,
each time the Snakefile is read, `write_listings` walks paths.raw once (names and `stat`
only: no file is opened) and writes, per shard, the name, size and modification time of each
of its files (and why a file is refused unread, as `scan_images` says). A shard's listing is
rewritten only when one of those changed, so its new modification time reruns exactly that
shard's jobs, as a changed photo did before. Sidecar files (captions, manifests) go into one
more listing, the pair index's input.

Memory stays bounded at any size: entries stream from the walk to per-shard spill files in
chunks, and each shard is compared on its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from facelora.config import ImagesParams
from facelora.io.sharding import shard_of
from facelora.prepare.images import image_reason, printable, walk_files
from facelora.prepare.pairs.layouts import MANIFEST_SUFFIXES

SIDECAR_SUFFIXES = frozenset({".txt", *MANIFEST_SUFFIXES})
_encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps, without its per-call setup
SPILL_EVERY = 50_000  # entries held in memory before they go to the spill files


@dataclass
class ListingStats:
    photos: int = 0
    sidecars: int = 0
    rewritten: int = 0  # shard listings whose content changed (their jobs rerun)


def _line(rel: str, entry: os.DirEntry, reason: str | None) -> str:
    try:
        st = entry.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = -1  # a broken link: detect records why it cannot be read
    return _encode([rel, size, mtime, reason]) + "\n"


def is_sidecar(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in SIDECAR_SUFFIXES


def _replace_if_changed(fresh: Path, target: Path) -> bool:
    """Move `fresh` over `target` unless they hold the same bytes; True when replaced."""
    same_size = target.is_file() and target.stat().st_size == fresh.stat().st_size
    if same_size and target.read_bytes() == fresh.read_bytes():
        fresh.unlink()
        return False
    os.replace(fresh, target)
    return True


def write_listings(
    raw: str | Path,
    images: ImagesParams,
    shards: int,
    shard_path,
    sidecars_path: str | Path,
) -> ListingStats:
    """Write `shard_path(i)` for i < shards and `sidecars_path` from the folder `raw` (empty
    listings when it does not exist: detect then says where the photos should be)."""
    raw = Path(raw)
    folder = Path(shard_path(0)).parent
    folder.mkdir(parents=True, exist_ok=True)
    spill = folder / f".spill.{os.getpid()}"
    shutil.rmtree(spill, ignore_errors=True)
    spill.mkdir()
    stats = ListingStats()
    try:
        buffers: dict[int, list[str]] = defaultdict(list)
        held = 0

        def flush() -> None:
            for shard, lines in buffers.items():
                with open(spill / f"{shard}.jsonl", "a", encoding="utf-8") as f:
                    f.writelines(lines)
            buffers.clear()

        for shard in range(shards):
            (spill / f"{shard}.jsonl").touch()
        with open(spill / "sidecars.jsonl", "w", encoding="utf-8") as side:
            accepted = set(images.extensions)
            # one walk for both (scan_images' order and rules: the same files, faster)
            for rel, entry in walk_files(raw) if raw.is_dir() else ():
                found = image_reason(rel, accepted)
                if found is None:
                    if is_sidecar(rel):
                        side.write(_line(printable(rel), entry, None))
                        stats.sidecars += 1
                    continue
                shown, reason = found
                buffers[shard_of(shown, shards)].append(_line(shown, entry, reason))
                stats.photos += 1
                held += 1
                if held >= SPILL_EVERY:
                    flush()
                    held = 0
        flush()
        for shard in range(shards):
            stats.rewritten += _replace_if_changed(
                spill / f"{shard}.jsonl", Path(shard_path(shard))
            )
        Path(sidecars_path).parent.mkdir(parents=True, exist_ok=True)
        _replace_if_changed(spill / "sidecars.jsonl", Path(sidecars_path))
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    for stale in folder.glob("*.jsonl"):  # shards beyond a lowered workflow.shards
        if stale.stem.isdigit() and int(stale.stem) >= shards:
            stale.unlink()
    return stats


def read_listing(path: str | Path, raw: str | Path) -> list[tuple[str, str, str | None]]:
    """(name, path, reason) of every file of one shard's listing, as `scan_images` yields."""
    raw = Path(raw)
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rel, _, _, reason = json.loads(line)
            out.append((rel, str(raw / rel), reason))
    return out

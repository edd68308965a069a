"""The folder one synthesis kind writes, and how the pair steps read it.

A kind's folder is a Kontext pair folder any tool can read (`NAME_start.png`, optional
`NAME_start2.png` .., `NAME_end.png`, `NAME.txt`) plus `manifest.jsonl` (one row per pair:
its provenance, status and scores) and two tables about its images in the detect tables'
schemas: `images.parquet` and `faces.parquet` (landmarks in the pair images' own pixels).
The images are aligned face crops already, so the pair step links them instead of cropping.

Inside the pair steps a synthesized image is named `made:KIND/FILE`, apart from the raw
folder's relative paths; `ImageRoots` turns either kind of name into a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from facelora.io.tables import FACES, IMAGES, read_table
from facelora.registry.layout import MADE_FACES as FACES_TABLE
from facelora.registry.layout import MADE_IMAGES as IMAGES_TABLE
from facelora.registry.layout import MADE_MANIFEST as MANIFEST

MADE_PREFIX = "made:"


def made_key(kind: str, file: str) -> str:
    return f"{MADE_PREFIX}{kind}/{file}"


def is_made(key: str) -> bool:
    return key.startswith(MADE_PREFIX)


def start_name(pair: str, n: int = 1) -> str:
    """The start image (n = 1) or reference n-1 (n >= 2) of a pair, Kontext style."""
    return f"{pair}_start.png" if n == 1 else f"{pair}_start{n}.png"


def end_name(pair: str) -> str:
    return f"{pair}_end.png"


def caption_name(pair: str) -> str:
    return f"{pair}.txt"


@dataclass(frozen=True)
class ImageRoots:
    """Where the pair steps find an image by name: the raw folder, or a kind's folder."""

    raw: Path
    made: dict[str, Path] = field(default_factory=dict)  # kind -> its folder

    def path(self, key: str) -> Path:
        if not is_made(key):
            return self.raw / key
        kind, _, file = key.removeprefix(MADE_PREFIX).partition("/")
        if kind not in self.made:
            raise KeyError(f"{key}: no synthesis folder for kind {kind!r} was given")
        return self.made[kind] / file


def read_manifest(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


@dataclass
class MadeFolder:
    """A kind's gathered folder as the pair steps need it (image names as `made:` keys)."""

    kind: str
    folder: Path

    @classmethod
    def at(cls, folder: str | Path) -> MadeFolder:
        folder = Path(folder)
        rows = list(read_manifest(folder / MANIFEST))
        kind = rows[0]["kind"] if rows else folder.name
        return cls(kind, folder)

    def pairs(self) -> list[dict]:
        """The usable rows of manifest.jsonl."""
        return [r for r in read_manifest(self.folder / MANIFEST) if r["status"] == "ok"]

    def key(self, file: str) -> str:
        return made_key(self.kind, file)

    def _keyed(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame["image"] = [self.key(f) for f in frame["image"]]
        return frame

    def faces(self) -> pd.DataFrame:
        return self._keyed(read_table(self.folder / FACES_TABLE, FACES))

    def images(self) -> pd.DataFrame:
        return self._keyed(read_table(self.folder / IMAGES_TABLE, IMAGES))


STATUSES = ("ok", "failed", "skipped")


def made_counts(manifest: str | Path) -> dict:
    """A kind's pairs made, failed and sources left out, pairs the VLM could not rate, and
    the reasons of each that is not ok."""
    rows = list(read_manifest(manifest))
    counts: dict = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    counts["unscored"] = sum(bool(r.get("score_failure")) for r in rows)
    counts["reasons"] = [r["reason"] for r in rows if r["status"] != "ok"]
    counts["reasons"] += [
        f"VLM score: {r['score_failure']}" for r in rows if r.get("score_failure")
    ]
    return counts


def image_roots(raw: str | Path, made: list[MadeFolder]) -> ImageRoots:
    return ImageRoots(Path(raw), {m.kind: m.folder for m in made})

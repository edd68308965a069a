"""Atomic file writes: write to a temporary name beside the target, then rename.

A step killed half-way never leaves a half-written file under the final name, so a rerun
(Snakemake --rerun-incomplete, or the same command again) never mistakes it for done.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an earlier
    folder there is removed), on error it is removed: a half-written folder is never taken
    for a finished one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, sort_keys: bool = True) -> None:
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=_json_default)
    write_text(path, text + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_parquet(path: str | Path, table: pa.Table | pd.DataFrame) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_png(path: str | Path, rgb: np.ndarray, compression: int = 1) -> None:
    """Write an RGB uint8 array (or a 2-D grey one) as PNG (OpenCV's encoder: fast,
    byte-deterministic)."""
    bgr = rgb if rgb.ndim == 2 else rgb[..., ::-1]
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, compression]
    )
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link src to dst (no extra disk), copying where links are not possible."""
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

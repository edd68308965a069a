"""Column schemas of the tables the data steps write (the documented output contract).

Writing through a fixed schema keeps empty tables typed and sharded runs byte-identical to
unsharded ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facelora.errors import MissingInput
from facelora.io.atomic import atomic_path

POINT = pa.list_(pa.float32(), 2)

IMAGES = pa.schema(
    [
        ("image", pa.string()),  # path relative to the raw folder
        ("status", pa.string()),  # ok | rejected
        ("reason", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),  # upright, full resolution
        ("height", pa.int32()),
        ("orientation", pa.int8()),  # EXIF orientation that was applied (1 = none)
        ("format", pa.string()),
        ("mode", pa.string()),
        ("notes", pa.string()),
        ("n_faces", pa.int32()),
        ("n_small_faces", pa.int32()),
        ("duplicate_of", pa.string()),  # first file (sorted) with the same bytes, or null
    ]
)

FACES = pa.schema(
    [
        ("image", pa.string()),
        ("face_index", pa.int32()),  # 0 = largest face of the image
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("score", pa.float32()),
        ("landmarks", pa.list_(POINT, 5)),  # eye L, eye R, nose, mouth L, mouth R (image sides)
        ("embedding", pa.list_(pa.float32())),  # unit length
        ("face_size", pa.float32()),  # from landmarks: max(2 x eye distance, 1.8 x eye-to-mouth)
        ("yaw", pa.float32()),
        ("pitch", pa.float32()),
        ("roll", pa.float32()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("backend", pa.string()),
    ]
)

CROPS = pa.schema(
    [
        ("image", pa.string()),
        ("face_index", pa.int32()),
        ("status", pa.string()),  # ok | rejected
        ("reason", pa.string()),
        ("crop", pa.string()),  # PNG path relative to the crops folder
        ("cx", pa.float32()),  # crop square in full-resolution pixels of the upright photo
        ("cy", pa.float32()),
        ("side", pa.float32()),
        ("angle", pa.float32()),
        ("out_side", pa.int32()),
        ("notes", pa.string()),
    ]
)

REJECTED = ["image", "reason"]


class ParquetRowWriter:
    """Stream rows into a Parquet file in row groups (bounded memory); atomic on close."""

    def __init__(self, path: str | Path, schema: pa.Schema, batch_rows: int = 1024):
        self.path = Path(path)
        self.schema = schema
        self.batch_rows = batch_rows
        self._rows: list[dict] = []
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema)

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._writer.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ParquetRowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_table(path: str | Path, schema: pa.Schema | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} not found: run the step that writes it first")
    return pq.read_table(path, schema=schema).to_pandas()


def read_rows(path: str | Path, schema: pa.Schema | None = None) -> list[dict]:
    """Rows as dicts with None (not NaN) for missing values."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} not found: run the step that writes it first")
    return pq.read_table(path, schema=schema).to_pylist()


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """DataFrame rows as plain dicts: None for missing values, lists for array cells."""
    out = []
    for row in frame.to_dict("records"):
        clean = {}
        for key, value in row.items():
            if hasattr(value, "tolist") and not isinstance(value, str):
                value = value.tolist()
            elif isinstance(value, float) and value != value:
                value = None
            clean[key] = value
        out.append(clean)
    return out


def read_rows_of(
    path: str | Path, schema: pa.Schema, images: pa.Array, columns: list[str] | None = None
) -> list[dict]:
    """Rows whose `image` is in `images`, filtered in Arrow before becoming Python objects."""
    filters = pc.field("image").isin(images)
    table = pq.read_table(path, schema=schema, columns=columns, filters=filters)
    return table.to_pylist()

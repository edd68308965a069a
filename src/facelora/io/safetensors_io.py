"""Byte-reproducible safetensors files.

The safetensors library stores the header's metadata from a hash map, so two saves of the
same tensors can differ in byte order. Here the header is written with sorted keys and the
tensors in sorted name order, so the same weights always give the same bytes (and the same
DVC hash); any safetensors reader loads the result.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from facelora.io.atomic import atomic_path

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for data in chunks:
            fh.write(data)


def rewrite(path: str | Path) -> None:
    """Rewrite a safetensors file in the reproducible order (same tensors, same metadata)."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    write(path, tensors, metadata)

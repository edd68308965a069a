"""Stable, filesystem-safe names for files the workflow writes.

Input names may hold spaces, unicode or odd characters; outputs are named by a readable ASCII
slug of the stem plus a short hash of the full relative path, so they never collide.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import PurePosixPath

_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


def short_hash(text: str, length: int = 10) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def slug(text: str, max_len: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return _UNSAFE.sub("_", ascii_text).strip("_")[:max_len] or "x"


def image_key(rel: str) -> str:
    """'people/Zoë 01.jpg' -> 'Zoe_01_3f2a9c1b0d'."""
    return f"{slug(PurePosixPath(rel).stem)}_{short_hash(rel)}"


def crop_name(rel: str, face_index: int) -> str:
    return f"{image_key(rel)}_f{face_index}.png"

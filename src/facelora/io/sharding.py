"""Deterministic sharding: which of N jobs handles an item, independent of listing order."""

from __future__ import annotations

import hashlib
import re

from facelora.errors import SettingsError

_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): shard index (0-based) of a count."""
    m = _SHARD.match(text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise SettingsError(f"--shard {text!r}: use INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_of(key: str, count: int) -> int:
    if count == 1:
        return 0
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    return shard_of(key, shard[1]) == shard[0]

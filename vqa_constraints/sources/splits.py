"""Deterministic test/validation assignment shared by all sources."""

from __future__ import annotations

from vqa_constraints.records import sha256_hex

VALIDATION_PERCENT = 15


def split_of(key: str) -> str:
    """'validation' for about 15% of keys, else 'test'; the same key always gets the same split.

    Sources pass the key of what must not straddle splits (e.g. the pictured
    entity), so no subject appears in both splits. The builder folds a
    source's validation rows back into test when the source is too small.
    """
    bucket = int(sha256_hex(key)[:8], 16) % 100
    return "validation" if bucket < VALIDATION_PERCENT else "test"

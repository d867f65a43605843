"""Seeds derived from the campaign's own: one stable function, so a round, a slice or a
strategy gets the same seed in every process and on every resume."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A stable 31-bit seed from a tuple (Python's hash() is salted per process)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF

"""Seeds derived from a stable hash of what they are for, never from offsets.

``derive_seed(config.seed, "sweep", "sparsity-0.9")`` is the seed of that phase's data order
and initialisation: the same in every process, machine and Python (``hash()`` of a string is
salted per process, so it is not used), different for every purpose, and unrelated between
neighbouring seeds (``seed * 1000 + index`` made seed 0's phase 1000 collide with seed 1's
dense phase).
"""
from __future__ import annotations

import hashlib

from .errors import ConfigError
from .validate import check_int


def derive_seed(seed: int, *purpose: str | int | float) -> int:
    """A 63-bit seed for ``purpose`` (the procedure, then the unit / phase within it) under the
    user's ``seed``. Equal inputs give equal seeds everywhere; the parts are joined unambiguously
    (``("a", "bc")`` and ``("ab", "c")`` differ)."""
    check_int(seed, "seed")
    if not purpose:
        raise ConfigError("derive_seed needs a purpose (the procedure and unit the seed is for)")
    parts = [repr(seed)] + [repr(p) for p in purpose]
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

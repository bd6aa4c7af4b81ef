"""The user cache (DIFFSCORE_CACHE, else $XDG_CACHE_HOME/diffscore): derived files that are safe to delete."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DIFFSCORE_CACHE",
                               Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffscore"))


def cache_dir(kind: str, *key) -> Path:
    """The cache folder of one derived artifact: cache_root()/kind/<hash of key>. Named by a hash, never by an
    engine's own text (a manifest is untrusted: a digest of `../../x` must not pick where files go)."""
    return cache_root() / kind / hashlib.sha256(json.dumps([kind, *map(str, key)]).encode()).hexdigest()[:16]

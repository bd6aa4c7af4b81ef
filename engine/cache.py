"""The user cache (DIFFSCORE_CACHE, else $XDG_CACHE_HOME/diffscore): derived files that are safe to delete."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DIFFSCORE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffscore"))

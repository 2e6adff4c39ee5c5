"""Where leuko keeps things on disk (caches, fetched datasets).

One place decides these locations so that the fetcher, the decoded-image
cache and the feature cache agree, and so that tests can redirect all of them
with one environment variable (``LEUKO_CACHE_DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of leuko's caches: ``$LEUKO_CACHE_DIR``, else ``$XDG_CACHE_HOME/leuko``, else ``~/.cache/leuko``."""
    env = os.environ.get("LEUKO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "leuko"


def datasets_cache_dir() -> Path:
    """Folder that ``leuko data fetch`` fills: one sub-folder per dataset name."""
    return cache_dir() / "datasets"

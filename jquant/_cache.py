"""Where jquant keeps what it can recompute (tokenizers, float references, compiled programs)."""

from __future__ import annotations

import os


def cache_root() -> str | None:
    """``$JQUANT_CACHE`` (default ``~/.cache/jquant``); ``None`` when set empty (caching off)."""
    root = os.environ.get("JQUANT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jquant"))
    return root or None

"""The one cache directory: ``$NEUROADDA_CACHE`` when set, else the platform's user cache folder.

Target features (ranking), TensorRT engines and exported ONNX files all live below it, each in
its own subfolder, so a user clears everything by deleting one folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "NEUROADDA_CACHE"


def cache_dir(subdir: str | None = None) -> Path:
    """The cache root (or ``subdir`` below it); not created here.

    ``$NEUROADDA_CACHE`` wins; otherwise :func:`platformdirs.user_cache_dir` when platformdirs is
    installed, and ``~/.cache/neuroadda_rt`` when it is not (the same folder on Linux).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        try:
            from platformdirs import user_cache_dir
        except ImportError:
            root = Path.home() / ".cache" / "neuroadda_rt"
        else:
            root = Path(user_cache_dir("neuroadda_rt", appauthor=False))
    return root / subdir if subdir else root

"""dspark: DSpark speculative decoding for the serving stacks teams already run."""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    """Where dspark keeps downloads, clones, builds and venvs: $DSPARK_CACHE, else ~/.cache/dspark."""
    return Path(os.environ.get("DSPARK_CACHE") or Path.home() / ".cache" / "dspark")

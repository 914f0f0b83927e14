"""dspark: DSpark speculative decoding for the serving stacks teams already run."""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    """Where dspark keeps downloads, clones, builds and venvs: $DSPARK_CACHE, else ~/.cache/dspark.
    Absolute: build records (last.json) name paths under it that other processes, in other working
    directories, load. A home that cannot be found (DSPARK_CACHE=~nobody/x, no HOME and no passwd
    entry) is an environment problem, one line."""
    from dspark_cli.errors import EnvironmentProblem

    try:
        return Path(os.environ.get("DSPARK_CACHE") or Path.home() / ".cache" / "dspark").expanduser().absolute()
    except RuntimeError as exc:  # pathlib's "Could not determine home directory."
        raise EnvironmentProblem(f"DSPARK_CACHE {os.environ.get('DSPARK_CACHE') or '~/.cache/dspark'}: "
                                 f"{str(exc).rstrip('.')}; set DSPARK_CACHE to an absolute directory") from None


def cache_subdir(name: str) -> Path:
    """cache_dir()/name, created; a DSPARK_CACHE that cannot hold it (a file, read-only) is an
    environment problem, one line, not an OSError."""
    from dspark_cli.errors import EnvironmentProblem

    path = cache_dir() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create {path} ({exc.strerror}); point DSPARK_CACHE at a writable "
                                 "directory") from None
    return path

"""Where a model's config.json is, in a module that does not import torch: `dspark profile` checks
--model with it before torch is needed (a wrong path is exit 2 also where torch is missing), and
the runtime's sps_profile, which imports torch, loads the config from it."""

from pathlib import Path


def config_path(path: Path) -> Path:
    """The config.json of `path`: a model directory, or the file itself."""
    return path / "config.json" if path.is_dir() else path

"""On/off environment switches that patched engines read (DSPARK_V2_FUSED, DSPARK_TGI_CUDA_GRAPHS)."""

import os

OFF = ("0", "false", "off", "no")


def env_switch(name: str) -> bool | None:
    """None when `name` is unset or empty (the caller's default applies), False for 0/false/off/no
    (any case), True for anything else."""
    value = (os.environ.get(name) or "").strip().lower()
    return None if not value else value not in OFF

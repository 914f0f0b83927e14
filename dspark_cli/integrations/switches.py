"""On/off environment switches that patched engines read (DSPARK_V2_FUSED, DSPARK_TGI_CUDA_GRAPHS)."""

import os

ON = ("1", "true", "on", "yes")
OFF = ("0", "false", "off", "no")


def env_switch(name: str) -> bool | None:
    """None when `name` is unset or empty (the caller's default applies), True for 1/true/on/yes,
    False for 0/false/off/no (any case). Anything else is a ValueError naming the variable: a
    "disable" read as on would force the path it meant to turn off."""
    value = (os.environ.get(name) or "").strip().lower()
    if not value:
        return None
    if value not in ON + OFF:
        raise ValueError(f"{name}={os.environ[name]!r}: expected one of {', '.join(ON)} (on) or {', '.join(OFF)} (off)")
    return value in ON

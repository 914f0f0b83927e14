"""Knobs of DSpark's verify-length scheduling on vLLM V1, from the environment or the draft's
config.json (a non-empty variable wins; relative paths are taken against the engine's working
directory):

  DSPARK_SCHEDULER / "dspark_scheduler":          exact (Algorithm 1, default) | production
  DSPARK_SPS_TABLE / "dspark_sps_table_path":     SPS table JSON (dspark-sps/1 or SGLang's format);
                                                   default: SPSTable.default() (10 ms + 20 µs/token)
  DSPARK_STS / "dspark_sts_path":                 per-position confidence temperatures (optional;
                                                   at least γ of them, the first γ used)
"""

import os
from dataclasses import dataclass

from dspark_cli.runtime import SPSTable, STSCalibration

SCHEDULERS = ("exact", "production")


@dataclass
class SchedulerSettings:
    scheduler: str
    sps: SPSTable
    sts: STSCalibration | None

    @classmethod
    def resolve(cls, hf_config, gamma: int, environ=os.environ) -> "SchedulerSettings":
        def pick(env: str, key: str) -> tuple[str | None, str]:
            """(value, where it came from): a non-empty variable, else the config key; a value that
            is not a non-empty string is named with its source."""
            if environ.get(env):
                return environ[env], env
            value, where = getattr(hf_config, key, None), f'the draft config\'s "{key}"'
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{where} must be a non-empty string, got {value!r}")
            return value, where

        scheduler, where = pick("DSPARK_SCHEDULER", "dspark_scheduler")
        scheduler = scheduler or "exact"
        if scheduler not in SCHEDULERS:
            raise ValueError(f"{where} must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        sps_path, sps_from = pick("DSPARK_SPS_TABLE", "dspark_sps_table_path")
        sts_path, sts_from = pick("DSPARK_STS", "dspark_sts_path")
        sps = _load(SPSTable.load, sps_path, sps_from) if sps_path else SPSTable.default()
        sts = _load(STSCalibration.load, sts_path, sts_from) if sts_path else None
        if sts is not None:  # refused at start, not at the first draft
            served = sts.for_block(gamma)
            if served is None:
                raise ValueError(f"{sts_from}: {sts_path}: {len(sts.temperatures)} STS temperature(s) for "
                                 f"num_speculative_tokens = {gamma}; calibrate at least {gamma} positions")
            sts = served
        return cls(scheduler, sps, sts)


def _load(load, path: str, where: str):
    """load(path), its error prefixed with where the path came from (the variable or config key)."""
    try:
        return load(path)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc

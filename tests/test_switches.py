"""The on/off environment switches patched engines read (DSPARK_V2_FUSED, DSPARK_TGI_CUDA_GRAPHS)."""

import pytest

from dspark_cli.integrations.switches import env_switch


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("  ", None), ("0", False), ("Off", False),
                                             (" no ", False), ("FALSE", False), ("1", True), ("on", True)])
def test_env_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("DSPARK_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("DSPARK_TEST_SWITCH", value)
    assert env_switch("DSPARK_TEST_SWITCH") is expected

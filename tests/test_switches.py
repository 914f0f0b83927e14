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


@pytest.mark.parametrize("value", ["disable", "disabled", "2", "nope"])
def test_a_value_that_is_neither_on_nor_off_is_refused_naming_the_variable(monkeypatch, value):
    """Was read as on: DSPARK_V2_FUSED=disable forced the fused path on."""
    monkeypatch.setenv("DSPARK_TEST_SWITCH", value)
    with pytest.raises(ValueError, match=rf"^DSPARK_TEST_SWITCH='{value}': expected one of 1, true, on, yes \(on\) "
                                         r"or 0, false, off, no \(off\)$"):
        env_switch("DSPARK_TEST_SWITCH")

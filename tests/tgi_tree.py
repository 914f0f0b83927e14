"""The real TGI v3.3.7 tree for tests that need it: DSPARK_TGI_SRC names a clone holding the tag
(.ci/prepare.d/39-tgi-src.sh makes one when GitHub answers); without it those tests skip."""

import os

import pytest

TGI_SRC = os.environ.get("DSPARK_TGI_SRC")
needs_tree = pytest.mark.skipif(not TGI_SRC, reason="DSPARK_TGI_SRC (a clone of huggingface/text-generation-inference "
                                                    "holding v3.3.7) is not set: .ci/prepare.d/39-tgi-src.sh sets it when it could clone the tag")

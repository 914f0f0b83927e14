# The vllm==0.33.0 x86_64 wheel (336 MB; sha256 from compat.yaml), cached under
# $DSPARK_CACHE/releases, so tests/test_vllm033_series.py applies the v0.33.0 series to the wheel's
# tree as well as to the sdist's (issue 6 asks for the wheel in CI). Downloaded once, then a cache hit.
python - <<'PY'
from pathlib import Path

from dspark_cli import compat, pypi_source

pin = compat.load(Path("compat.yaml")).engine("vllm").pins["v0.33.0"]
wheel = next(r for r in pin.releases if r.kind == "wheel" and r.package == "vllm")
print("vllm 0.33.0 wheel:", pypi_source.fetch_release(wheel))
PY

# The vllm 0.33.0 and 0.34.0 x86_64 wheels (336 and 239 MB; sha256 from compat.yaml), cached under
# $DSPARK_CACHE/releases, so tests/test_vllm033_series.py and test_vllm034_series.py apply those
# series to the wheels' trees as well as to the sdists' (issue 6 asks for the wheel in CI), and
# 33-vllm-import.sh installs them. Downloaded once, then a cache hit.
python - <<'PY'
from pathlib import Path

from dspark_cli import compat, pypi_source

for name in ("v0.33.0", "v0.34.0"):
    pin = compat.load(Path("compat.yaml")).engine("vllm").pins[name]
    wheel = next(r for r in pin.releases if r.kind == "wheel" and r.package == "vllm")
    print(f"vllm {pin.name} wheel:", pypi_source.fetch_release(wheel))
PY

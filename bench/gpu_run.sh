#!/usr/bin/env bash
# One GPU session for issue 4: build the extension, run the GPU tests, benchmark the kernels and the
# runtime. Needs only python3 with torch (CUDA build), nvcc, ninja and pytest; no install of dspark.
#   OUT=/tmp/out bash bench/gpu_run.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 DSPARK_CACHE="${DSPARK_CACHE:-/tmp/dspark-cache}"
OUT="${OUT:-/tmp/dspark-gpu-out}"; mkdir -p "$OUT"
{
  date -u; git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
python3 -c "
import time; from dspark_cli.build import build
r = build(jobs=16); print('build:', r)
t = time.monotonic(); r2 = build(); print('rebuild (nothing changed): %.2f s' % (time.monotonic() - t), r2.status)
" 2>&1 | grep -v "warning #\|^ *^\|^$" | tee "$OUT/build.txt" || exit 1
# The CLI path too, where the machine has typer/rich: a cached rebuild and `dspark verify ops`.
( time python3 -m dspark_cli build ) 2>&1 | tee "$OUT/cli_build.txt"
python3 -m dspark_cli verify ops 2>&1 | tee "$OUT/verify_ops.txt"
python3 -m pytest -x -q -ra -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$OUT/pytest.txt"
python3 bench/bench_kernels.py --sizes 1,16,128 --json-out "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.txt"
python3 bench/bench_runtime.py --device cuda --sizes 1,16,128 --repeats 5 2>&1 | tee "$OUT/bench_runtime.txt"

#!/usr/bin/env bash
# One GPU session for issue 4: build the extension, run the GPU tests, benchmark the kernels (the TGI
# drafter's attention op and context pool too), the runtime and `dspark profile`'s step timing. Needs
# python3 with torch (CUDA build), nvcc, ninja and pytest, and transformers, typer and rich for the
# profile and CLI steps; no install of dspark (PYTHONPATH=.).
#   OUT=/tmp/out bash bench/gpu_run.sh
# Steps run most-needed first and each writes its own file under $OUT, so a run cut short by the
# device's time limit still returns what finished.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 DSPARK_CACHE="${DSPARK_CACHE:-/tmp/dspark-cache}"
OUT="${OUT:-/tmp/dspark-gpu-out}"; mkdir -p "$OUT"
REPEATS="${REPEATS:-30}"
{
  date -u; git rev-parse HEAD 2>/dev/null || true; git status --short csrc dspark_cli bench tests 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
} 2>&1 | tee "$OUT/build.txt"
python3 -c "
import time; from dspark_cli.build import build
r = build(jobs=16); print('build:', r)
t = time.monotonic(); r2 = build(); print('rebuild (nothing changed): %.2f s' % (time.monotonic() - t), r2.status)
" 2>&1 | grep -v "warning #\|^ *^\|^$" | tee -a "$OUT/build.txt" || exit 1
# Every GPU test, from the files that mark any: collecting the rest needs the CLI's git dependency,
# which the device lacks.
python3 -m pytest -q -ra -p no:cacheprovider -m gpu $(grep -l "pytest.mark.gpu" tests/*.py) 2>&1 \
  | tee "$OUT/pytest_gpu.txt"
python3 bench/bench_kernels.py --ops markov,confidence,schedule --repeats "$REPEATS" --sizes 1,16,128 \
  --json-out "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.txt"
python3 bench/bench_kernels.py --ops rejection --repeats "$REPEATS" --sizes 1,16,128 \
  --json-out "$OUT/bench_rejection.json" 2>&1 | tee "$OUT/bench_rejection.txt"
python3 bench/bench_kernels.py --ops warped --repeats "$REPEATS" --sizes 1,16,128 \
  --json-out "$OUT/bench_warped.json" 2>&1 | tee "$OUT/bench_warped.txt"
# One V1 round (chain + verification, q stored / lazy) and the verification from V1's logits.
python3 bench/bench_v1_round.py --sizes 1,16,128 --repeats "$REPEATS" --json-out "$OUT/bench_v1_round.json" 2>&1 \
  | tee "$OUT/bench_v1_round.txt"
python3 bench/bench_draft_attention.py --sizes 1,16,128 --repeats "$REPEATS" 2>&1 | tee "$OUT/bench_draft_attention.txt"
# The drafter's context pool near full: requests growing, then finishing and arriving.
python3 bench/bench_tgi_pool.py --json-out "$OUT/bench_tgi_pool.json" > /dev/null
python3 bench/bench_tgi_pool.py --lifetime 100,300 --steps 600 --json-out "$OUT/bench_tgi_pool_churn.json" > /dev/null
python3 bench/bench_profile.py --sizes 1,8,32,128,512 --context 256 2>&1 | tee "$OUT/bench_profile.txt"
# The CLI path too, where the machine has typer/rich: a cached rebuild and `dspark verify ops`.
{ time python3 -m dspark_cli build; python3 -m dspark_cli verify ops; } 2>&1 | tee "$OUT/cli.txt"
[ -z "${SKIP_RUNTIME_BENCH:-}" ] && python3 bench/bench_runtime.py --device cuda --sizes 1,16,128 --repeats 5 2>&1 \
  | tee "$OUT/bench_runtime.txt"
true

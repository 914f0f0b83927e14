# CUDA build check for tests/test_build_cuda.py (sourced by .ci/run): a venv with torch 2.14.1 (its
# CUDA 13.0 build, ~5.5 GB, from the local wheel store) and ninja, cached under $DSPARK_CACHE. The
# test compiles csrc/ with nvcc 13.0 for sm_90a in that venv and loads the library without a GPU.
CUDA_TORCH_VENV="$DSPARK_CACHE/venv-cuda-torch-2.14.1"
if ! venv_ready "$CUDA_TORCH_VENV" "${BASH_SOURCE[0]}"; then
  rm -rf "$CUDA_TORCH_VENV"
  python3.11 -m venv "$CUDA_TORCH_VENV"
  "$CUDA_TORCH_VENV/bin/pip" install -q "${CUDA_TORCH_INDEX[@]}" "torch==2.14.1" ninja
  "$CUDA_TORCH_VENV/bin/python" -c "import torch, ninja; assert torch.version.cuda.startswith('13.')"
  venv_built "$CUDA_TORCH_VENV" "${BASH_SOURCE[0]}"
fi
if command -v nvcc >/dev/null 2>&1; then
  export DSPARK_CUDA_TORCH_PYTHON="$CUDA_TORCH_VENV/bin/python"
else
  echo "20-cuda-torch: no nvcc on PATH; tests/test_build_cuda.py will skip" >&2
fi

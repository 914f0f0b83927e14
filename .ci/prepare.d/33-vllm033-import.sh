# Patched vLLM 0.33.0 for import checks in tests/test_vllm033_series.py (sourced by .ci/run; after
# 20-cuda-torch.sh, which builds the torch 2.14.1 CUDA 13.0 venv, and 32-vllm033-wheel.sh, which
# caches the wheel). A python3.11 venv (torch 2.14.1 from the local disk exists for 3.11 only) with:
# - torch 2.14.1 taken from $CUDA_TORCH_VENV through a .pth file, not a second 5.4 GB copy (vLLM
#   0.33.0 pins torch==2.14.0, which is not installable here; 2.14.1 is the nearest);
# - the vllm 0.33.0 wheel, --no-deps, plus its Requires-Dist without extras, less the ones below;
# - our v0.33.0 series applied to the wheel's tree with `dspark apply --source pypi`, its changed
#   Python files laid over site-packages (as 30-vllm-cpu.sh does).
# Left out of vLLM's requirements (vLLM imports none of them at module level in what we import):
#   torch torchvision torchaudio: pinned to torch 2.14.0 builds (torch comes from the venv above);
#   torchcodec: its binary is built against one torch release (PyPI's breaks beside other torches);
#   flashinfer-python tilelang quack-kernels tokenspeed-mla humming-kernels instanttensor
#   fastsafetensors nvidia-cudnn-frontend nvidia-cutlass-dsl PyNvVideoCodec: CUDA kernel or
#   GPU-I/O libraries, used only on a GPU (several pull nvidia-cutlass-dsl's CUDA libs, ~1 GB more).
VLLM033_VENV="$DSPARK_CACHE/venv-vllm-0.33.0-import"
VLLM033_WHEEL="vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl"
VLLM033_DROP='torch|torchvision|torchaudio|torchcodec|flashinfer-python|tilelang|quack-kernels|tokenspeed-mla|humming-kernels|instanttensor|fastsafetensors|nvidia-cudnn-frontend|nvidia-cutlass-dsl|PyNvVideoCodec'
VLLM033_TORCH_VENV="${CUDA_TORCH_VENV:-$DSPARK_CACHE/venv-cuda-torch-2.14.1}"
VLLM033_TORCH_SITE="$("$VLLM033_TORCH_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VLLM033_VENV/bin/python" -c "from importlib.metadata import version as v; assert (v('vllm'), v('torch')) == ('0.33.0', '2.14.1')" 2>/dev/null; then
  rm -rf "$VLLM033_VENV"
  python3.11 -m venv "$VLLM033_VENV"
  VLLM033_SITE="$("$VLLM033_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$VLLM033_TORCH_SITE" > "$VLLM033_SITE/zz-dspark-cuda-torch-2.14.1.pth"  # after our own site-packages
  unzip -p "$DSPARK_CACHE/releases/$VLLM033_WHEEL" vllm-0.33.0.dist-info/METADATA \
    | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | grep -v -i -E "^($VLLM033_DROP)([^A-Za-z0-9_.-]|\$)" \
    > "$VLLM033_VENV/requirements.txt"
  echo "torch==2.14.1" > "$VLLM033_VENV/constraints.txt"  # what a dependency asking for torch gets: the one above
  env -u PYTHONPATH "$VLLM033_VENV/bin/pip" install -q -r "$VLLM033_VENV/requirements.txt" -c "$VLLM033_VENV/constraints.txt"
  env -u PYTHONPATH "$VLLM033_VENV/bin/pip" install -q --no-deps "$DSPARK_CACHE/releases/$VLLM033_WHEEL"
fi
# Re-apply and re-overlay only when the series or compat.yaml changed (the apply on the 336 MB
# wheel takes ~30 s); the stamp lives in the venv, so a rebuilt venv is always overlaid.
VLLM033_STAMP="$VLLM033_VENV/dspark-series.sha256"
VLLM033_SHA="$(cat patches/vllm/v0.33.0/* compat.yaml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VLLM033_STAMP" 2>/dev/null)" != "$VLLM033_SHA" ]; then
  rm -f "$VLLM033_STAMP"
  VLLM033_TREE="$DSPARK_CACHE/tree-vllm-0.33.0-wheel"
  rm -rf "$VLLM033_TREE"
  dspark apply vllm --source pypi --commit v0.33.0 --package vllm --file "$VLLM033_WHEEL" -C "$VLLM033_TREE"
  source .ci/overlay-series.sh
  overlay_series "$VLLM033_TREE" "$VLLM033_VENV"
  rm -rf "$VLLM033_TREE"  # 1.2 GB, not needed once overlaid
  echo "$VLLM033_SHA" > "$VLLM033_STAMP"
fi
"$VLLM033_VENV/bin/python" -c "import vllm._dspark as d; print('patched vLLM 0.33.0:', d.SERIES)"
export DSPARK_VLLM033_PYTHON="$VLLM033_VENV/bin/python"

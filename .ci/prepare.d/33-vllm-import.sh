# Patched vLLM 0.33.0 and 0.34.0 for import checks in tests/test_vllm03{3,4}_series.py (sourced by
# .ci/run; after 20-cuda-torch.sh, which builds the torch 2.14.1 CUDA 13.0 venv, and
# 32-vllm-wheels.sh, which caches the wheels). Per version a python3.11 venv (torch 2.14.1 from
# the local disk exists for 3.11 only) with:
# - torch 2.14.1 taken from $CUDA_TORCH_VENV through a .pth file, not a second 5.4 GB copy (both
#   releases pin torch==2.14.0, which is not installable here; 2.14.1 is the nearest);
# - the vllm wheel, --no-deps, plus its Requires-Dist without extras, less the ones below;
# - our series for that release applied to the wheel's tree with `dspark apply --source pypi`, its
#   changed Python files laid over site-packages (as 30-vllm-cpu.sh does).
# Left out of vLLM's requirements (vLLM imports none of them at module level in what we import):
#   torch torchvision torchaudio: pinned to torch 2.14.0 builds (torch comes from the venv above);
#   torchcodec: its binary is built against one torch release (PyPI's breaks beside other torches);
#   flashinfer-python tilelang quack-kernels tokenspeed-mla humming-kernels instanttensor
#   fastsafetensors nvidia-cudnn-frontend nvidia-cutlass-dsl PyNvVideoCodec: CUDA kernel or
#   GPU-I/O libraries, used only on a GPU (several pull nvidia-cutlass-dsl's CUDA libs, ~1 GB more).
VLLM_IMPORT_DROP='torch|torchvision|torchaudio|torchcodec|flashinfer-python|tilelang|quack-kernels|tokenspeed-mla|humming-kernels|instanttensor|fastsafetensors|nvidia-cudnn-frontend|nvidia-cutlass-dsl|PyNvVideoCodec'
VLLM_IMPORT_TORCH_VENV="${CUDA_TORCH_VENV:-$DSPARK_CACHE/venv-cuda-torch-2.14.1}"
VLLM_IMPORT_TORCH_SITE="$("$VLLM_IMPORT_TORCH_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

source .ci/overlay-series.sh  # overlay_series

# vllm_import_venv VERSION: builds $DSPARK_CACHE/venv-vllm-VERSION-import and sets VLLM_IMPORT_PYTHON to
# its python (a variable, not printed for a $(...): errexit does not reach into a command substitution).
vllm_import_venv() {
  local version="$1"
  local venv="$DSPARK_CACHE/venv-vllm-$version-import" wheel="vllm-$version-cp38-abi3-manylinux_2_28_x86_64.whl"
  if ! venv_ready "$venv" "${BASH_SOURCE[0]}"; then
    rm -rf "$venv"
    python3.11 -m venv "$venv"
    local site
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$VLLM_IMPORT_TORCH_SITE" > "$site/zz-dspark-cuda-torch-2.14.1.pth"  # after our own site-packages
    unzip -p "$DSPARK_CACHE/releases/$wheel" "vllm-$version.dist-info/METADATA" \
      | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | grep -v -i -E "^($VLLM_IMPORT_DROP)([^A-Za-z0-9_.-]|\$)" \
      > "$venv/requirements.txt"
    echo "torch==2.14.1" > "$venv/constraints.txt"  # what a dependency asking for torch gets: the one above
    env -u PYTHONPATH "$venv/bin/pip" install -q -r "$venv/requirements.txt" -c "$venv/constraints.txt"
    env -u PYTHONPATH "$venv/bin/pip" install -q --no-deps "$DSPARK_CACHE/releases/$wheel"
    "$venv/bin/python" -c "from importlib.metadata import version as v; assert (v('vllm'), v('torch')) == ('$version', '2.14.1')"
    venv_built "$venv" "${BASH_SOURCE[0]}"
  fi
  # Re-apply and re-overlay only when the series or compat.yaml changed (the apply on the wheel
  # takes ~30 s); the stamp lives in the venv, so a rebuilt venv is always overlaid.
  local stamp="$venv/dspark-series.sha256" sha
  sha="$(cat "patches/vllm/v$version"/* compat.yaml | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$sha" ]; then
    rm -f "$stamp"
    local tree="$DSPARK_CACHE/tree-vllm-$version-wheel"
    rm -rf "$tree"
    dspark apply vllm --source pypi --commit "v$version" --package vllm --file "$wheel" -C "$tree"
    overlay_series "$tree" "$venv"
    rm -rf "$tree"  # 1.2 GB, not needed once overlaid
    echo "$sha" > "$stamp"
  fi
  "$venv/bin/python" -c "import vllm._dspark as d; print('patched vLLM $version:', d.SERIES)"
  VLLM_IMPORT_PYTHON="$venv/bin/python"
}

vllm_import_venv 0.33.0
export DSPARK_VLLM033_PYTHON="$VLLM_IMPORT_PYTHON"
vllm_import_venv 0.34.0
export DSPARK_VLLM034_PYTHON="$VLLM_IMPORT_PYTHON"

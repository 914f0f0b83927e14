# TGI v3.3.7 token-chooser comparison (tests/test_tgi_chooser.py): a venv with the Python deps of
# TGI's utils/tokens.py (loguru, outlines, protobuf, grpcio-tools) layered over the CI venv (a .pth
# to its site-packages: torch, transformers, our package), cached under $DSPARK_CACHE. Only built
# when DSPARK_TGI_SRC names a TGI clone (39-tgi-src.sh sets it when it could clone the tag).
if [ -n "${DSPARK_TGI_SRC:-}" ]; then
  TGI_UTILS_VENV="$DSPARK_CACHE/venv-tgi-utils"
  venv_usable "$TGI_UTILS_VENV"
  TGI_UTILS_SP="$("$TGI_UTILS_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$TGI_UTILS_SP/dspark-ci.pth"
  "$TGI_UTILS_VENV/bin/python" -m pip install -q loguru "grpcio-tools>=1.69" "protobuf>=5.28.3" "outlines>=0.1.13,<1.0"
  export DSPARK_TGI_UTILS_PYTHON="$TGI_UTILS_VENV/bin/python"
else
  echo "40-tgi-utils: DSPARK_TGI_SRC not set; the TGI tests that need the v3.3.7 tree will skip" >&2
fi

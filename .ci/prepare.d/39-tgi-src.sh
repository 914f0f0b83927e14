# TGI v3.3.7 source for the TGI tests (sourced by .ci/run). DSPARK_TGI_SRC wins; else a shallow
# clone of the tag cached under $DSPARK_CACHE (made here when GitHub answers). Without either the
# tests that need the tree skip and say so.
TGI_TAG_COMMIT=dfb3fbe78e0d1d69251bd33065591c61bafdfaa8
TGI_SRC_CACHE="$DSPARK_CACHE/tgi-v3.3.7"
if [ -z "${DSPARK_TGI_SRC:-}" ]; then
  if [ "$(git -C "$TGI_SRC_CACHE" rev-parse HEAD 2>/dev/null || true)" != "$TGI_TAG_COMMIT" ]; then
    # cloned beside it and moved into place when whole: a clone killed during its checkout has
    # HEAD at the commit and files missing
    rm -rf "$TGI_SRC_CACHE" "$TGI_SRC_CACHE.part"
    if timeout 300 git clone -q --depth 1 --branch v3.3.7 https://github.com/huggingface/text-generation-inference \
        "$TGI_SRC_CACHE.part" 2>/dev/null; then
      mv "$TGI_SRC_CACHE.part" "$TGI_SRC_CACHE"
    else
      rm -rf "$TGI_SRC_CACHE.part"
    fi
  fi
  if [ "$(git -C "$TGI_SRC_CACHE" rev-parse HEAD 2>/dev/null || true)" = "$TGI_TAG_COMMIT" ]; then
    export DSPARK_TGI_SRC="$TGI_SRC_CACHE"
  else
    echo "39-tgi-src: no TGI v3.3.7 tree (DSPARK_TGI_SRC unset, GitHub not reachable: TGI's server source is on no" \
      "package registry); the TGI tree and shard tests skip" >&2
  fi
fi

# overlay_series TREE VENV: lay the vllm/ Python files our series changed in TREE (a `dspark apply
# --source pypi` workspace of the wheel installed in VENV) over VENV's site-packages. Files a
# previous overlay changed and this series does not go back to the wheel's (TREE's base has them).
# Sourced by the prepare.d stages that patch an installed vLLM wheel.
overlay_series() {
  local tree="$1" venv="$2" site base list="$2/dspark-overlay.txt" f
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  base="$(git -C "$tree" rev-list --max-parents=0 HEAD)"
  { cat "$list" 2>/dev/null || true; git -C "$tree" diff --name-only "$base" HEAD -- vllm; } | sort -u > "$list.new"
  while read -r f; do
    if [ -e "$tree/$f" ]; then install -D -m 0644 "$tree/$f" "$site/$f"; else rm -f "$site/$f"; fi
  done < "$list.new"
  git -C "$tree" diff --name-only "$base" HEAD -- vllm > "$list"
  rm -f "$list.new"
}

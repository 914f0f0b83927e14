# Cached venvs (sourced by .ci/run). A venv counts as built only when the stamp its build writes
# last names the stage that built it (the stage file's sha256): a run killed midway (a python with
# no pip yet, an install cut short that still imports) or a stage changed since (another pin, a
# package dropped) leaves no matching stamp, so the next run builds it again rather than trust it.

# venv_ready VENV STAGE_FILE: whether VENV was built, to the end, by STAGE_FILE as it is now.
venv_ready() {
  [ "$(cat "$1/.dspark-built-by" 2>/dev/null)" = "$(sha256sum < "$2")" ] &&
    "$1/bin/python" -m pip --version >/dev/null 2>&1
}

# venv_built VENV STAGE_FILE: the build's last step.
venv_built() { sha256sum < "$2" > "$1/.dspark-built-by"; }

# venv_usable VENV: for a venv every run installs into again: made anew when python or pip is missing.
venv_usable() {
  "$1/bin/python" -m pip --version >/dev/null 2>&1 || { rm -rf "$1"; python3 -m venv "$1"; }
}

# `pip install .` must give a working `dspark` command (issue 2 §4). A non-editable install into
# its own venv (cached under $DSPARK_CACHE; deps installed once), built from a copy of the files
# git would ship so the checkout gets no build/ or egg-info. tests/test_doctor_package.py reads
# DSPARK_PACKAGE_DSPARK and runs the installed command from outside the checkout.
PKG_VENV="$DSPARK_CACHE/venv-package"
venv_usable "$PKG_VENV"
PKG_SRC="$(mktemp -d)"
# (a file deleted in the worktree but still tracked is skipped, not an error)
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -cf - -T - 2>/dev/null | tar -xf - -C "$PKG_SRC"
"$PKG_VENV/bin/python" -m pip install -q "$PKG_SRC" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
rm -rf "$PKG_SRC"
"$PKG_VENV/bin/dspark" --help > /dev/null
export DSPARK_PACKAGE_DSPARK="$PKG_VENV/bin/dspark"

"""The series files' own format (docs/patch-series.md): what apply and `series lock` read."""

import hashlib

import pytest

from dspark_cli import series
from dspark_cli.errors import UsageError


def test_a_lock_line_with_more_after_the_name_is_malformed(tmp_path):
    """`<sha256>  <name>` is the whole line; trailing text was read as the name alone."""
    (tmp_path / "0001-a.patch").write_text("x")
    (tmp_path / "series").write_text("0001-a.patch\n")
    (tmp_path / "series.lock").write_text(f"{'0' * 64}  0001-a.patch trailing\n")
    with pytest.raises(UsageError, match="expected '<sha256>  <patch name>'"):
        series.read_lock(tmp_path)


def test_apply_refuses_a_lock_naming_a_patch_the_series_does_not_list(tmp_path):
    """load_series (what apply reads) must refuse an extra locked patch, as --check does."""
    (tmp_path / "0001-a.patch").write_text("x")
    (tmp_path / "series").write_text("0001-a.patch\n")
    digest = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "series.lock").write_text(f"{digest}  0001-a.patch\n{'0' * 64}  0009-gone.patch\n")
    with pytest.raises(UsageError, match="0009-gone.patch is locked but not listed in series"):
        series.load_series(tmp_path, "dspark")


def test_a_patch_listed_twice_in_series_is_refused(tmp_path):
    """a name listed twice was locked twice and applied twice."""
    (tmp_path / "0001-a.patch").write_text("x")
    (tmp_path / "series").write_text("0001-a.patch\n0001-a.patch\n")
    with pytest.raises(UsageError, match=r"series:2: 0001-a.patch is listed twice"):
        series.read_series(tmp_path)


def test_a_patch_locked_twice_is_refused_whichever_digest_matches(tmp_path):
    """apply took the later of two digests for one patch (a wrong one first, the right one after
    passed); `series lock --check` flagged the file, apply did not."""
    (tmp_path / "0001-a.patch").write_text("x")
    (tmp_path / "series").write_text("0001-a.patch\n")
    digest = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "series.lock").write_text(f"{'0' * 64}  0001-a.patch\n{digest}  0001-a.patch\n")
    with pytest.raises(UsageError, match=r"series.lock:2: 0001-a.patch is locked twice; run `dspark series lock "):
        series.load_series(tmp_path, "dspark")

"""dspark_cli.files: every file of a set replaced in full, or none touched."""

import os
import stat
from pathlib import Path

import pytest

from dspark_cli.files import replace_atomically, write_text_atomically


def test_a_failing_writer_leaves_every_file_as_it_was(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text("old a")
    second.write_text("old b")

    def fails(tmp):
        Path(tmp).write_text("half")
        raise KeyboardInterrupt  # a kill-like interruption, not only OSError, cleans up

    with pytest.raises(KeyboardInterrupt):
        replace_atomically([(first, lambda tmp: Path(tmp).write_text("new a")), (second, fails)])
    assert first.read_text() == "old a" and second.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_an_interrupted_rename_puts_back_the_files_renamed_before_it(tmp_path, monkeypatch):
    """Ctrl-C between two renames: the files renamed already get their old contents back (a new
    one is removed), so the set is still all-or-nothing."""
    old_a, new_b, old_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    old_a.write_text("old a")
    old_c.write_text("old c")
    real_replace, renames = os.replace, []

    def replace(src, dst):
        renames.append(dst)
        if len(renames) == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        replace_atomically([(path, lambda tmp, n=path.name: Path(tmp).write_text(f"new {n}"))
                            for path in (old_a, new_b, old_c)])
    assert old_a.read_text() == "old a" and old_c.read_text() == "old c" and not new_b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]


def test_without_hard_links_the_old_files_are_kept_as_copies(tmp_path, monkeypatch):
    """vfat and some FUSE mounts refuse os.link: the set is still written (and could still be undone)."""
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    replace_atomically([(tmp_path / n, lambda tmp, n=n: Path(tmp).write_text(f"new {n}")) for n in ("a", "b")])
    assert [(tmp_path / n).read_text() for n in ("a", "b")] == ["new a", "new b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_an_existing_file_keeps_its_mode_and_a_new_one_gets_the_umask(tmp_path):
    kept = tmp_path / "kept"
    kept.write_text("x")
    kept.chmod(0o640)
    write_text_atomically(kept, "y")
    assert kept.read_text() == "y" and stat.S_IMODE(kept.stat().st_mode) == 0o640

    umask = os.umask(0o027)
    try:
        write_text_atomically(tmp_path / "sub" / "new", "z")  # the parent is made too
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "sub" / "new").stat().st_mode) == 0o640


def test_a_symlink_is_written_through_and_kept(tmp_path):
    """The package's compat.yaml is a link to the repository's: `compat lock` must not replace the
    link by a file."""
    target = tmp_path / "compat.yaml"
    target.write_text("old\n")
    link = tmp_path / "pkg" / "compat.yaml"
    link.parent.mkdir()
    link.symlink_to("../compat.yaml")
    write_text_atomically(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compat.yaml", "pkg"]


def test_a_device_pipe_or_socket_is_never_renamed_over(tmp_path):
    """As root, `dspark profile --out /dev/null` replaced the device with a regular file: the
    temporary was renamed over whatever the path was. A pipe stands in for the device here."""
    pipe, other = tmp_path / "pipe", tmp_path / "other.json"
    os.mkfifo(pipe)
    with pytest.raises(OSError) as refused:
        replace_atomically([(other, lambda tmp: Path(tmp).write_text("new")),
                            (pipe, lambda tmp: Path(tmp).write_text("new"))])
    assert refused.value.filename == str(pipe) and "not a regular file" in refused.value.strerror
    assert stat.S_ISFIFO(pipe.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_name_as_long_as_the_filesystem_allows_is_written(tmp_path):
    """The temporary beside it was named after it plus 14 characters: past NAME_MAX (255) for a
    legal name of 242 or more, so `dspark profile --out` failed after its whole sweep."""
    long = tmp_path / ("c" * 250 + ".json")
    (tmp_path / "other").write_text("old")
    replace_atomically([(long, lambda tmp: Path(tmp).write_text("new")),
                        (tmp_path / "other", lambda tmp: Path(tmp).write_text("new other"))])
    assert long.read_text() == "new" and (tmp_path / "other").read_text() == "new other"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, "other"])


def test_temporaries_killed_runs_left_beside_a_file_are_removed_by_the_next_write(tmp_path, monkeypatch):
    """A run killed between its save and its rename left `.<name>.dspark-<random>.tmp` beside the
    file (compat.yaml in the user's checkout) for good. A live run's (changed within the hour)
    stays, and so do names we do not make, however old."""
    from dspark_cli import files

    target = tmp_path / "compat.yaml"
    live = tmp_path / ".compat.yaml.dspark-k3k3k3k3.tmp"
    live.write_text("x")
    write_text_atomically(target, "one\n")
    assert live.exists()
    monkeypatch.setattr(files, "STALE_TEMPORARY_S", -1)  # as if an hour had passed
    ours = [tmp_path / name for name in (".compat.yaml.dspark-ab12_x9z.tmp", ".compat.yaml.dspark-qq77rr66.old")]
    theirs = [tmp_path / name for name in (".compat.yaml.20250101.old", ".compat.yaml.backup.tmp")]
    for path in ours + theirs:
        path.write_text("x")
    write_text_atomically(target, "two\n")
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["compat.yaml", *(p.name for p in theirs)])



def test_a_long_name_of_multibyte_characters_is_written(tmp_path):
    """The temporary's name kept the first 100 characters of the file's: 255 bytes for a legal name
    of 85 three-byte characters, so the temporary's name was past NAME_MAX."""
    long = tmp_path / ("表" * 80 + ".yaml")
    assert len(os.fsencode(long.name)) == 245
    write_text_atomically(long, "kept\n")
    assert long.read_text() == "kept\n" and [p.name for p in tmp_path.iterdir()] == [long.name]


def test_a_write_leaves_the_temporaries_of_a_name_sharing_its_start(tmp_path, monkeypatch):
    """Two long names cut to the same start would sweep each other's temporaries (and a live
    write's only the hour keeps apart): the cut name carries a hash of the whole one."""
    from dspark_cli import files

    first, second = tmp_path / ("n" * 200 + "1"), tmp_path / ("n" * 200 + "2")
    monkeypatch.setattr(files, "STALE_TEMPORARY_S", -1)
    leftover = tmp_path / (files._temporary_prefix(second) + "ab12cd34.tmp")
    leftover.write_text("x")
    write_text_atomically(first, "first\n")
    assert leftover.exists()
    write_text_atomically(second, "second again\n")
    assert not leftover.exists()

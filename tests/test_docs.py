"""The documents users follow: links land on a heading, the CI example is YAML, the test command is CI's."""
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "bench/RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set:
    text = FENCE.sub("", document.read_text())
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def local_links(document: Path):
    for target in LINK.findall(FENCE.sub("", document.read_text())):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_local_link_names_a_file_and_heading_that_exist(document):
    broken = []
    for target in local_links(document):
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not broken, broken


def test_github_anchor_follows_githubs_rule():
    assert github_anchor("vLLM v0.34.0 series (`patches/vllm/v0.34.0/`)") == "vllm-v0340-series-patchesvllmv0340"
    assert github_anchor("When a patch conflicts") == "when-a-patch-conflicts"


def readme_block(after_heading: str, language: str) -> str:
    section = (ROOT / "README.md").read_text().split(after_heading, 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_readme_ci_example_is_a_workflow_yaml_loads():
    workflow = yaml.safe_load(readme_block("## CI example (GitHub Actions)", "yaml"))
    steps = workflow["jobs"]["patch-and-verify"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    assert "bash .ci/run" in " ".join(runs)
    cache = next(step for step in steps if step.get("uses", "").startswith("actions/cache"))
    assert cache["with"]["key"].startswith("dspark-${{ hashFiles(")


def test_readme_test_command_is_the_one_ci_runs():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("python -m pytest")
    assert ci_command in (ROOT / "README.md").read_text().splitlines()

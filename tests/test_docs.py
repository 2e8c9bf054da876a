"""The README and the documentation site (mkdocs.yml, docs/). The README stays a first-ten-minutes
page whose test command is exactly what CI runs and whose links resolve; the reference pages the
site generates from the code (docs/hooks/generated.py) cover every CLI command and every config key.
`.ci/run` builds the site itself with `mkdocs build --strict` (links, anchors, the API reference)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def generated():
    spec = importlib.util.spec_from_file_location("docs_generated", REPO / "docs" / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def block_after(text: str, lead: str) -> str:
    m = re.search(re.escape(lead) + r"\s*```\w*\n(.*?)\n```", text, flags=re.S)
    assert m, f"README.md lacks a code block after {lead!r}"
    return m.group(1).strip()


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"https?://", t)]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (REPO / t.split("#")[0]).is_file()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_readme_test_command_is_what_ci_runs():
    """Each step of the README's "Set up and run the tests" command is a line of .ci/run (which adds
    -q to pip), in the same order, and the tests run last."""
    steps = [s.strip() for s in block_after(README.read_text(), "Set up and run the tests:").split("&&")]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    expected = [s.replace("pip install ", "pip install -q ", 1) if s.startswith("pip install ") else s for s in steps]
    where = [ci.index(s) if s in ci else None for s in expected]
    assert None not in where, [s for s, w in zip(expected, where) if w is None]
    assert where == sorted(where) and steps[-1].startswith("python -m pytest ")


def test_the_cli_page_has_every_command():
    gen = generated()
    page = gen.cli_markdown()
    top = subprocess.run([sys.executable, "-m", "affectlens.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    commands = re.search(r"\{([\w,-]+)\}", top).group(1).split(",")
    assert {"inspect", "watermark", "steer", "tts", "concept", "ui"} <= set(commands)
    for name in commands:
        assert f"`affectlens {name}`" in page and f"$ affectlens {name} --help\nusage: affectlens {name}" in page
    assert "#### `affectlens watermark check`" in page  # a nested subcommand, one level deeper
    assert "--hear-site" in page and page.count("```text") == len(list(gen._commands(gen.cli_parser())))


def test_the_configuration_page_has_every_schema_key():
    gen = generated()
    page = gen.config_markdown()
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

    def count(node) -> int:  # every entry of every `properties` anywhere below a section
        if isinstance(node, dict):
            return len(node.get("properties", {})) + sum(count(v) for v in node.values())
        if isinstance(node, list):
            return sum(count(v) for v in node)
        return 0

    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(count(section) for section in schema["properties"].values())
    for section in schema["properties"]:
        assert f"## `{section}`" in page
    assert "| `probe.n_permutations` | integer | `99` |" in page
    assert "| `datasets.<name>.folder.root` |" in page and "| `models.<name>.steer_site` |" in page


@pytest.mark.parametrize("marker", ["<!-- generated: cli -->", "<!-- generated: config -->"])
def test_each_generated_page_carries_its_marker(marker):
    pages = [p for p in (REPO / "docs").rglob("*.md") if marker in p.read_text()]
    assert len(pages) == 1, pages
    assert marker not in generated().on_page_markdown(pages[0].read_text(), None, None, None)

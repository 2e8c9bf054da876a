"""The package's layering (pyproject's [tool.importlinter] contract) holds: no module imports a layer
above its own, so a new import cycle between packages fails here rather than at someone's import."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_layers_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (the `test` extra pins it)")
    run = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "1 kept, 0 broken" in run.stdout


def test_every_top_level_module_has_a_layer():
    """A new module or package of affectlens must be placed in the contract, or nothing checks it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    layers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip().removeprefix("affectlens.") for layer in layers for m in layer.split("|")}
    src = REPO / "src" / "affectlens"
    present = {p.stem for p in src.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in src.iterdir() if (p / "__init__.py").exists()}
    assert present == named

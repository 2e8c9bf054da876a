"""The per-stage conda environments: each envs/*.yaml parses as a conda environment whose every
dependency is pinned exactly, and the pins agree with the package's own dependency ranges, with
each other and with the rules that name the files."""

import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
CONDA_TO_PYPI = {"pytorch": "torch", "pysoundfile": "soundfile", "soxr-python": "soxr", "matplotlib-base": "matplotlib"}
CONDA_PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)=(?P<version>[0-9][A-Za-z0-9_.+\-]*)")  # name=version


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements() -> dict[str, Requirement]:
    p = project()
    deps = p["dependencies"] + [d for extra in p["optional-dependencies"].values() for d in extra]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def parse_env(path: Path) -> dict[str, tuple[str, str]]:
    """The pins of a conda environment file, {PyPI name: (version, 'conda' or 'pip')}; fails on
    anything that is not an exact pin (a bare name, a range, a pip entry without a pip line), a
    package listed twice, or a file that is not a conda environment."""
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict) and set(env) <= {"name", "channels", "dependencies"}, f"{path.name}: {env!r}"
    assert env["channels"] == ["conda-forge", "nodefaults"], f"{path.name}: channels {env['channels']}"
    deps = env["dependencies"]
    assert isinstance(deps, list) and deps, f"{path.name}: no dependencies"
    pins: dict[str, tuple[str, str]] = {}

    def add(name: str, version: str, via: str) -> None:
        assert name not in pins, f"{path.name} lists {name} twice"
        pins[name] = (version, via)

    pip_lists = [d["pip"] for d in deps if isinstance(d, dict)]
    assert all(set(d) == {"pip"} for d in deps if isinstance(d, dict)), f"{path.name}: a mapping other than pip:"
    assert len(pip_lists) <= 1 and (len(pip_lists) == 1) == ("pip" in deps), \
        f"{path.name}: pip packages need `pip` itself among the conda dependencies, and one pip: list"
    for dep in deps:
        if isinstance(dep, dict) or dep == "pip":
            continue
        m = CONDA_PIN.fullmatch(str(dep))
        assert m, f"{path.name}: {dep!r} is not pinned as name=version"
        add(CONDA_TO_PYPI.get(m["name"], m["name"]).lower(), m["version"], "conda")
    for entry in (pip_lists[0] if pip_lists else []):
        req = Requirement(entry)
        (spec,) = list(req.specifier) or [None]
        assert spec is not None and spec.operator == "==" and not req.extras and req.marker is None, \
            f"{path.name}: pip entry {entry!r} is not pinned as name==version"
        add(req.name.lower(), spec.version, "pip")
    return pins


def rule_directives(smk: Path) -> dict[str, dict[str, str]]:
    """{rule: {directive: its first value line}} of a rules file: the blocks under `rule NAME:` /
    `checkpoint NAME:`, their directives at the block's indentation, comments skipped."""
    rules: dict[str, dict[str, str]] = {}
    current, indent, pending = None, None, None
    for raw in smk.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip() if raw.lstrip().startswith("#") else raw.rstrip()
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        head = re.fullmatch(r"(?:rule|checkpoint)\s+(\w+)\s*:", line)
        if head:
            current, indent, pending = head[1], None, None
            rules[current] = {}
            continue
        if depth == 0:
            current = None
            continue
        if current is None:
            continue
        indent = depth if indent is None else indent
        if depth == indent:
            m = re.fullmatch(r"\s*(\w+):\s*(.*)", line)
            assert m, f"{smk.name}: rule {current}: cannot read {raw!r}"
            pending = m[1]
            rules[current][pending] = m[2]
        elif pending is not None and not rules[current][pending]:
            rules[current][pending] = line.strip()
    return rules


RULES = {(smk.name, rule): d for smk in sorted((REPO / "workflow/rules").glob("*.smk"))
         for rule, d in rule_directives(smk).items()}


@pytest.mark.parametrize("path", ENVS, ids=[p.stem for p in ENVS])
def test_env_pins_satisfy_pyproject(path):
    reqs, pins = requirements(), parse_env(path)
    assert {"python", "numpy", "pandas", "pyyaml"} <= set(pins), f"{path.name} lacks the base every stage imports"
    python, _ = pins.pop("python")
    assert Version(python) in SpecifierSet(project()["requires-python"]), f"{path.name}: python={python}"
    for name, (version, via) in pins.items():
        assert name in reqs, f"{path.name} pins {name} ({via}), which pyproject.toml does not depend on"
        assert Version(version) in reqs[name].specifier, f"{path.name}: {name}={version} violates {reqs[name]}"


def test_envs_pin_each_package_to_one_version_from_one_source():
    seen: dict[str, tuple[tuple[str, str], str]] = {}
    for path in ENVS:
        for name, pin in parse_env(path).items():
            first = seen.setdefault(name, (pin, path.name))
            assert first[0] == pin, f"{name}: {pin} in {path.name} but {first[0]} in {first[1]}"


def test_the_env_parser_refuses_what_is_not_an_exact_pin(tmp_path):
    head = "channels: [conda-forge, nodefaults]\ndependencies:\n  - python=3.11\n"
    for body, why in [("  - numpy\n", "not pinned"), ("  - numpy>=2\n", "not pinned"),
                      ("  - pip:\n      - av==18.1.0\n", "pip packages need"),
                      ("  - pip\n  - pip:\n      - av>=18\n", "not pinned"),
                      ("  - numpy=2.4.6\n  - numpy=2.4.6\n", "twice")]:
        (tmp_path / "env.yaml").write_text(head + body)
        with pytest.raises(AssertionError, match=why):
            parse_env(tmp_path / "env.yaml")
    (tmp_path / "env.yaml").write_text(head + "  - pytorch=2.13.0\n  - pip\n  - pip:\n      - av==18.1.0\n")
    assert parse_env(tmp_path / "env.yaml") == {"python": ("3.11", "conda"), "torch": ("2.13.0", "conda"),
                                                "av": ("18.1.0", "pip")}


def test_every_rule_with_a_script_names_an_existing_env():
    assert RULES, "no rules read from workflow/rules/*.smk"
    for (smk, rule), directives in RULES.items():
        if "script" not in directives:
            continue
        assert "conda" in directives, f"{smk}: rule {rule} runs a script without a conda env"
        literal = re.match(r"""\s*(["'])(?P<path>[^"']+)\1""", directives["conda"])
        assert literal, f"{smk}: rule {rule}: conda is {directives['conda']!r}, not a path"
        env = (REPO / "workflow/rules" / literal["path"]).resolve()
        assert env in ENVS, f"{smk}: rule {rule} names {literal['path']}, not a file of envs/"
        parse_env(env)


def test_every_env_is_named_by_a_rule():
    named = {(REPO / "workflow/rules" / m["path"]).resolve()
             for directives in RULES.values() if "conda" in directives
             for m in [re.match(r"""\s*(["'])(?P<path>[^"']+)\1""", directives["conda"])] if m}
    unused = [e.name for e in ENVS if e.resolve() not in named]
    assert not unused, f"envs/ files no rule names (dead; delete them or name them in a rule): {unused}"


def test_every_rule_writes_under_a_folder_named_as_the_rule():
    """The catalog's convention: rule X writes results/X/... (and logs/X/... or logs/X.log), so a
    path names the rule that made it; `all` writes nothing."""
    for (smk, rule), directives in RULES.items():
        if rule == "all":
            continue
        written = re.findall(r"""["'](results|logs)/([^/"'{]+)""", directives.get("output", "") + directives.get("log", ""))
        assert written, f"{smk}: rule {rule} declares no output under results/"
        wrong = sorted({f"{root}/{folder}" for root, folder in written if folder.removesuffix(".log") != rule})
        assert not wrong, f"{smk}: rule {rule} writes under {wrong}, not results/{rule}/ (logs/{rule}/)"

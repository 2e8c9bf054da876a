"""mkdocs hooks: the reference pages written from what they document, so they cannot drift from it.

A page line `<!-- generated: cli -->` becomes the help of `affectlens` and of every subcommand
(nested ones included), exactly as `affectlens ... --help` prints it at 100 columns; a line
`<!-- generated: config -->` becomes every key of the config schema
(`workflow/schemas/config.schema.yaml`) with its type, default and description.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


class _Parser(Exception):
    """Carries the parser `affectlens.cli.main` builds out of it, before anything is parsed."""


def cli_parser() -> argparse.ArgumentParser:
    from affectlens import cli

    parse_args = argparse.ArgumentParser.parse_args

    def grab(self, *args, **kwargs):
        raise _Parser(self)

    argparse.ArgumentParser.parse_args = grab
    try:
        cli.main([])
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = parse_args
    raise RuntimeError("affectlens.cli.main returned without parsing its arguments")


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*words, name))


def cli_markdown() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it
    try:
        parts = []
        for words, parser in _commands(cli_parser()):
            title = " ".join(("affectlens", *words))
            level = "#" * min(2 + len(words), 4)
            parts.append(f"{level} `{title}`\n\n```text\n$ {title} --help\n{parser.format_help().rstrip()}\n```\n")
        return "\n".join(parts)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(spec: dict) -> str:
    if "enum" in spec:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in spec["enum"])
    t = spec.get("type", "")
    if "oneOf" in spec:
        t = " or ".join(_type(s) for s in spec["oneOf"])
    return " or ".join(t) if isinstance(t, list) else t


def _keys(spec: dict, path: str):
    """(dotted key, spec) of every documented key under `spec`; maps of user-named entries
    (datasets, models, concepts ...) as `<name>`."""
    for key, sub in spec.get("properties", {}).items():
        here = f"{path}.{key}" if path else key
        yield here, sub
        yield from _keys(sub, here)
        if isinstance(sub.get("additionalProperties"), dict):
            yield from _keys(sub["additionalProperties"], f"{here}.<name>")
        if isinstance(sub.get("items"), dict):
            yield from _keys(sub["items"], f"{here}[]")


def config_markdown() -> str:
    schema = yaml.safe_load(SCHEMA.read_text())
    parts = []
    for section, spec in schema["properties"].items():
        rows = ["| key | type | default | description |", "|---|---|---|---|"]
        for key, sub in _keys(spec, "") if "properties" in spec else ():
            default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
            rows.append(f"| `{section}.{key}` | {_type(sub)} | {_cell(default)} | {_cell(sub.get('description', ''))} |")
        entries = spec.get("additionalProperties")
        if isinstance(entries, dict) and "properties" in entries:
            for key, sub in _keys(entries, ""):
                default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
                rows.append(f"| `{section}.<name>.{key}` | {_type(sub)} | {_cell(default)} | "
                            f"{_cell(sub.get('description', ''))} |")
        parts.append(f"## `{section}`\n\n{_cell(spec.get('description', ''))}\n")
        if len(rows) > 2:
            parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


GENERATORS = {"<!-- generated: cli -->": cli_markdown, "<!-- generated: config -->": config_markdown}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, make in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown

"""MkDocs hook: the CLI reference page, generated from the real argparse parsers at build time.

    hooks: [docs/hooks/cli_reference.py]      (mkdocs.yml)

docs/cli.md holds the marker below; this hook replaces it with `analysis-daemon --help` and the help of
every subcommand in analysis_daemon.cli.SUBCOMMANDS, so the reference cannot drift from the code
(tests/test_docs.py checks every long option appears). Nothing here is written to disk.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"
WIDTH = "100"  # argparse wraps at $COLUMNS: fixed, so the page does not depend on the terminal


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command line, parser) for `analysis-daemon` and each of its subcommands, in table order."""
    from analysis_daemon.cli import SUBCOMMANDS, build_parser, subcommand_parser

    return [("analysis-daemon", build_parser())] + [
        (f"analysis-daemon {name}", subcommand_parser(name)) for name in SUBCOMMANDS]


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option string of a parser (--help included)."""
    return [o for action in parser._actions for o in action.option_strings if o.startswith("--")]


def reference_markdown() -> str:
    """The generated part of docs/cli.md: one section per command, its --help verbatim."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        sections = []
        for command, parser in parsers():
            options = ", ".join(f"`{o}`" for o in long_options(parser) if o != "--help") or "none"
            sections.append(f"## `{command}`\n\nLong options: {options}.\n\n"
                            f"```text\n{parser.format_help().rstrip()}\n```\n")
        return "\n".join(sections)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the marker of the CLI page; a CLI page without it is an error, not an empty reference."""
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/cli.md must contain {MARKER} (where the generated reference goes)")
    return markdown.replace(MARKER, reference_markdown())

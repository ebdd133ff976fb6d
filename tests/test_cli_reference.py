"""docs/CLI.md is generated from --help; it must not drift from the commands."""

from pathlib import Path

from agentctl.reference import render

DOC = Path(__file__).parent.parent / "docs" / "CLI.md"


def test_cli_reference_matches_the_commands():
    assert DOC.read_text() == render(), "regenerate: python -m agentctl.reference > docs/CLI.md"

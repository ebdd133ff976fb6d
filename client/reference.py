"""The command reference (docs/CLI.md), generated from the commands' own --help.

`python -m agentctl.reference > docs/CLI.md` regenerates it; a test fails when it drifts.
"""

from __future__ import annotations

import click

from agentctl.cli import cli

HEADER = """# agentctl command reference

Generated from `--help` by `python -m agentctl.reference > docs/CLI.md`; a test keeps it
in step with the code. Every command takes the global options of `agentctl` before its
name, e.g. `agentctl --json status`.
"""


def _walk(command: click.Command, path: list[str], parent: click.Context | None):
    # The command's own context settings (the group's `-h, --help`; subcommands inherit them
    # from their parent context), as when a user runs it.
    settings = {"terminal_width": 100, "max_content_width": 100, **command.context_settings}
    ctx = click.Context(command, info_name=path[-1], parent=parent, **settings)
    yield path, command.get_help(ctx)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _walk(sub, path + [name], ctx)


def render() -> str:
    parts = [HEADER]
    for path, help_text in _walk(cli, ["agentctl"], None):
        parts.append(f"\n## `{' '.join(path)}`\n\n```\n{help_text.rstrip()}\n```\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")

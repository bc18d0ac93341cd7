"""The one error style of every cake command: `error: WHAT; the fix` on one line, exit 2 for usage."""

from __future__ import annotations

import sys

import click


class Command(click.Command):
    """A click command whose usage errors read like cake's other errors (click's own `Error:` comes with a
    usage block), each naming `--help` for the rest."""

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:  # raised outside a context by some click versions
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            name = prog_name or self.name  # the installed command's name, also under `python -m`
            click.echo(f"error: {e.format_message()} (see {name} --help)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

"""The `actwh` program (`main`); its commands are in cli/main.py."""

from __future__ import annotations


def main() -> None:
    """Run `actwh`. An interrupt while the commands' modules load ends the program as one during
    a command does: "Error: interrupted" on one line, exit status 130, no traceback."""
    import sys

    try:
        from actwh.cli.main import cli
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(130) from None
    cli()

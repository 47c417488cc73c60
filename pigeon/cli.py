"""The `pigeon` command line: thin typer commands over plain functions.

Each command lives in a `pigeon.commands.<name>` module with a `register(app)` function, so that
`pigeon build-cells` does not pay for importing torch. User errors (`UserError`) print one line
and exit with code 2; nothing else is caught.
"""

from __future__ import annotations

import importlib
import sys

import typer

from .core.errors import FieldError, UserError

app = typer.Typer(
    name="pigeon",
    help="Tell where on Earth a photo was taken, from its pixels alone (after PIGEON/PIGEOTTO, CVPR 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, in the order `pigeon --help` lists them.
COMMANDS = [
    "pigeon.commands.cells",
    "pigeon.commands.pretrain",
    "pigeon.commands.embed",
    "pigeon.commands.train",
    "pigeon.commands.world",
    "pigeon.commands.build_index",
    "pigeon.commands.locate",
    "pigeon.commands.evaluate",
    "pigeon.commands.serve",
    "pigeon.commands.verify",
]

for _mod in COMMANDS:
    importlib.import_module(_mod).register(app)


# options whose flag is not the field's name with dashes (`max_refinement_km` -> `--max-refinement-km`)
FLAG_OF_FIELD = {"mode": "--refine"}


def flag_of(field: str) -> str:
    """The command-line flag that sets a `FieldError`'s field."""
    return FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning `UserError` into one line on stderr and exit code 2
    (a `FieldError` names the flag that set the field)."""
    try:
        app(args=argv, prog_name="pigeon")
    except FieldError as e:
        print(f"pigeon: error: {e.renamed(flag_of(e.field))}", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"pigeon: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("pigeon: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()

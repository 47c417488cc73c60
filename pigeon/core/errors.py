"""The one exception type for bad input anywhere in pigeon.

A `UserError` carries a one-line message that names the input at fault and the fix. The CLI
prints it without a traceback and exits with code 2; the API answers it with a 4xx JSON error.
It lives in `geocells` (the bottom layer) so that every package can raise it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from a user: a file, a column, a value, a flag. The message says what and how to fix."""


class FieldError(UserError):
    """A bad value of a named option (`field`, as the dataclass or function below the CLI calls it).

    The layers that take the value from a user map the field to what the user typed: the CLI to its
    flag (`--refine`), the service settings to the flag and environment variable, so the lower layers
    never name either."""

    def __init__(self, field: str, value: object, why: str):
        super().__init__(f"{field} {value}: {why}")
        self.field, self.value, self.why = field, value, why

    def renamed(self, name: str, also: str | None = None) -> UserError:
        """The same error naming the option as `name` (e.g. a flag), with `also` in brackets."""
        return UserError(f"{name} {self.value}{f' ({also})' if also else ''}: {self.why}")

"""The one exception type for bad input anywhere in pigeon.

A `UserError` carries a one-line message that names the input at fault and the fix. The CLI
prints it without a traceback and exits with code 2; the API answers it with a 4xx JSON error.
It lives in `geocells` (the bottom layer) so that every package can raise it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from a user: a file, a column, a value, a flag. The message says what and how to fix."""

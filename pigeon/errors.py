"""pigeon's user-facing error (re-exported from geocells, the bottom layer, so every package shares it)."""

from geocells.errors import UserError

__all__ = ["UserError"]

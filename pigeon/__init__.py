"""pigeon: photo geolocation from pixels alone (PIGEON/PIGEOTTO as installable software)."""

from .bundle import Bundle
from .errors import UserError

__all__ = ["Bundle", "UserError"]

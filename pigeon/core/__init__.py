"""The small core every layer may import: the user-facing error, atomic writes, maths on the sphere.

It imports nothing of pigeon's, so `pigeon.geocells` and `pigeon.index` (the bottom layers) can use it.
"""

from .errors import UserError
from .io import atomic_path

__all__ = ["UserError", "atomic_path"]

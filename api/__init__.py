"""pigeon's HTTP service: `create_app(bundle_or_predictor, settings)` builds the FastAPI app."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]

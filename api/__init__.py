"""pigeon's HTTP service: `create_app(bundle_or_predictor, settings)` builds the FastAPI app."""

from .app import Settings, create_app

__all__ = ["Settings", "create_app"]

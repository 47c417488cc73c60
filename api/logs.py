"""Structured logs: JSON lines on stderr for the `pigeon.api` loggers (one access line per request)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("pigeon.api")
access_log = logging.getLogger("pigeon.api.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access-log lines (already JSON) pass through unchanged."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.name == access_log.name and msg.startswith("{"):
            return msg
        d = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "message": msg}
        if record.exc_info:
            d["exception"] = self.formatException(record.exc_info)
        return json.dumps(d)


def configure_logging(level: int = logging.INFO) -> None:
    """Structured (JSON lines) logs on stderr for the `pigeon.api` loggers."""
    root = logging.getLogger("pigeon.api")
    if not any(getattr(h, "_pigeon_json", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(JsonFormatter())
        h._pigeon_json = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    root.propagate = False

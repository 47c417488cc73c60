"""Shared test setup: offline, seeded, few threads (the CI machine has 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Embeddings that commands compute for themselves go to one cache folder per test session, never
# into the user's ~/.cache (and a stale cache from another checkout can never answer a test).
if "PIGEON_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["PIGEON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pigeon-test-cache-")

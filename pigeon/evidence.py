"""An answer's evidence: the gallery photos that decided its refinement, for a reader to check.

Asked with `AnswerOptions(evidence=True)` (`evidence=true` in the API, `pigeon locate --evidence`), each answer
gets `evidence`, one entry per refinement neighbour (`RefineResult`: best first, so similarity descending):
its gallery `key` (`pigeon.index.gallery_keys`: the photo's key in its data source) and `id`, `lat`/`lon`,
`similarity` (cosine of the embeddings), `distance_km` (great circle to the answer point) and `cell`, plus
`url`, `source`, `license`, `author` when its data source gave them (`pigeon.core.provenance`).

The list is empty when no gallery photo decided the answer: a bundle without a gallery, refinement off
(`none`, answered `cell`), the `cluster` mode (a cluster's centre, no photo), or the guard's fallback to
the top cell's centre (the answer's `refinement.mode` is then `cell`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .core.sphere import haversine_km
from .index import GalleryRefiner, RefineResult


def evidence_lists(gallery: GalleryRefiner | None, r: RefineResult, lat: np.ndarray, lon: np.ndarray) -> list[list[dict[str, Any]]]:
    """Each answer's evidence entries (see the module), for answers at (`lat`, `lon`) refined as `r`."""
    ids = r.neighbour_ids
    if gallery is None or not ids.shape[1] or not (ids >= 0).any():
        return [[] for _ in range(len(r.lat))]
    cols = gallery.neighbour_columns(r)
    km = haversine_km(cols["lat"], cols["lon"], np.asarray(lat, np.float64)[:, None], np.asarray(lon, np.float64)[:, None])
    source = gallery.source_columns
    out = []
    for i in range(len(ids)):  # formatting only: a few small dicts per answer
        entries = []
        for j in np.flatnonzero(ids[i] >= 0):
            e = {"key": str(cols["key"][i, j]), "id": int(ids[i, j]), "lat": float(cols["lat"][i, j]), "lon": float(cols["lon"][i, j]),
                 "similarity": float(r.neighbour_sims[i, j]), "distance_km": float(km[i, j]), "cell": int(cols["cell"][i, j])}
            e.update((c, cols[c][i, j]) for c in source if cols[c][i, j] is not None)
            entries.append(e)
        out.append(entries)
    return out


__all__ = ["evidence_lists"]

"""Several views of one place: which photos are one place, and how their answers combine.

The one owner of the rules that `train` (views of a place share a split; the combination is chosen
on val places), `evaluate --group-by`, `pigeon locate --same-place/--group-by` and the service's
`same_place` / `place` requests follow; `Predictor.predict_places` applies them.

Policy for a photo without a place label (empty, NaN, "nan", "None", "<NA>"): it is a place of its
own, labelled `<row N>` by its position. No photo is dropped or refused for a missing label; a
photo that nobody grouped answers alone, as it would without grouping.

How views combine (`COMBINE_MODES`):
  mean:    PIGEON's: the mean of the views' L2-normalised embeddings, renormalised, goes through the head
  product: the views as independent evidence: sum of each view's log cell probabilities, renormalised
  both:    the geometric mean of those two: (log mean-probs + sum of view log probs) / 2, renormalised
           (with one view every mode gives `locate`'s answer)
Refinement always uses the mean embedding (the one vector that stands for the place). A bundle
records the mode `train` chose on val places (`combine_mode` in the head's record); `resolve_combine`
is where a caller's choice, that record and PIGEON's default meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from .core.errors import UserError
from .core.sphere import from_xyz, to_xyz

COMBINE_MODES = ("mean", "product", "both")
DEFAULT_COMBINE = "mean"   # PIGEON's
AUTO_COLUMN = "location_id"   # `--group-by auto` reads this column when the photos have it
_MISSING_TEXT = ("", "nan", "None", "<NA>")


def missing_places(labels: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
    """(n,) bool: rows with no place label (embedding stores keep labels as text: a missing one reads "nan" or "None")."""
    s = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels, dtype=object))
    return (s.isna() | s.astype(str).str.strip().isin(_MISSING_TEXT)).to_numpy()


def place_labels(labels: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
    """Each row's place label as text; a row without one is a place of its own (`<row N>`; the policy above)."""
    s = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels, dtype=object))
    out = s.astype(str).to_numpy(dtype=object)
    missing = missing_places(s)
    out[missing] = np.array([f"<row {i}>" for i in np.flatnonzero(missing)], dtype=object)
    return out


def group_column(columns: Sequence[str], group_by: str | None, where: str) -> str | None:
    """The place column `group_by` names: "auto" is `location_id` when the data has it (else no
    grouping), "none"/""/None is no grouping; a named column the data lacks is refused by name."""
    if group_by in (None, "", "none"):
        return None
    if group_by == "auto":
        return AUTO_COLUMN if AUTO_COLUMN in columns else None
    if group_by not in columns:
        have = ", ".join(str(c) for c in list(columns)[:12] if c != "pos")
        raise UserError(f"--group-by {group_by}: {where} has no column {group_by!r} (it has: {have}); "
                        f"name one of its columns, or drop --group-by")
    return group_by


def place_codes(groups: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code per view, sorted place labels): views with the same label are one place."""
    labels, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes.ravel(), labels


def check_combine(combine: str, source: str = "combine") -> str:
    """`combine` when it is one of COMBINE_MODES, else a UserError naming it and the choices."""
    if combine not in COMBINE_MODES:
        raise UserError(f"{source} {combine!r}: unknown way to combine views; use one of {', '.join(COMBINE_MODES)}")
    return combine


def resolve_combine(combine: str | None, recorded: str | None) -> str:
    """The combination used: the caller's, else the one the bundle recorded, else PIGEON's mean."""
    return check_combine(combine or recorded or DEFAULT_COMBINE)


def place_sum(x: np.ndarray, codes: np.ndarray, n_places: int) -> np.ndarray:
    """(P, ...) sums of the rows of `x` per place, as one sparse matmul (no loop over places)."""
    m = sparse.csr_matrix((np.ones(len(codes), np.float64), (codes, np.arange(len(codes)))), shape=(n_places, len(codes)))
    return np.asarray(m @ x)


def place_truths(lat: np.ndarray, lon: np.ndarray, codes: np.ndarray, n_places: int) -> tuple[np.ndarray, np.ndarray]:
    """Each place's position: the spherical mean of its views' positions (views of a place share one)."""
    xyz = place_sum(to_xyz(np.asarray(lat, np.float64), np.asarray(lon, np.float64)), codes, n_places)
    return from_xyz(xyz / np.linalg.norm(xyz, axis=1, keepdims=True))


def mean_view_embeddings(emb: np.ndarray, codes: np.ndarray, n_places: int) -> np.ndarray:
    """PIGEON's view combination: per place, the mean of its views' L2-normalised embeddings, renormalised."""
    e = np.asarray(emb, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    m = place_sum(e, codes, n_places)
    return (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _renormalise_logs(logp: np.ndarray) -> np.ndarray:
    """Rows of log probabilities -> probabilities summing to 1 (a stable softmax)."""
    z = np.exp(logp - logp.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def combine_place_probs(view_probs: np.ndarray | None, mean_probs: np.ndarray, codes: np.ndarray, combine: str) -> np.ndarray:
    """(P, C) cell probabilities per place under `combine` (see COMBINE_MODES) from each view's (n, C)
    probabilities (unused by mean) and the (P, C) probabilities of the places' mean embeddings."""
    if combine == "mean":
        return np.asarray(mean_probs, np.float32)
    logp = place_sum(np.log(np.maximum(view_probs.astype(np.float64), 1e-30)), codes, len(mean_probs))
    if combine == "both":
        logp = 0.5 * (logp + np.log(np.maximum(mean_probs.astype(np.float64), 1e-30)))
    return _renormalise_logs(logp)


@dataclass
class PlacePrediction:
    """One answer per place: `arrays` as `Predictor.predict_embeddings` gives them (one row per place),
    the sorted place `labels`, the `views` per place, each view's place `codes`, the `combine` mode
    used and the places' `mean_embeddings` (what refinement and retrieval use)."""

    arrays: dict[str, Any]
    labels: np.ndarray
    views: np.ndarray
    codes: np.ndarray
    combine: str
    mean_embeddings: np.ndarray


__all__ = ["COMBINE_MODES", "DEFAULT_COMBINE", "PlacePrediction", "check_combine", "combine_place_probs", "group_column",
           "mean_view_embeddings", "missing_places", "place_codes", "place_labels", "place_sum", "place_truths", "resolve_combine"]

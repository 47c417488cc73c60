"""Synthetic captions for contrastive pretraining, after PIGEON (CVPR 2024).

From a photo's (lat, lon, taken_at, heading) and the geocells: the region and country of its cell
(the cell's label: the (country, admin-1) pair holding most of its training points, so the two always
agree, and photo captions and zero-shot cell prompts name the same place),
the nearest town (bundled GeoNames cities: `pigeon.towns`), the driving side of its cell,
the hemisphere, the month and the facing direction. A base sentence names the place; extras are
added with their probabilities, in random order. The wording and probabilities are data
(`pigeon/data/captions.json`), not code; the draws are seeded.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .core.errors import UserError
from .geocells import GeoCells
from .towns import nearest_towns

EXTRAS = ("driving_side", "facing", "month", "hemisphere", "climate")


def load_templates(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The caption templates: the bundled `captions.json`, or a JSON file of the same shape."""
    try:
        if path is None:
            return json.loads((resources.files("pigeon") / "data" / "captions.json").read_text())
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"caption templates {path or 'captions.json'} are unreadable ({e}); give a JSON file shaped like pigeon/data/captions.json") from e


def compass(heading: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Compass-point names for headings in degrees (NaN -> '')."""
    h = np.asarray(heading, dtype=np.float64)
    k = len(names)
    idx = np.round(np.nan_to_num(h, nan=0.0) % 360.0 / (360.0 / k)).astype(int) % k
    return np.where(np.isfinite(h), np.asarray(names, dtype=object)[idx], "")


class CaptionMaker:
    """Captions for points, from the cells (region, country, driving side) and bundled towns.

    `probabilities` overrides template probabilities by name (p_region, p_town, driving_side,
    facing, month, hemisphere), e.g. all 1.0 to state every fact."""

    def __init__(self, cells: "GeoCells", seed: int = 0, templates: dict[str, Any] | str | os.PathLike | None = None, probabilities: dict[str, float] | None = None):
        self.cells = cells
        self.seed = int(seed)
        self.templates = templates if isinstance(templates, dict) else load_templates(templates)
        self.p = {"p_region": float(self.templates["p_region"]), "p_town": float(self.templates["p_town"])}
        for name in EXTRAS:
            self.p[name] = float(self.templates["extras"][name]["p"]) if name in self.templates["extras"] else 0.0
        for k, v in (probabilities or {}).items():
            if k not in self.p:
                raise UserError(f"caption probability {k!r} is unknown; use one of {sorted(self.p)}")
            self.p[k] = float(v)
        self._rng = np.random.default_rng(self.seed)
        g = cells.gdf
        # the cells' labels (their majority (country, admin-1) pair): photo captions and cell prompts share them
        self._region = g["admin1"].fillna("").astype(str).to_numpy()
        self._country = g["country"].fillna("").astype(str).to_numpy()
        self._drive = g["driving_side"].fillna("unknown").astype(str).to_numpy()

    # -- facts -------------------------------------------------------------------------------
    def facts(self, lat, lon, taken_at=None, heading=None) -> pd.DataFrame:
        """One row of facts per point (vectorised): cell, region, country, town, town_km, driving_side,
        hemisphere, month, direction ('' where unknown)."""
        lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
        lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
        n = len(lat)
        cell = self.cells.cell_of(lat, lon)
        town, town_km = nearest_towns(lat, lon)
        if taken_at is None:
            month = np.full(n, "", dtype=object)
        else:
            t = pd.to_datetime(pd.Series(np.atleast_1d(np.asarray(taken_at, dtype=object)) if not isinstance(taken_at, pd.Series) else taken_at.to_numpy()), errors="coerce")
            m = t.dt.month.to_numpy()
            names = np.asarray(self.templates["months"], dtype=object)
            month = np.where(np.isfinite(m), names[np.nan_to_num(m, nan=1).astype(int) - 1], "")
        if heading is None:
            direction = np.full(n, "", dtype=object)
        else:
            direction = compass(np.broadcast_to(np.asarray(heading, dtype=np.float64), (n,)), self.templates["directions"])
        return pd.DataFrame({
            "cell": cell,
            "region": self._region[cell],
            "country": self._country[cell],
            "town": town,
            "town_km": town_km,
            "driving_side": self._drive[cell],
            "hemisphere": np.where(lat >= 0, "northern", "southern"),
            "climate": self._climate(lat),
            "month": month,
            "direction": direction,
        })

    def _climate(self, lat: np.ndarray) -> np.ndarray:
        """Latitude climate belt (a stand-in for PIGEON's Koeppen zone: no climate map is bundled)."""
        belts = {k: v for k, v in self.templates.get("climate_belts", {}).items() if not k.startswith("_")}
        if not belts:
            return np.full(len(lat), "", dtype=object)
        names = np.array(list(belts), dtype=object)
        edges = np.array(list(belts.values()), dtype=np.float64)
        return names[np.minimum(np.searchsorted(edges, np.abs(lat), side="left"), len(names) - 1)]

    # -- composing ---------------------------------------------------------------------------
    def compose(self, facts: pd.DataFrame, rng: np.random.Generator | None = None) -> list[str]:
        """Captions for rows of `facts`, with the random choices drawn from `rng` (vectorised draws)."""
        rng = self._rng if rng is None else rng
        n = len(facts)
        T = self.templates
        draws = rng.random((n, 2 + len(EXTRAS)))
        order = np.argsort(rng.random((n, len(EXTRAS))), axis=1)
        has_region = (facts["region"].to_numpy() != "") & (draws[:, 0] < self.p["p_region"])
        has_town = (facts["town_km"].to_numpy() <= float(T.get("max_town_km", 50.0))) & (draws[:, 1] < self.p["p_town"])
        has_country = facts["country"].to_numpy() != ""
        key = np.where(has_region & has_town, "town_region", np.where(has_region, "region", np.where(has_town, "town", "country")))
        key = np.where(has_country | (key != "country"), key, "nothing")
        ex = T["extras"]
        extra_text = {
            "driving_side": [ex["driving_side"].get(s, "") if "driving_side" in ex else "" for s in facts["driving_side"]],
            "facing": [ex["facing"]["text"].format(direction=d) if d and "facing" in ex else "" for d in facts["direction"]],
            "month": [ex["month"]["text"].format(month=m) if m and "month" in ex else "" for m in facts["month"]],
            "hemisphere": [ex["hemisphere"]["text"].format(hemisphere=h) if "hemisphere" in ex else "" for h in facts["hemisphere"]],
            "climate": [ex["climate"]["text"].format(climate=c) if c and "climate" in ex else "" for c in facts.get("climate", [""] * n)],
        }
        use = {name: draws[:, 2 + j] < self.p[name] for j, name in enumerate(EXTRAS)}
        out = []
        for i, row in enumerate(facts[["town", "region", "country"]].itertuples(index=False)):
            parts = [T["base"][key[i]].format(town=row.town, region=row.region, country=row.country)]
            for j in order[i]:
                name = EXTRAS[j]
                if use[name][i] and extra_text[name][i]:
                    parts.append(extra_text[name][i])
            out.append(" ".join(parts))
        return out

    def captions(self, lat, lon, taken_at=None, heading=None, epoch: int = 0, facts: pd.DataFrame | None = None) -> list[str]:
        """Captions for many points, reproducible from (seed, epoch): a fresh draw each epoch."""
        f = self.facts(lat, lon, taken_at, heading) if facts is None else facts
        return self.compose(f, np.random.default_rng([self.seed, int(epoch)]))

    def caption(self, lat: float, lon: float, taken_at=None, heading: float | None = None) -> str:
        """One caption; successive calls draw afresh from the maker's seeded generator."""
        f = self.facts([lat], [lon], None if taken_at is None else [taken_at], None if heading is None else [heading])
        return self.compose(f)[0]

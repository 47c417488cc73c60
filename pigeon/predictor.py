"""The Predictor: image(s) -> embeddings -> cell probabilities -> an answer with its uncertainty.

Everything after the backbone forward is vectorised over the batch and precomputed at load time
(cell unit vectors, cell->country and cell->admin-1 sparse matrices), so that serving costs little
more than the backbone itself. The answer point comes from `_answer_points`: PIGEON's refinement
over the bundle's gallery (`pigeon.index.GalleryRefiner`, options in a `RefineConfig` given to the
constructor), or the top cell's centre when the bundle has no gallery.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import sparse

from .area import AreaViews, mark_within
from .bundle import Bundle
from .calibration import RADIUS_LEVELS, RadiusModel, geometric_spread_km, mixture_radii
from .core.errors import UserError
from .core.sphere import to_xyz
from .datasets import load_image
from .evidence import evidence_lists
from .bundle_gallery import recorded_refine_mode
from .loading import RETRAIN, check_head, load_bundle
from .geocells import GeoCells
from .head import PrototypeHead
from .index import Gallery, GalleryRefiner, RefineConfig, RefineResult, centre_answers
from .metrics import regions_at
from .regions import CellRegions
from .places import (COMBINE_MODES, PlacePrediction, check_combine, combine_place_probs, mean_view_embeddings, place_codes,
                     place_labels, resolve_combine)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
def _group_matrix(comp: Any, key_cols: Sequence[str], n_cells: int, labels: np.ndarray | None = None,
                  keep: np.ndarray | None = None) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Sparse (C, K) share of each cell's training points per group, rows summing to 1, and the K sorted
    group labels (`key_cols` joined by "\x1f"), from a `GeoCells.composition` table: probs (n, C) @ it
    splits the mass of a cell that straddles a border between the groups its points fell in.
    `labels`: the columns to use (an area's matrix keeps the bundle's); `keep`: bool per row, only those
    rows' shares (an area's groups; a cell with none kept is a row of zeros)."""
    keys = comp[key_cols[0]].str.cat([comp[c] for c in key_cols[1:]], sep="\x1f").to_numpy(str)
    if labels is None:
        labels, inv = np.unique(keys, return_inverse=True)
    else:
        inv = np.searchsorted(labels, keys)
    share = comp["share"].to_numpy(np.float64) if keep is None else comp["share"].to_numpy(np.float64) * keep
    m = sparse.csr_matrix((share, (comp["cell_id"].to_numpy(), inv.ravel())), shape=(n_cells, len(labels)))
    rows = np.asarray(m.sum(axis=1)).ravel()
    m = sparse.diags(1.0 / np.where(rows > 0, rows, 1.0)) @ m
    return sparse.csr_matrix(m, dtype=np.float32), labels


def recorded_combine_mode(bundle: Bundle | None) -> str | None:
    """The view combination recorded in the head's manifest record (`combine_mode`), None when none."""
    mode = bundle.meta("head").get("combine_mode") if bundle is not None else None
    return None if mode is None else check_combine(mode, f"bundle {bundle.path}: the head record's combine_mode")



@dataclass(frozen=True)
class AnswerOptions:
    """What an answer carries beyond the default one, asked by the caller (`evidence=true`, `--within`, ...):
    one object that every locate path (`Predictor.locate`, `locate_place`, `predict_*`/`format*`, the
    service, `pigeon locate`) passes along, so an option cannot reach one path and miss another.
    Every option is off by default, and an answer asked without them is the default answer, unchanged.

    evidence: list the gallery photos that decided the refinement (`pigeon.index` neighbours + their source columns).
    regions:  the 50% / 90% credible regions as polygons (the fewest cells holding that mass).
    within:   an area of interest the answer is restricted to (None: anywhere): a `pigeon.area.Area`
              (`parse_area`), or its text ("HR,SI", "US-CA", GeoJSON), parsed on use."""

    evidence: bool = False
    regions: bool = False
    within: Any = None


DEFAULT_OPTIONS = AnswerOptions()


class Predictor:
    """A loaded bundle ready to answer: `locate(images)` or, for embeddings, `predict_embeddings(emb)`."""

    def __init__(self, cells: GeoCells, head: PrototypeHead, backbone: Any, bundle: Bundle | None = None, device: str = "cpu",
                 refine: RefineConfig | None = None, gallery: Gallery | None = None):
        """`refine`: refinement options (mode None: the one `pigeon build-index` validated for the bundle,
        else PIGEON's cluster+nn); `gallery`: the loaded gallery to refine with (None: answers are cell centres)."""
        self.cells = cells
        self.head = head.eval()
        self.backbone = backbone
        self.bundle = bundle
        self.device = device
        self.refine = (refine or RefineConfig()).resolve(recorded_refine_mode(bundle))
        # how views of one place combine by default: the mode recorded for the bundle, else PIGEON's mean
        self.combine = resolve_combine(None, recorded_combine_mode(bundle))
        g = cells.gdf
        self.n_cells = len(g)
        why = check_head(head, backbone, self.n_cells)
        if why:
            raise UserError(f"{why}; {RETRAIN}")
        self.centres = np.asarray(cells.centres, dtype=np.float64)
        self.centres_xyz = to_xyz(self.centres[:, 0], self.centres[:, 1])
        self.gallery = GalleryRefiner(gallery, self.centres) if gallery is not None else None
        # Each cell's spread and the radii's calibration, from `pigeon train`; a head without them
        # (zero-shot) spreads each cell's photos evenly over a disk of its area, uncalibrated.
        self.radius_model = getattr(head, "radius", None) or RadiusModel(geometric_spread_km(cells.geoms, self.centres))
        self.cell_country = g["country"].fillna("").astype(str).to_numpy()
        self.cell_iso = g["iso_a2"].fillna("").astype(str).to_numpy()
        self.cell_admin1 = g["admin1"].fillna("").astype(str).to_numpy()
        # country and admin-1 probabilities from each cell's composition, not its one label
        self._country_m, self._country_keys = _group_matrix(cells.composition("country"), ["iso_a2", "country"], self.n_cells)
        self._admin_m, self._admin_keys = _group_matrix(cells.composition("admin1"), ["admin1", "country"], self.n_cells)
        # cells whose land was cut at the cells' reach limit (None: no limit recorded): see `reach` in `format`
        self._reach_km = cells.max_reach_km  # a column scan: once, not per answer
        self._edge = cells.at_reach_edge.astype(np.float64) if self._reach_km is not None else None
        # areas of interest (`options.within`): each area's view of the cells and gallery, built on first use
        self._areas = AreaViews(cells, self.gallery, self._area_matrices)
        self.regions = CellRegions(cells.geoms)  # the 50% / 90% credible regions (`options.regions`), unions cached

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | os.PathLike, device: str = "cpu", refine: RefineConfig | None = None,
                    precision: str | None = None) -> "Predictor":
        """Load cells, head, backbone and (when the bundle has one) the gallery, refusing parts that do
        not belong together. The gallery is loaded and checked here, at start-up, so a mismatched index
        refuses the bundle instead of failing the first request. `precision`: the backbone forwards'
        (auto/None: bf16 on CUDA, fp32 on CPU; `pigeon.backbones.precision`)."""
        parts = load_bundle(path, device=device, head="required", gallery=True, verify=True, precision=precision)
        if parts.gallery is None and refine is not None and refine.mode not in (None, "none"):
            raise UserError(f"--refine {refine.mode}: bundle {parts.bundle.path} has no gallery index to refine with; "
                            f"build one with `pigeon build-index`, or use --refine none")
        return cls(parts.cells, parts.head, parts.backbone, bundle=parts.bundle, device=device, refine=refine, gallery=parts.gallery)

    # -- array level -----------------------------------------------------------------------------------
    def cell_probs(self, emb: np.ndarray) -> np.ndarray:
        """(n, C) calibrated cell probabilities of (n, D) embeddings: the head's own maths (`PrototypeHead.cell_probs`)."""
        return self.head.cell_probs(emb)

    def _answer_points(self, emb: np.ndarray, probs: np.ndarray, gallery: GalleryRefiner | None = None) -> RefineResult:
        """The answer per image and what refinement did, as arrays: PIGEON's refinement over the gallery
        (`gallery`, else the bundle's) under `self.refine`, else (no gallery) the top cell's centre."""
        gallery = self.gallery if gallery is None else gallery
        if gallery is None:
            return centre_answers(probs, self.centres)
        return gallery.answer(emb, probs, self.refine)

    def _area_matrices(self, keep: np.ndarray) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
        """The country and admin-1 matrices over only the composition rows `keep` (an area's groups), same columns."""
        comp = self.cells.composition("admin1")
        return (_group_matrix(comp, ["iso_a2", "country"], self.n_cells, self._country_keys, keep)[0],
                _group_matrix(comp, ["admin1", "country"], self.n_cells, self._admin_keys, keep)[0])

    def predict_embeddings(self, emb: np.ndarray, top_k: int = 5, options: AnswerOptions | None = None) -> dict[str, np.ndarray | list]:
        """Batched answers for (n, D) embeddings, as arrays.

        Keys: probs (n, C), lat, lon, confidence (n,), radius_km_50, radius_km_90 (n,), top_cells
        (n, k) ids, top_probs (n, k), country_probs (n, K) over `country_keys`, admin1_probs
        (n, A) over `admin1_keys`, refinement (a `RefineResult`: arrays; `format` writes it out).
        """
        emb = self._checked(emb)
        return self._predict(emb, self.cell_probs(emb), top_k, options or DEFAULT_OPTIONS)

    def _checked(self, emb: np.ndarray) -> np.ndarray:
        """(n, D) float32 embeddings of the head's width, or a UserError naming the shape."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.head.embed_dim:
            raise UserError(f"embeddings must have shape (n, {self.head.embed_dim}), got {emb.shape}")
        return emb

    def _predict(self, emb: np.ndarray, probs: np.ndarray, top_k: int, options: AnswerOptions) -> dict[str, np.ndarray | list]:
        """`predict_embeddings`' arrays from embeddings and their (already computed or combined) cell probabilities.
        With `options.within` (an `Area`): probabilities, refinement, answer point and groups restricted to it."""
        view = self._areas.view(options.within) if options.within is not None else None
        if view is not None:
            probs = view.restrict(probs)
        ref = self._answer_points(emb, probs, view.gallery if view is not None else None)
        lat, lon = ref.lat, ref.lon
        if view is not None:
            lat, lon, moved = view.inside(lat, lon, ref.cell)
        k = min(top_k, self.n_cells)
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(probs, part, 1), axis=1)
        top = np.take_along_axis(part, order, 1)
        r50, r90 = self.radii(lat, lon, probs)
        country = np.asarray(probs @ (self._country_m if view is None else view.country_m))
        admin = np.asarray(probs @ (self._admin_m if view is None else view.admin_m))
        out = {
            "probs": probs, "lat": lat, "lon": lon, "confidence": probs.max(axis=1),
            "radius_km_50": r50, "radius_km_90": r90, "top_cells": top,
            "top_probs": np.take_along_axis(probs, top, 1), "country_probs": country, "admin1_probs": admin,
            "refinement": ref,
        }
        if view is not None:
            out["within"] = (view.area, moved)   # the area and how far each answer was moved into it
        return out

    def predict_places(self, emb: np.ndarray, groups: Sequence[Any] | np.ndarray, combine: str | None = None,
                       top_k: int = 5, options: AnswerOptions | None = None) -> PlacePrediction:
        """One answer per place for (n, D) view embeddings and each view's place label `groups` (n,;
        a missing label is a place of its own: `pigeon.places`).

        `combine`: one of COMBINE_MODES (None: `self.combine`, the bundle's recorded mode else "mean").
        Returns the answers' arrays (one row per place) with the labels, views per place and the mode
        used; refinement uses each place's mean embedding."""
        emb = self._checked(emb)
        if len(groups) != len(emb):
            raise UserError(f"{len(groups)} place labels for {len(emb)} views; give one place label per view")
        if len(emb) == 0:
            raise UserError("no views given; give at least one image of the place")
        mode = resolve_combine(combine, self.combine)
        codes, labels = place_codes(place_labels(groups))
        mean_emb = mean_view_embeddings(emb, codes, len(labels))
        mean_probs = self.cell_probs(mean_emb)
        view_probs = None if mode == "mean" else self.cell_probs(emb)
        probs = combine_place_probs(view_probs, mean_probs, codes, mode)
        return PlacePrediction(self._predict(mean_emb, probs, top_k, options or DEFAULT_OPTIONS), labels, np.bincount(codes, minlength=len(labels)),
                               codes, mode, mean_emb)

    def format_places(self, pp: PlacePrediction, top_k: int = 5, options: AnswerOptions | None = None) -> list[dict[str, Any]]:
        """`format`'s dicts, one per place, each with its `place` label, `views` and `combine`."""
        out = self.format(pp.arrays, top_k=top_k, options=options)
        for a, label, n in zip(out, pp.labels, pp.views):
            a.update(place=str(label), views=int(n), combine=pp.combine)
        return out

    def locate_place(self, images: Sequence[Any] | None = None, *, embeddings: np.ndarray | None = None,
                     combine: str | None = None, top_k: int = 5, options: AnswerOptions | None = None) -> dict[str, Any]:
        """One answer for several views of one place (PIL images or paths, or their (n, D) embeddings):
        `locate`'s dict plus `views` (how many were combined) and `combine` (how)."""
        if (images is None) == (embeddings is None):
            raise UserError("locate_place needs images or embeddings (one of them)")
        t0 = time.perf_counter()
        if images is not None:
            if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
                images = [images]
            if len(images) == 0:
                raise UserError("no views given; give at least one image of the place")
            embeddings = self.embed(images)
        t1 = time.perf_counter()
        pp = self.predict_places(embeddings, np.zeros(len(embeddings), dtype=np.int64), combine=combine, top_k=top_k, options=options)
        t2 = time.perf_counter()
        out = self.format_places(pp, top_k=top_k, options=options)[0]
        del out["place"]
        t3 = time.perf_counter()
        out["timings_ms"] = {"embed_ms": (t1 - t0) * 1e3, "head_ms": (t2 - t1) * 1e3, "format_ms": (t3 - t2) * 1e3, "total_ms": (t3 - t0) * 1e3}
        return out

    def radii(self, lat: np.ndarray, lon: np.ndarray, probs: np.ndarray, levels: Sequence[float] = RADIUS_LEVELS) -> tuple[np.ndarray, ...]:
        """Km from each answer within which the truth lies with each of `levels`' probability.

        The truth follows the mixture of the cells' spreads around their centres, weighted by the cell
        probabilities (`pigeon.calibration.mixture_radii`); each level's radius is then multiplied by
        its scale factor fitted on validation photos at `pigeon train` (1 when uncalibrated). Never 0:
        every cell spreads at least MIN_SPREAD_KM."""
        r = mixture_radii(to_xyz(lat, lon), probs, self.centres_xyz, self.radius_model.spread_km, levels)
        return tuple(r * self.radius_model.scale_at(levels)[:, None])

    # -- images --------------------------------------------------------------------------------------
    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """Embeddings of PIL images or image paths."""
        ims = [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
        return self.backbone.embed_images(ims)

    def locate(self, images: Sequence[Any], top_k: int = 5, options: AnswerOptions | None = None) -> list[dict[str, Any]]:
        """Answers for PIL images or paths: lat, lon, confidence, radii, top cells, countries, admin-1, refinement,
        the region at the answer point, the reach, timings."""
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        if len(images) == 0:
            return []
        t0 = time.perf_counter()
        ims = [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
        t1 = time.perf_counter()
        emb = self.backbone.embed_images(ims)
        t2 = time.perf_counter()
        p = self.predict_embeddings(emb, top_k=top_k, options=options)
        t3 = time.perf_counter()
        out = self.format(p, top_k=top_k, options=options)
        t4 = time.perf_counter()
        n = len(ims)
        timing = {"load_ms": (t1 - t0) * 1e3 / n, "embed_ms": (t2 - t1) * 1e3 / n, "head_ms": (t3 - t2) * 1e3 / n,
                  "format_ms": (t4 - t3) * 1e3 / n, "total_ms": (t4 - t0) * 1e3 / n}
        for o in out:
            o["timings_ms"] = dict(timing)
        return out

    def format(self, p: dict[str, Any], top_k: int = 5, options: AnswerOptions | None = None) -> list[dict[str, Any]]:
        """Turn `predict_embeddings` arrays into one JSON-ready dict per image (with what `options` asks)."""
        options = options or DEFAULT_OPTIONS
        n = len(p["lat"])
        k_c = min(top_k, len(self._country_keys))
        k_a = min(top_k, len(self._admin_keys))
        top_country = np.argsort(-p["country_probs"], axis=1)[:, :k_c]
        top_admin = np.argsort(-p["admin1_probs"], axis=1)[:, :k_a]
        here = regions_at(p["lat"], p["lon"])   # the admin-1 the answer point lies in (bundled Natural Earth)
        edge = p["probs"] @ self._edge if self._edge is not None else None
        refinement = self._refinement_dicts(p["refinement"])
        g = self.centres
        out = []
        for i in range(n):  # formatting only: k small dicts per image
            cells = [{
                "cell_id": int(c), "lat": float(g[c, 0]), "lon": float(g[c, 1]), "country": self.cell_country[c],
                "iso_a2": self.cell_iso[c], "admin1": self.cell_admin1[c], "probability": float(pr),
            } for c, pr in zip(p["top_cells"][i], p["top_probs"][i])]
            countries = []
            for j in top_country[i]:
                iso, name = self._country_keys[j].split("\x1f", 1)
                countries.append({"name": name, "iso_a2": iso, "probability": float(p["country_probs"][i, j])})
            admins = []
            for j in top_admin[i]:
                a1, cn = self._admin_keys[j].split("\x1f", 1)
                admins.append({"name": a1, "country": cn, "probability": float(p["admin1_probs"][i, j])})
            out.append({
                "lat": float(p["lat"][i]), "lon": float(p["lon"][i]), "confidence": float(p["confidence"][i]),
                "radius_km_50": float(p["radius_km_50"][i]), "radius_km_90": float(p["radius_km_90"][i]),
                "top_cells": cells, "countries": countries, "admin1": admins, "refinement": refinement[i],
                "region_at_answer": {"admin1": str(here["admin1"][i]), "country": str(here["country"][i]),
                                     "iso_a2": str(here["iso_a2"][i]), "at_sea": bool(here["at_sea"][i])},
                "reach": None if edge is None else {"max_reach_km": self._reach_km, "edge_probability": float(edge[i])},
            })
        if "within" in p:
            mark_within(out, *p["within"])
        if options.evidence:  # the gallery photos that decided each refinement (pigeon.evidence)
            for a, ev in zip(out, evidence_lists(self.gallery, p["refinement"], p["lat"], p["lon"])):
                a["evidence"] = ev
        if options.regions:  # from the answer's own probabilities: whatever shaped them shapes the regions
            area = p["within"][0] if "within" in p else None   # an area of interest also cuts the regions' land
            for a, r in zip(out, self.regions.answer_regions(p["probs"], p["lat"], p["lon"], area)):
                a["regions"] = r
        return out

    def _refinement_dicts(self, r: RefineResult) -> list[dict[str, Any]]:
        """What refinement did, per answer: mode ("cell" when the top cell's centre answered), moved_km,
        cluster, cell and the neighbours {id, similarity, lat, lon, image} it used."""
        ids = r.neighbour_ids
        if self.gallery is not None and ids.shape[1]:
            nb_lat, nb_lon, nb_img = self.gallery.neighbour_places(r)
        out = []
        for i in range(len(r.lat)):  # formatting only: a few small dicts per answer
            nbs = [{"id": int(ids[i, j]), "similarity": float(r.neighbour_sims[i, j]), "lat": float(nb_lat[i, j]),
                    "lon": float(nb_lon[i, j]), "image": str(nb_img[i, j])} for j in np.flatnonzero(ids[i] >= 0)]
            out.append({"mode": "cell" if r.mode[i] == "none" else str(r.mode[i]), "moved_km": float(r.moved_km[i]),
                        "cluster": int(r.cluster_id[i]), "cell": int(r.cell[i]), "neighbours": nbs})
        return out

    @property
    def country_keys(self) -> list[tuple[str, str]]:
        """(iso_a2, country name) of each column of `country_probs`."""
        return [tuple(k.split("\x1f", 1)) for k in self._country_keys]

    @property
    def admin1_keys(self) -> list[tuple[str, str]]:
        """(admin-1 name, country name) of each column of `admin1_probs`."""
        return [tuple(k.split("\x1f", 1)) for k in self._admin_keys]


def load(bundle: str | os.PathLike, device: str = "cpu", refine: RefineConfig | str | None = None) -> Predictor:
    """The one-line way in: a bundle folder -> a ready `Predictor` (every part checked on load).

    `refine`: a `RefineConfig`, or just a mode ("cluster+nn", "cluster", "nn", "none"); None uses the
    mode `pigeon build-index` validated for the bundle, else PIGEON's cluster+nn."""
    config = RefineConfig(mode=refine) if isinstance(refine, str) else refine
    return Predictor.from_bundle(bundle, device=device, refine=config)


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (folders searched recursively for image suffixes), sorted per folder."""
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); give image files or another folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p} does not exist; give image files or folders")
    return out


__all__ = ["AnswerOptions", "DEFAULT_OPTIONS", "Predictor", "load", "collect_images", "IMAGE_SUFFIXES", "COMBINE_MODES", "recorded_combine_mode"]

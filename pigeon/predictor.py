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
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from .backbones import backbone_from_bundle
from .bundle import Bundle
from .calibration import RADIUS_LEVELS, RadiusModel, geometric_spread_km, mixture_radii
from .core.errors import UserError
from .core.sphere import from_xyz, to_xyz
from .datasets import load_image
from .gallery import GALLERY_PARTS, load_gallery, recorded_refine_mode
from .geocells import GeoCells
from .head import PrototypeHead
from .index import Gallery, GalleryRefiner, RefineConfig, centre_answers
from .metrics import regions_at

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# How several views of one place become one answer (`Predictor.predict_places`):
#   mean:    PIGEON's: the mean of the views' L2-normalised embeddings, renormalised, goes through the head
#   product: the views as independent evidence: sum of each view's log cell probabilities, renormalised
#   both:    the geometric mean of those two: (log mean-probs + sum of view log probs) / 2, renormalised
#            (with one view every mode gives `locate`'s answer)
# Refinement always uses the mean embedding (the one vector that stands for the place).
COMBINE_MODES = ("mean", "product", "both")


def _group_matrix(comp: Any, key_cols: Sequence[str], n_cells: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Sparse (C, K) share of each cell's training points per group, rows summing to 1, and the K sorted
    group labels (`key_cols` joined by "\x1f"), from a `GeoCells.composition` table: probs (n, C) @ it
    splits the mass of a cell that straddles a border between the groups its points fell in."""
    keys = comp[key_cols[0]].str.cat([comp[c] for c in key_cols[1:]], sep="\x1f").to_numpy(str)
    labels, inv = np.unique(keys, return_inverse=True)
    m = sparse.csr_matrix((comp["share"].to_numpy(np.float64), (comp["cell_id"].to_numpy(), inv.ravel())), shape=(n_cells, len(labels)))
    m = sparse.diags(1.0 / np.asarray(m.sum(axis=1)).ravel()) @ m
    return sparse.csr_matrix(m, dtype=np.float32), labels


def place_codes(groups: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code per view, sorted place labels): views with the same label are one place."""
    labels, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes.ravel(), labels


def missing_places(labels: pd.Series) -> np.ndarray:
    """Which rows have no place label (embedding stores keep labels as text: a missing one reads "nan" or "None")."""
    return (labels.isna() | labels.astype(str).str.strip().isin(("", "nan", "None", "<NA>"))).to_numpy()


def place_truths(lat: np.ndarray, lon: np.ndarray, codes: np.ndarray, n_places: int) -> tuple[np.ndarray, np.ndarray]:
    """Each place's position: the spherical mean of its views' positions (views of a place share one)."""
    xyz = _place_sum(to_xyz(np.asarray(lat, np.float64), np.asarray(lon, np.float64)), codes, n_places)
    return from_xyz(xyz / np.linalg.norm(xyz, axis=1, keepdims=True))


def _place_sum(x: np.ndarray, codes: np.ndarray, n_places: int) -> np.ndarray:
    """(P, ...) sums of the rows of `x` per place, as one sparse matmul (no loop over places)."""
    m = sparse.csr_matrix((np.ones(len(codes), np.float64), (codes, np.arange(len(codes)))), shape=(n_places, len(codes)))
    return np.asarray(m @ x)


def mean_view_embeddings(emb: np.ndarray, codes: np.ndarray, n_places: int) -> np.ndarray:
    """PIGEON's view combination: per place, the mean of its views' L2-normalised embeddings, renormalised."""
    e = np.asarray(emb, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    m = _place_sum(e, codes, n_places)
    return (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _renormalise_logs(logp: np.ndarray) -> np.ndarray:
    """Rows of log probabilities -> probabilities summing to 1 (a stable softmax)."""
    z = np.exp(logp - logp.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def combine_place_probs(view_probs: np.ndarray, mean_probs: np.ndarray, codes: np.ndarray, combine: str) -> np.ndarray:
    """(P, C) cell probabilities per place under `combine` (see COMBINE_MODES) from each view's (n, C)
    probabilities and the (P, C) probabilities of the places' mean embeddings."""
    if combine == "mean":
        return np.asarray(mean_probs, np.float32)
    logp = _place_sum(np.log(np.maximum(view_probs.astype(np.float64), 1e-30)), codes, len(mean_probs))
    if combine == "both":
        logp = 0.5 * (logp + np.log(np.maximum(mean_probs.astype(np.float64), 1e-30)))
    return _renormalise_logs(logp)


def check_combine(combine: str, source: str = "combine") -> str:
    """`combine` when it is one of COMBINE_MODES, else a UserError naming it and the choices."""
    if combine not in COMBINE_MODES:
        raise UserError(f"{source} {combine!r}: unknown way to combine views; use one of {', '.join(COMBINE_MODES)}")
    return combine


def recorded_combine_mode(bundle: Bundle | None) -> str | None:
    """The view combination recorded in the head's manifest record (`combine_mode`), None when none."""
    mode = bundle.meta("head").get("combine_mode") if bundle is not None else None
    return None if mode is None else check_combine(mode, f"bundle {bundle.path}: the head record's combine_mode")


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
        # how `locate_place` combines views by default: the mode recorded for the bundle, else PIGEON's mean
        self.combine = recorded_combine_mode(bundle) or "mean"
        g = cells.gdf
        self.n_cells = len(g)
        if head.n_cells != self.n_cells:
            raise UserError(f"head has {head.n_cells} prototypes but the bundle has {self.n_cells} cells; retrain with `pigeon train`")
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
        # Head weights as plain tensors: inference is two matmuls, no autograd.
        with torch.no_grad():
            self._protos = torch.nn.functional.normalize(head.prototypes.detach(), dim=-1).to(device)
            self._centre = head.centre.detach().to(device)
            self._scale = float(head.log_scale.detach().clamp(max=np.log(200.0)).exp() / head.temperature)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | os.PathLike, device: str = "cpu", refine: RefineConfig | None = None) -> "Predictor":
        """Load cells, head, backbone and (when the bundle has one) the gallery, refusing parts that do
        not belong together. The gallery is loaded and checked here, at start-up, so a mismatched index
        refuses the bundle instead of failing the first request."""
        b = Bundle(path)
        b.require("cells", "head")
        b.verify()  # every listed part against its sha256: a missing or changed part is refused by name
        cells = GeoCells.load(b.part_path("cells"))
        head = PrototypeHead.load(b.part_path("head"))
        bb = backbone_from_bundle(b, device=device)
        want = b.meta("head").get("backbone_hash")
        if want and want != bb.hash:
            raise UserError(f"bundle {b.path}: head.safetensors was trained with another backbone (hash {want[:12]} vs {bb.hash[:12]}); retrain it with `pigeon train`")
        if head.embed_dim != bb.embed_dim:
            raise UserError(f"bundle {b.path}: head expects {head.embed_dim}-d embeddings, backbone {bb.spec} gives {bb.embed_dim}; retrain with `pigeon train`")
        gallery = load_gallery(b, mmap=True) if any(b.listed(p) for p in GALLERY_PARTS) else None  # read-only: workers share it
        if gallery is not None and gallery.index.dim != bb.embed_dim:
            raise UserError(f"bundle {b.path}: index.faiss holds {gallery.index.dim}-d vectors, backbone {bb.spec} gives {bb.embed_dim}; "
                            f"rerun `pigeon build-index`")
        if gallery is None and refine is not None and refine.mode not in (None, "none"):
            raise UserError(f"--refine {refine.mode}: bundle {b.path} has no gallery index to refine with; "
                            f"build one with `pigeon build-index`, or use --refine none")
        return cls(cells, head.to(device), bb, bundle=b, device=device, refine=refine, gallery=gallery)

    # -- array level -----------------------------------------------------------------------------------
    def cell_probs(self, emb: np.ndarray) -> np.ndarray:
        """(n, C) calibrated cell probabilities of (n, D) embeddings."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(emb, dtype=np.float32), device=self.device)
            z = self._scale * torch.nn.functional.normalize(x - self._centre, dim=-1) @ self._protos.T
            return torch.softmax(z, dim=-1).cpu().numpy()

    def _answer_points(self, emb: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """The answer (lat, lon) per image and what refinement did: PIGEON's refinement over the
        gallery under `self.refine`, else (no gallery) the top cell's centre, reported as mode "cell"."""
        if self.gallery is None:
            return centre_answers(probs, self.centres)
        return self.gallery.answer(emb, probs, self.refine)

    def predict_embeddings(self, emb: np.ndarray, top_k: int = 5) -> dict[str, np.ndarray | list]:
        """Batched answers for (n, D) embeddings, as arrays.

        Keys: probs (n, C), lat, lon, confidence (n,), radius_km_50, radius_km_90 (n,), top_cells
        (n, k) ids, top_probs (n, k), country_probs (n, K) over `country_keys`, admin1_probs
        (n, A) over `admin1_keys`, refinement (list of dicts).
        """
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.head.embed_dim:
            raise UserError(f"embeddings must have shape (n, {self.head.embed_dim}), got {emb.shape}")
        return self._predict(emb, self.cell_probs(emb), top_k)

    def _predict(self, emb: np.ndarray, probs: np.ndarray, top_k: int) -> dict[str, np.ndarray | list]:
        """`predict_embeddings`' arrays from embeddings and their (already computed or combined) cell probabilities."""
        lat, lon, ref = self._answer_points(emb, probs)
        k = min(top_k, self.n_cells)
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(probs, part, 1), axis=1)
        top = np.take_along_axis(part, order, 1)
        r50, r90 = self.radii(lat, lon, probs)
        country = np.asarray(probs @ self._country_m)
        admin = np.asarray(probs @ self._admin_m)
        return {
            "probs": probs, "lat": lat, "lon": lon, "confidence": probs.max(axis=1),
            "radius_km_50": r50, "radius_km_90": r90, "top_cells": top,
            "top_probs": np.take_along_axis(probs, top, 1), "country_probs": country, "admin1_probs": admin,
            "refinement": ref,
        }

    def predict_places(self, emb: np.ndarray, groups: Sequence[Any] | np.ndarray, combine: str | None = None,
                       top_k: int = 5) -> tuple[dict[str, np.ndarray | list], np.ndarray, np.ndarray]:
        """One answer per place for (n, D) view embeddings and each view's place label `groups` (n,).

        `combine`: one of COMBINE_MODES (None: `self.combine`, the bundle's recorded mode else "mean").
        Returns (`predict_embeddings`-style arrays with one row per place, the sorted place labels, the
        number of views per place). Refinement uses each place's mean embedding."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.head.embed_dim:
            raise UserError(f"embeddings must have shape (n, {self.head.embed_dim}), got {emb.shape}")
        if len(groups) != len(emb):
            raise UserError(f"{len(groups)} place labels for {len(emb)} views; give one place label per view")
        if len(emb) == 0:
            raise UserError("no views given; give at least one image of the place")
        mode = check_combine(combine or self.combine)
        codes, labels = place_codes(groups)
        mean_emb = mean_view_embeddings(emb, codes, len(labels))
        mean_probs = self.cell_probs(mean_emb)
        probs = mean_probs if mode == "mean" else combine_place_probs(self.cell_probs(emb), mean_probs, codes, mode)
        return self._predict(mean_emb, probs, top_k), labels, np.bincount(codes, minlength=len(labels))

    def locate_place(self, images: Sequence[Any] | None = None, *, embeddings: np.ndarray | None = None,
                     combine: str | None = None, top_k: int = 5) -> dict[str, Any]:
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
        n = len(embeddings)
        p, _, _ = self.predict_places(embeddings, np.zeros(n, dtype=np.int64), combine=combine, top_k=top_k)
        t2 = time.perf_counter()
        out = self.format(p, top_k=top_k)[0]
        t3 = time.perf_counter()
        out.update(views=n, combine=combine or self.combine,
                   timings_ms={"embed_ms": (t1 - t0) * 1e3, "head_ms": (t2 - t1) * 1e3, "format_ms": (t3 - t2) * 1e3, "total_ms": (t3 - t0) * 1e3})
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

    def locate(self, images: Sequence[Any], top_k: int = 5) -> list[dict[str, Any]]:
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
        p = self.predict_embeddings(emb, top_k=top_k)
        t3 = time.perf_counter()
        out = self.format(p, top_k=top_k)
        t4 = time.perf_counter()
        n = len(ims)
        timing = {"load_ms": (t1 - t0) * 1e3 / n, "embed_ms": (t2 - t1) * 1e3 / n, "head_ms": (t3 - t2) * 1e3 / n,
                  "format_ms": (t4 - t3) * 1e3 / n, "total_ms": (t4 - t0) * 1e3 / n}
        for o in out:
            o["timings_ms"] = dict(timing)
        return out

    def format(self, p: dict[str, Any], top_k: int = 5) -> list[dict[str, Any]]:
        """Turn `predict_embeddings` arrays into one JSON-ready dict per image."""
        n = len(p["lat"])
        k_c = min(top_k, len(self._country_keys))
        k_a = min(top_k, len(self._admin_keys))
        top_country = np.argsort(-p["country_probs"], axis=1)[:, :k_c]
        top_admin = np.argsort(-p["admin1_probs"], axis=1)[:, :k_a]
        here = regions_at(p["lat"], p["lon"])   # the admin-1 the answer point lies in (bundled Natural Earth)
        edge = p["probs"] @ self._edge if self._edge is not None else None
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
                "top_cells": cells, "countries": countries, "admin1": admins, "refinement": p["refinement"][i],
                "region_at_answer": {"admin1": str(here["admin1"][i]), "country": str(here["country"][i]),
                                     "iso_a2": str(here["iso_a2"][i]), "at_sea": bool(here["at_sea"][i])},
                "reach": None if edge is None else {"max_reach_km": self._reach_km, "edge_probability": float(edge[i])},
            })
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


__all__ = ["Predictor", "load", "collect_images", "IMAGE_SUFFIXES", "COMBINE_MODES", "place_codes", "mean_view_embeddings",
           "combine_place_probs", "recorded_combine_mode"]

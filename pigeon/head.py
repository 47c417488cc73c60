"""The geocell head: one prototype per cell, logits = scale · cos(embedding, prototype).

Why prototypes: a cosine head over L2-normalised CLIP embeddings can be initialised from text
(one caption per cell — zero-shot geolocation with any CLIP) or from the mean image embedding of
each cell, and then fine-tuned; the same vectors serve as cell descriptors elsewhere.
Also here: PIGEON's haversine label smoothing (`BatchTargets`), the soft targets the head is trained on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from pigeon.core.errors import FieldError, UserError
from pigeon.core.sphere import chord_to_km, to_xyz

from .calibration import RadiusModel

CAPTION = "A photo taken in {region}, {country}."
CAPTION_COUNTRY = "A photo taken in {country}."
DEFAULT_TAU_KM = 65.0   # PIGEOTTO's; `pigeon train` defaults to auto_tau_km (the cells' spacing)
MAX_SCALE = 200.0       # the head's logit scale is clamped here (CLIP clamps its own at 100)
TAU_SPACING_SHARE = 0.5  # auto tau = this x the median nearest-neighbour spacing of the cell centres
# Zero-shot prompt ensemble (CLIP's recipe: a class's prototype is the normalised mean of its prompts'
# normalised text embeddings), in the PIGEON/StreetCLIP style. Each template is a pair: the sentence
# for a cell with a region, and the one for a cell with none (the country alone). The first pair is the
# single caption `cell_captions` writes; the country-only ones make a cell's prototype also carry what a
# caption can say of its whole country. See docs/world.md for the measurement that chose the default.
ZERO_SHOT_TEMPLATES: tuple[tuple[str, str], ...] = (
    (CAPTION, CAPTION_COUNTRY),
    ("A Street View photo in {region}, {country}.", "A Street View photo in {country}."),
    ("A photo in the region of {region} in {country}.", "A photo in {country}."),
    ("A Street View photo in the region of {region} in {country}.", "A Street View photo in {country}."),
    ("A street in {region}, {country}.", "A street in {country}."),
    ("A road in {region}, {country}.", "A road in {country}."),
    (CAPTION_COUNTRY, CAPTION_COUNTRY),
    ("A Street View photo in {country}.", "A Street View photo in {country}."),
)


class PrototypeHead(nn.Module):
    """logits = exp(log_scale) · cos(x - centre, prototype_c); `temperature` is a fixed calibration divisor.

    `centre` (zero for a zero-shot text head) is the mean training embedding: embeddings of one
    backbone share a large common component (the "cone" effect), and removing it lets the cosine
    see the differences between places. `radius` (set by `pigeon train`, saved with the head) is
    each cell's spread and the radii's calibration (`pigeon.calibration.RadiusModel`); None for a
    head that has none (zero-shot, or trained before radii had spreads).
    """

    def __init__(self, prototypes: torch.Tensor | np.ndarray, scale: float = 30.0, temperature: float = 1.0, centre: torch.Tensor | np.ndarray | None = None):
        super().__init__()
        p = torch.as_tensor(np.asarray(prototypes, dtype=np.float32))
        self.prototypes = nn.Parameter(nn.functional.normalize(p, dim=-1).clone())
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))
        c = torch.zeros(p.shape[1]) if centre is None else torch.as_tensor(np.asarray(centre, dtype=np.float32))
        self.centre = nn.Parameter(c.clone())
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.radius: RadiusModel | None = None
        self._unit: tuple[tuple[Any, ...], torch.Tensor] | None = None   # normalised prototypes, outside autograd

    @property
    def n_cells(self) -> int:
        return self.prototypes.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.prototypes.shape[1]

    def forward(self, x: torch.Tensor, calibrated: bool = False) -> torch.Tensor:
        """The one formula for the head's logits: scale · cos(x − centre, prototypes), scale = exp(log_scale)
        clamped at MAX_SCALE; divided by the fitted temperature when `calibrated` (what serving uses)."""
        scale = self.log_scale.clamp(max=math.log(MAX_SCALE)).exp()
        logits = scale * nn.functional.normalize(x - self.centre, dim=-1) @ self.unit_prototypes().T
        return logits / self.temperature if calibrated else logits

    def unit_prototypes(self) -> torch.Tensor:
        """(C, D) prototypes at unit length. Outside autograd they are normalised once and cached until the
        parameter changes (its storage or version), so a served answer does not pay for C x D norms."""
        p = self.prototypes
        if torch.is_grad_enabled() and p.requires_grad:
            return nn.functional.normalize(p, dim=-1)
        key = (p.data_ptr(), p._version, p.device, p.dtype)
        if self._unit is None or self._unit[0] != key:
            self._unit = (key, nn.functional.normalize(p.detach(), dim=-1))
        return self._unit[1]

    @torch.no_grad()
    def cell_probs(self, emb: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n, C) calibrated cell probabilities of (n, D) embeddings: softmax(head(x, calibrated=True))."""
        x = torch.as_tensor(np.asarray(emb, dtype=np.float32), device=self.prototypes.device)
        return torch.softmax(self(x, calibrated=True), dim=-1).cpu().numpy()

    def state_arrays(self) -> dict[str, torch.Tensor]:
        out = {
            "prototypes": nn.functional.normalize(self.prototypes.detach(), dim=-1).contiguous().cpu(),
            "log_scale": self.log_scale.detach().reshape(1).cpu(),
            "centre": self.centre.detach().contiguous().cpu(),
            "temperature": self.temperature.detach().reshape(1).cpu(),
        }
        if self.radius is not None:
            out.update(self.radius.to_tensors())
        return out

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """safetensors file with prototypes (C, D), log_scale (1,), centre (D,), temperature (1,), and
        with a radius model radius_spread_km (C, K), radius_levels (L,), radius_scales (L,), radius_calibrated (1,)."""
        from safetensors.torch import save_file

        save_file(self.state_arrays(), str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrototypeHead":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"head file {path} is unreadable ({e}); retrain it with `pigeon train`") from e
        missing = {"prototypes", "log_scale", "temperature"} - set(t)
        if missing:
            raise UserError(f"head file {path} lacks {sorted(missing)}; retrain it with `pigeon train`")
        head = cls(t["prototypes"].float(), scale=1.0, temperature=float(t["temperature"][0]), centre=t.get("centre"))
        with torch.no_grad():
            head.log_scale.fill_(float(t["log_scale"][0]))
        head.radius = RadiusModel.from_tensors(t)
        if head.radius is not None and head.radius.spread_km.shape[0] != head.n_cells:
            raise UserError(f"head file {path} has spreads for {head.radius.spread_km.shape[0]} cells but {head.n_cells} prototypes; retrain it with `pigeon train`")
        return head


def write_head(bundle: Any, head: PrototypeHead, backbone_hash: str, **meta: Any) -> Path:
    """Save the head into the bundle as head.safetensors, tied to the bundle's cells and the backbone."""
    if bundle.cells_hash is None:
        raise UserError(f"bundle {bundle.path} has no cells.parquet; run `pigeon build-cells --out {bundle.path}/cells.parquet` first")
    md = {"n_cells": head.n_cells, "embed_dim": head.embed_dim, **meta}
    return bundle.write_part(
        "head",
        lambda tmp: head.save(tmp, metadata=md),
        cells_hash=bundle.cells_hash,
        backbone_hash=backbone_hash,
        **md,
    )


def cell_captions(gdf: Any, template: tuple[str, str] = (CAPTION, CAPTION_COUNTRY)) -> list[str]:
    """One caption per cell: 'A photo taken in {region}, {country}.' (region = the cell's main admin-1;
    'A photo taken in {country}.' for a cell without one), or `template`'s pair (with region, without)."""
    regions = gdf["admin1"].fillna("").astype(str).to_numpy()
    countries = gdf["country"].fillna("").astype(str).to_numpy()
    with_region, without = template
    return [with_region.format(region=r, country=c) if r else without.format(country=c) for r, c in zip(regions, countries)]


def choose_templates(n: int | str | None) -> tuple[tuple[str, str], ...]:
    """The first `n` of `ZERO_SHOT_TEMPLATES` ('all' or None: every one); a `FieldError` (templates) otherwise."""
    if n is None or str(n).strip().lower() == "all":
        return ZERO_SHOT_TEMPLATES
    try:
        k = int(str(n).strip())
    except ValueError:
        k = 0
    if not 1 <= k <= len(ZERO_SHOT_TEMPLATES):
        raise FieldError("templates", repr(n), f"give 'all' or a number from 1 to {len(ZERO_SHOT_TEMPLATES)}")
    return ZERO_SHOT_TEMPLATES[:k]


def text_prototypes(backbone: Any, gdf: Any, batch_size: int = 256, templates: Sequence[tuple[str, str]] | None = None) -> np.ndarray:
    """(C, D) normalised text embeddings of the cells' captions.

    `templates` None: one caption per cell (`cell_captions`). Otherwise a prompt ensemble, CLIP's
    zero-shot recipe: each cell's prototype is the normalised mean over the templates of the
    normalised embedding of its caption from that template."""
    if templates is None:
        return _embed_texts(backbone, cell_captions(gdf), batch_size)
    if len(templates) == 0:
        raise UserError("text_prototypes: give at least one template (a (with region, without region) pair)")
    caps = [c for t in templates for c in cell_captions(gdf, t)]                      # template-major
    emb = _embed_texts(backbone, caps, batch_size).reshape(len(templates), len(gdf), -1)  # (T, C, D)
    return _normalise(emb.mean(axis=0))


def _embed_texts(backbone: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """(n, D) normalised text embeddings, in batches (one text tower pass per batch)."""
    out = [np.asarray(backbone.embed_texts(texts[i:i + batch_size]), dtype=np.float32) for i in range(0, len(texts), batch_size)]
    return _normalise(np.concatenate(out, 0))


def zero_shot_scale(backbone: Any) -> float:
    """Logit scale of a zero-shot text head: the backbone's own CLIP logit scale (at most 100), else 100."""
    ls = getattr(backbone.model, "logit_scale", None)
    try:
        return float(min(ls.exp().item(), 100.0)) if ls is not None else 100.0
    except Exception:  # a logit_scale that is not a tensor: CLIP's usual value
        return 100.0


def mean_prototypes(emb: np.ndarray | Iterable[np.ndarray], cell: np.ndarray, n_cells: int, fallback: np.ndarray | None = None,
                    centre: np.ndarray | None = None) -> np.ndarray:
    """(C, D) normalised mean (centred) image embedding of each cell; cells without images take `fallback` (or a tiny random vector).

    `emb` is an array or an iterable of consecutive row chunks (memory-mapped embeddings, summed chunk
    by chunk), aligned with `cell`."""
    cell = np.asarray(cell, np.int64)
    sums, start, total = None, 0, None
    for chunk in ([emb] if isinstance(emb, np.ndarray) else emb):
        x = np.asarray(chunk, dtype=np.float32)
        x = _normalise(x - centre if centre is not None else x)
        if sums is None:
            sums, total = torch.zeros((n_cells, x.shape[1]), dtype=torch.float64), np.zeros(x.shape[1], np.float64)
        sums.index_add_(0, torch.from_numpy(cell[start:start + len(x)]), torch.from_numpy(x).double())  # np.add.at is 10x slower
        total += x.sum(0)
        start += len(x)
    if sums is None or start != len(cell):
        raise UserError(f"mean_prototypes: {start} embeddings for {len(cell)} cell labels; give one label per embedding")
    sums = sums.numpy()
    counts = np.bincount(cell, minlength=n_cells)
    empty = counts == 0
    if empty.any():
        if fallback is not None:
            sums[empty] = fallback[empty]
        else:
            rng = np.random.default_rng(0)
            sums[empty] = rng.normal(size=(int(empty.sum()), sums.shape[1])) * 1e-3 + total / max(start, 1)
    return _normalise(sums.astype(np.float32))


def check_tau_km(tau_km: float) -> float:
    """Label smoothing's distance scale, refused unless a positive number of km (the one check of it)."""
    if not (isinstance(tau_km, (int, float)) and math.isfinite(tau_km) and tau_km > 0):
        raise FieldError("tau", tau_km, "label smoothing's distance scale must be a positive number of km (e.g. 65)")
    return float(tau_km)


def auto_tau_km(centres: np.ndarray) -> float:
    """Label smoothing's tau for these cells: half the median distance from a cell centre to its
    nearest neighbour's. Why: tau sets how far target mass spreads, so it must follow the cell
    spacing. PIGEON's fixed 65-75 km made every target near-uniform over 17 cells a few km apart
    (streetview_mini); over 10 place splits there, the pipeline's median error per photo was 16.8 km at
    65 km (plain retrieval: 14.8) and 12.4 km with this default (10.9 with the bootstrap rule on the
    refinement choice); 2-16 km were level, 32+ lost
    (docs/benchmarks.md).
    On 1,005 cells over the 100K MP-16 photos this gives 35 km (the spacing is 70.7 km), below
    PIGEOTTO's 65: that scale is not measured here, and `--tau 65` follows the paper.
    DEFAULT_TAU_KM with fewer than two distinct centres."""
    from scipy.spatial import cKDTree

    c = np.asarray(centres, np.float64).reshape(-1, 2)
    if len(c) < 2:
        return DEFAULT_TAU_KM
    xyz = to_xyz(c[:, 0], c[:, 1])
    chord, _ = cKDTree(xyz).query(xyz, k=2)
    km = chord_to_km(chord[:, 1])
    km = km[km > 1e-6]
    return TAU_SPACING_SHARE * float(np.median(km)) if len(km) else DEFAULT_TAU_KM


class BatchTargets:
    """PIGEON's haversine label smoothing, the one formula the head is trained on: for a photo at x
    whose true cell is t, target_i ∝ exp(-(d(c_i, x) - d(c_t, x)) / tau) over the cell centres c_i,
    rows summing to 1. Distances are measured from x, so the true cell need not have the highest
    weight when x lies near a neighbour's centre.

    Made one batch of photos at a time (`targets(rows)`, float64 maths): the dense N x C matrix does
    not fit at scale (5M photos x 2,500 cells = 50 GB); this keeps each photo's unit vector and cell
    (O(N x 4) numbers)."""

    def __init__(self, lat: np.ndarray, lon: np.ndarray, cell: np.ndarray, centres: np.ndarray, tau_km: float = DEFAULT_TAU_KM):
        self.tau = check_tau_km(tau_km)
        self.xyz = torch.from_numpy(to_xyz(lat, lon))                          # (N, 3) float64
        self.cell = torch.from_numpy(np.asarray(cell, np.int64))
        self.centres = torch.from_numpy(to_xyz(centres[:, 0], centres[:, 1]))  # (C, 3)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        r = torch.from_numpy(np.asarray(rows, np.int64))
        chord = (2.0 - 2.0 * (self.xyz[r] @ self.centres.T)).clamp(0.0, 4.0).sqrt()
        d = torch.from_numpy(chord_to_km(chord.numpy()))   # (B, C) km
        z = -(d - d.gather(1, self.cell[r][:, None])) / self.tau
        return torch.softmax(z, dim=1).float()


def _normalise(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


__all__ = [
    "CAPTION", "CAPTION_COUNTRY", "DEFAULT_TAU_KM", "ZERO_SHOT_TEMPLATES", "PrototypeHead", "write_head", "cell_captions",
    "choose_templates", "text_prototypes", "zero_shot_scale",
    "mean_prototypes", "BatchTargets", "auto_tau_km", "check_tau_km", "MAX_SCALE",
]

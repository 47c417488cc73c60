"""`pigeon train`: fit the geocell head of a bundle on a manifest of photos with coordinates.

Pipeline: the bundle's cells label each photo; PIGEON's haversine label smoothing turns the label
into a soft target over all cells; the frozen backbone's embeddings are computed once and cached on
disk; the prototype head (initialised from each cell's mean image embedding, or from its caption's
text embedding) is trained with soft-target cross-entropy, with early stopping on the validation
split; one temperature is then fitted on validation (ECE reported before/after) and stored in the
head, with each cell's spread (its training photos' distances to its centre) and the uncertainty
radii's scale factors fitted on the same validation photos. `--unfreeze-last-block` trains the image
tower's last block with the head (no cache: the embeddings move) and writes the tuned backbone into
the bundle. `--zero-shot` needs no data: the head is the text embeddings of one caption per cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pigeon.core.io import atomic_path
from pigeon.core.sphere import haversine_km

from .backbones import DEFAULT_SPEC, backbone_from_bundle, create_backbone
from .bundle import Bundle
from .calibration import calibrate_radii, cell_spread_km, ece, fit_temperature, geometric_spread_km, softmax
from .core.errors import UserError
from .datasets import EpochSampler, build_train_transform, load_image, rare_cell_weights, read_manifest
from .embed_cache import embed_paths
from .geocells import GeoCells
from .head import PrototypeHead, mean_prototypes, smoothed_targets, text_prototypes, write_head

STATE_FILE = ".train_state.pt"


@dataclass
class TrainConfig:
    """Options of `pigeon train` (see docs/train.md)."""

    epochs: int = 30
    lr: float = 0.01
    batch_size: int = 256
    tau: float = 65.0
    balanced: bool = False
    augment: int = 0                 # extra augmented views per training photo (frozen) / on-the-fly (unfrozen)
    unfreeze_last_block: bool = False
    backbone_lr: float = 1e-4
    init: str = "mean"               # "mean" (image means; text for empty cells) or "text"
    patience: int = 5
    val_fraction: float = 0.1        # when the manifest has no 'val' rows
    seed: int = 0
    resume: bool = False
    weight_decay: float = 0.0
    cache_dir: str | None = None
    progress: bool = True

    def check(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.tau <= 0:
            raise UserError(f"--tau must be positive (km), got {self.tau}")
        if self.augment < 0:
            raise UserError(f"--augment must be 0 or more, got {self.augment}")
        if self.init not in ("mean", "text"):
            raise UserError(f"--init must be 'mean' or 'text', got {self.init!r}")


def _load_cells(bundle: Any) -> GeoCells:
    bundle.require("cells")
    return GeoCells.load(bundle.part_path("cells"))


def _backbone_for(bundle: Any, spec: str | None, device: str):
    """The bundle's backbone; set it from `spec` (or the default) when the bundle names none."""
    if bundle.backbone_spec is None:
        bb = create_backbone(spec or DEFAULT_SPEC, device=device)
        bundle.set_backbone(bb.spec, bb.hash)
        return bb
    if spec is not None and spec != bundle.backbone_spec:
        raise UserError(f"bundle {bundle.path} uses backbone {bundle.backbone_spec!r}, not {spec!r}; drop --backbone or train into a new bundle")
    return backbone_from_bundle(bundle, device=device)


def _zero_shot_scale(bb: Any) -> float:
    ls = getattr(bb.model, "logit_scale", None)
    try:
        return float(min(ls.exp().item(), 100.0)) if ls is not None else 100.0
    except Exception:
        return 100.0


def train_zero_shot(bundle_dir: str | os.PathLike, backbone: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Write a text-prototype head (one caption per cell): zero-shot geolocation, no data needed."""
    b = Bundle(bundle_dir)
    cells = _load_cells(b)
    bb = _backbone_for(b, backbone, device)
    protos = text_prototypes(bb, cells.gdf)
    head = PrototypeHead(protos, scale=_zero_shot_scale(bb))
    write_head(b, head, bb.hash, init="text", trained="false")
    return {"mode": "zero-shot", "n_cells": len(cells), "backbone": bb.spec, "embed_dim": bb.embed_dim}


def _splits(df, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    split = df["split"].astype(str).str.lower().to_numpy()
    tr = np.flatnonzero(split == "train")
    va = np.flatnonzero(split == "val")
    if len(tr) == 0:
        raise UserError("manifest has no rows with split 'train'; add a `split` column with train/val/test (or leave it out: all rows train)")
    if len(va) == 0:
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(tr)
        n_val = max(1, int(round(len(tr) * cfg.val_fraction))) if len(tr) >= 10 else 0
        va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return tr, va


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def _run_key(data: str, cfg: TrainConfig, cells_hash: str, bb_hash: str) -> str:
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "progress", "cache_dir", "epochs", "patience")}
    return hashlib.sha1(json.dumps([str(Path(data).resolve()), keep, cells_hash, bb_hash], sort_keys=True).encode()).hexdigest()


def _per_s(count: int, seconds: float) -> float | None:
    """A rate, or None when nothing was counted or no time measured."""
    return count / seconds if count and seconds > 0 else None


class _CountingBackbone:
    """The backbone as `embed_paths` sees it, counting the images it really embeds (cache misses)."""

    def __init__(self, bb: Any):
        self._bb = bb
        self.images = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bb, name)

    def embed_images(self, images: Any, **kw: Any) -> np.ndarray:
        self.images += len(images)
        return self._bb.embed_images(images, **kw)


@dataclass
class _Loop:
    """Where the epoch loop stands; all but the speed counters are saved for `--resume`."""

    start_epoch: int = 0
    best: float = math.inf
    best_state: dict[str, Any] | None = None
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    n_seen: int = 0
    n_steps: int = 0
    seconds: float = 0.0


class _Run:
    """One `pigeon train` run, as named steps sharing the bundle, the photos and the head."""

    def __init__(self, data: str | os.PathLike, bundle_dir: str | os.PathLike, backbone: str | None, cfg: TrainConfig, device: str):
        self.cfg, self.data = cfg, str(data)
        self.bundle = Bundle(bundle_dir)
        self.cells = _load_cells(self.bundle)
        df = read_manifest(data)
        self.bb = _backbone_for(self.bundle, backbone, device)
        self.centres = np.asarray(self.cells.centres, dtype=np.float64)
        self.tr, self.va = _splits(df, cfg)
        self.lat, self.lon = df["lat"].to_numpy(), df["lon"].to_numpy()
        self.cell = np.asarray(self.cells.cell_of(self.lat, self.lon), dtype=np.int64)
        self.paths = df["path"].astype(str).tolist()
        self.counter = _CountingBackbone(self.bb)
        self.loop = _Loop()

    # -- embeddings --------------------------------------------------------------------------------
    def embed(self) -> None:
        """Frozen-backbone embeddings of the train and val photos (cached), plus `--augment` views."""
        cfg, t0 = self.cfg, time.perf_counter()
        self.E_tr = self._embed_rows(self.tr)
        self.E_va = self._embed_rows(self.va) if len(self.va) else np.zeros((0, self.bb.embed_dim), np.float32)
        views_idx, views_emb = [self.tr], [self.E_tr]
        if cfg.augment and not cfg.unfreeze_last_block:
            tf = build_train_transform(self.bb.image_size, self.bb.mean, self.bb.std, hflip=0.0)
            for k in range(cfg.augment):
                torch.manual_seed(cfg.seed * 1000 + k)  # each view is a fixed, reproducible augmentation
                views_idx.append(self.tr)
                views_emb.append(self._embed_rows(self.tr, view=f"aug{k}-seed{cfg.seed}", transform=tf))
        self.X_idx = np.concatenate(views_idx)
        self.X = torch.from_numpy(np.concatenate(views_emb, 0))
        self.n_embeddings = len(self.X_idx) + len(self.va)
        self.embed_seconds = time.perf_counter() - t0

    def _embed_rows(self, idx: np.ndarray, view: str = "plain", transform: Callable | None = None) -> np.ndarray:
        return embed_paths(self.counter, [self.paths[i] for i in idx], cache_dir=self.cfg.cache_dir,
                           progress=self.cfg.progress, transform=transform, view=view)

    # -- head, targets, optimiser ---------------------------------------------------------------------
    def init_head(self) -> None:
        """Prototypes from cell means (text for empty cells) or captions; soft targets; AdamW."""
        cfg, C = self.cfg, len(self.cells)
        text = None
        if cfg.init == "text" or np.bincount(self.cell[self.tr], minlength=C).min() == 0:
            text = text_prototypes(self.bb, self.cells.gdf)
        centre = None if cfg.init == "text" else self.E_tr.mean(0)
        protos = text if cfg.init == "text" else mean_prototypes(self.E_tr, self.cell[self.tr], C, fallback=text, centre=centre)
        self.head = PrototypeHead(protos, scale=_zero_shot_scale(self.bb) if cfg.init == "text" else 30.0, centre=centre)
        # Soft targets for every photo (train and val), from its true position.
        self.targets = torch.from_numpy(smoothed_targets(self.lat, self.lon, self.cell, self.centres, cfg.tau))
        params = [{"params": self.head.parameters(), "lr": cfg.lr}]
        if cfg.unfreeze_last_block:
            self.bb.set_trainable(1)
            module = self.bb.model.visual if hasattr(self.bb.model, "visual") else self.bb.model
            params.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": cfg.backbone_lr})
        self.opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
        self.img_tf = None
        if cfg.unfreeze_last_block:
            self.img_tf = build_train_transform(self.bb.image_size, self.bb.mean, self.bb.std, hflip=0.0) if cfg.augment else self.bb.preprocess

    # -- resume and checkpoints ------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.bundle.path / STATE_FILE

    @property
    def run_key(self) -> str:
        return _run_key(self.data, self.cfg, self.bundle.cells_hash or "", self.bb.hash)

    def resume(self) -> None:
        """Continue the run saved in .train_state.pt (same data, options, cells and backbone) with `--resume`."""
        if not (self.cfg.resume and self.state_path.exists()):
            return
        st = torch.load(self.state_path, map_location="cpu", weights_only=False)
        if st.get("run_key") != self.run_key:
            raise UserError(f"{self.state_path} belongs to another run (other data, options, cells or backbone); drop --resume or delete the file")
        self.head.load_state_dict(st["head"])
        self.opt.load_state_dict(st["opt"])
        if self.cfg.unfreeze_last_block and "backbone" in st:
            self.bb.model.load_state_dict(st["backbone"])
        self.loop = _Loop(st["epoch"], st["best"], st["best_state"], st["bad_epochs"], st["history"])

    def checkpoint(self, epoch: int) -> None:
        """Save the loop's state atomically after each epoch (what `--resume` reads)."""
        lp = self.loop
        st = {"run_key": self.run_key, "head": self.head.state_dict(), "opt": self.opt.state_dict(), "epoch": epoch + 1,
              "best": lp.best, "best_state": lp.best_state, "bad_epochs": lp.bad_epochs, "history": lp.history}
        if self.cfg.unfreeze_last_block:
            st["backbone"] = self.bb.model.state_dict()
        with atomic_path(self.state_path) as tmp:
            torch.save(st, tmp)

    # -- the epochs ---------------------------------------------------------------------------------------
    def embed_batch(self, rows: np.ndarray) -> torch.Tensor:
        """Embeddings of sampled rows: cached vectors, or a forward through the unfrozen block."""
        if not self.cfg.unfreeze_last_block:
            return self.X[rows]
        x = torch.stack([self.img_tf(load_image(self.paths[self.X_idx[r]])) for r in rows])
        return self.bb.encode_image(x, normalize=True)

    def val_logits(self) -> np.ndarray:
        """Uncalibrated logits of the val photos (re-embedded when the backbone trains)."""
        with torch.no_grad():
            if self.cfg.unfreeze_last_block:
                Ev = torch.from_numpy(embed_paths(self.bb, [self.paths[i] for i in self.va], use_cache=False, progress=False))
            else:
                Ev = torch.from_numpy(self.E_va)
            return self.head(Ev).numpy()

    def fit(self) -> None:
        """Epochs of soft-target cross-entropy, early stopping on val loss; ends with the best state loaded."""
        cfg, lp = self.cfg, self.loop
        weights = rare_cell_weights(self.cell[self.X_idx], power=1.0) if cfg.balanced else None
        sampler = EpochSampler(len(self.X_idx), seed=cfg.seed, weights=weights)
        for epoch in range(lp.start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            rec = self.epoch(epoch, np.fromiter(iter(sampler), dtype=np.int64))
            score = self.score(rec)
            lp.history.append(rec)
            if score < lp.best - 1e-6:
                lp.best, lp.bad_epochs = score, 0
                lp.best_state = {"head": {k: v.clone() for k, v in self.head.state_dict().items()}}
                if cfg.unfreeze_last_block:
                    lp.best_state["backbone"] = {k: v.detach().clone() for k, v in self.bb.model.state_dict().items()}
            else:
                lp.bad_epochs += 1
            self.checkpoint(epoch)
            if lp.bad_epochs >= cfg.patience:
                break
        if lp.best_state is not None:
            self.head.load_state_dict(lp.best_state["head"])
            if cfg.unfreeze_last_block and "backbone" in lp.best_state:
                self.bb.model.load_state_dict(lp.best_state["backbone"])
        self.head.eval()

    def epoch(self, epoch: int, order: np.ndarray) -> dict[str, float]:
        """One pass over `order` in batches of optimiser steps; returns the epoch's train loss."""
        cfg = self.cfg
        self.head.train()
        if cfg.unfreeze_last_block:
            self.bb.model.train()
        ts, losses = time.perf_counter(), []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress, leave=False)
        for s in bar:
            rows = order[s : s + cfg.batch_size]
            loss = _soft_ce(self.head(self.embed_batch(rows)), self.targets[self.X_idx[rows]])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(float(loss.detach()))
        self.loop.seconds += time.perf_counter() - ts
        self.loop.n_seen += len(order)
        self.loop.n_steps += len(losses)
        self.head.eval()
        if cfg.unfreeze_last_block:
            self.bb.model.eval()
        return {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}

    def score(self, rec: dict[str, float]) -> float:
        """Adds the val loss and val median km (top cell's centre) to `rec`; the early-stopping score."""
        if not len(self.va):
            return rec["train_loss"]
        lv = self.val_logits()
        rec["val_loss"] = float(_soft_ce(torch.from_numpy(lv), self.targets[self.va]))
        top = lv.argmax(1)
        rec["val_median_km"] = float(np.median(haversine_km(self.centres[top, 0], self.centres[top, 1], self.lat[self.va], self.lon[self.va])))
        return rec["val_loss"]

    # -- calibration and output -------------------------------------------------------------------------
    def calibrate(self) -> dict[str, Any]:
        """Temperature on val (ECE before/after); each cell's spread from the train photos; the radii's
        scale factors on val (uncalibrated, and said so, without enough val photos)."""
        out: dict[str, Any] = {}
        probs = np.zeros((len(self.va), len(self.centres)))
        if len(self.va) >= 2:
            lv = self.val_logits()
            y = self.cell[self.va]
            T = fit_temperature(lv, y)
            out.update(temperature=T, ece_before=ece(softmax(lv), y), ece_after=ece(softmax(lv, T), y))
            self.head.temperature.fill_(T)
            probs = softmax(lv, T)
        fallback = geometric_spread_km(self.cells.geoms, self.centres)
        spread = cell_spread_km(self.lat[self.tr], self.lon[self.tr], self.cell[self.tr], self.centres, fallback=fallback)
        self.head.radius, rep = calibrate_radii(spread, probs, self.lat[self.va], self.lon[self.va], self.centres)
        out.update(rep)
        return out

    def write(self) -> None:
        """The tuned backbone (with `--unfreeze-last-block`) and the head, through the bundle."""
        cfg, b, bb = self.cfg, self.bundle, self.bb
        if cfg.unfreeze_last_block:
            bb.model.eval()
            b.write_part("backbone", bb.save_weights, spec=bb.spec, tuned="last block, by pigeon train")
            bb.invalidate_hash()
            b.set_backbone(bb.spec, bb.hash)
        write_head(b, self.head, bb.hash, init=cfg.init, trained="true", tau_km=cfg.tau,
                   radius_calibrated=str(bool(self.head.radius is not None and self.head.radius.calibrated)).lower())

    def speeds(self) -> dict[str, Any]:
        """Each figure named for what it measures: the embedding step, and the head's optimiser steps."""
        lp = self.loop
        return {
            "embed_seconds": self.embed_seconds,
            "images_embedded": self.counter.images,               # backbone forwards (cache misses)
            "embeddings_from_cache": self.n_embeddings - self.counter.images,
            "images_embedded_per_s": _per_s(self.counter.images, self.embed_seconds),
            "train_seconds": lp.seconds,
            "head_steps_per_s": _per_s(lp.n_steps, lp.seconds),
            "head_examples_per_s": _per_s(lp.n_seen, lp.seconds),  # training examples through the head
        }


def train(
    data: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    backbone: str | None = None,
    config: TrainConfig | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the bundle's head on `data` (a manifest); returns a report (also saved as train_report.json)."""
    cfg = config or TrainConfig()
    cfg.check()
    torch.manual_seed(cfg.seed)
    run = _Run(data, bundle_dir, backbone, cfg, device)
    run.embed()
    run.init_head()
    run.resume()
    run.fit()
    report: dict[str, Any] = {"n_train": int(len(run.tr)), "n_val": int(len(run.va)), "n_cells": len(run.cells),
                              "backbone": run.bb.spec, "epochs_run": len(run.loop.history), "history": run.loop.history}
    report.update(run.calibrate())
    run.write()
    report.update(run.speeds(), best_val_loss=run.loop.best if math.isfinite(run.loop.best) else None)
    with atomic_path(run.bundle.path / "train_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


__all__ = ["TrainConfig", "train", "train_zero_shot"]
